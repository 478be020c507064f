//! Embedding natsfn in your own tokio program: bring your own NATS client,
//! add handlers from a directory or straight from bytes, and run until your
//! own shutdown signal fires.
//!
//! `main.rs` wires this to the command line; the end-to-end tests call
//! [`run`] directly, so this example cannot rot.

use std::future::Future;
use std::path::Path;

/// An inline manifest: handlers need not live in files.
const ECHO_MANIFEST: &str = r#"
name = "embedded-echo"
[[trigger]]
subject = "embed.echo"
[limits]
max_concurrency = 4
"#;

/// Runs a host on `nats_url` with every handler in `handlers_dir` plus an
/// echo handler built from `echo_wasm`, until `shutdown` resolves.
pub async fn run(
    nats_url: &str,
    handlers_dir: &Path,
    echo_wasm: Vec<u8>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<natsfn::ShutdownReport> {
    // Your application's own connection: natsfn uses it and leaves it open.
    let client = async_nats::connect(nats_url).await?;
    let host = natsfn::Host::builder()
        .nats_client(client)
        .handlers_dir(handlers_dir)
        .handler("embedded-echo.toml", ECHO_MANIFEST, echo_wasm)
        .build()
        .await?;
    for e in host.load_errors() {
        eprintln!("skipped: {e}");
    }
    Ok(host.run(shutdown).await?)
}
