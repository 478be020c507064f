//! Time from a component file being replaced to the new version answering
//! its first request, with the host watching the directory: cold (a version
//! never compiled) and warm (a version already in the compiled-code cache).
//!
//! `cargo bench -p natsfn-e2e --bench reload`.

use std::time::{Duration, Instant};

use natsfn_e2e::{guest, nats, HandlerDir};

async fn tag(client: &async_nats::Client) -> Option<String> {
    let req = async_nats::Request::new().payload("x".into()).timeout(Some(Duration::from_secs(1)));
    let reply = client.send_request("bench.reload", req).await.ok()?;
    Some(String::from_utf8_lossy(&reply.payload).split(':').next()?.to_owned())
}

/// Installs `guest_name` as the component and times until `want` answers.
async fn swap(client: &async_nats::Client, dir: &HandlerDir, guest_name: &str, want: &str) -> Duration {
    let tmp = dir.path().join("tagger.wasm.tmp");
    std::fs::copy(guest(guest_name), &tmp).expect("copy");
    let start = Instant::now();
    std::fs::rename(&tmp, dir.path().join("tagger.wasm")).expect("rename");
    while tag(client).await.as_deref() != Some(want) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

#[tokio::main]
async fn main() {
    let server = nats();
    let dir = HandlerDir::new();
    std::fs::copy(guest("taga"), dir.path().join("tagger.wasm")).expect("copy");
    dir.write(
        "tagger.toml",
        "name = \"tagger\"\ncomponent = \"tagger.wasm\"\n[[trigger]]\nsubject = \"bench.reload\"\n",
    );
    let cache = tempfile::tempdir().expect("cache dir");
    let host = natsfn::Host::builder()
        .nats_url(server.url())
        .handlers_dir(dir.path())
        .cache_dir(cache.path())
        .build()
        .await
        .expect("build")
        .start()
        .await
        .expect("start");
    host.watch(|_| {}).expect("watch");
    let client = async_nats::connect(server.url()).await.expect("connect");

    let cold = swap(&client, &dir, "tagb", "B").await; // B never compiled
    let warm_a = swap(&client, &dir, "taga", "A").await; // A cached at start
    let warm_b = swap(&client, &dir, "tagb", "B").await; // B cached by the first swap
    host.shutdown().await;
    println!("file replaced -> new version serving (includes the watcher's 300 ms settle time)");
    println!("cold (compile):   {:>8.1} ms", cold.as_secs_f64() * 1e3);
    println!("warm (cache hit): {:>8.1} ms, {:.1} ms", warm_a.as_secs_f64() * 1e3, warm_b.as_secs_f64() * 1e3);
}
