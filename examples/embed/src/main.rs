//! `cargo run -p natsfn-embed-example -- <nats-url> <handlers-dir> <echo.wasm>`:
//! serves until Ctrl-C.

use std::path::PathBuf;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: natsfn-embed-example <nats-url> <handlers-dir> <echo.wasm>";
    let url = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let dir = PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!(usage))?);
    let wasm = std::fs::read(args.next().ok_or_else(|| anyhow::anyhow!(usage))?)?;
    let report = natsfn_embed_example::run(&url, &dir, wasm, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    println!("stopped: {report:?}");
    Ok(())
}
