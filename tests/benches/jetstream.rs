//! JetStream consume + ack throughput: natsfn running a trivial wasm handler
//! (a fresh instance per message, host acks on success) against a native
//! async-nats pull consumer doing the same acks, in the same run, against
//! the same local nats-server with file storage.
//!
//! `cargo bench -p natsfn-e2e --bench jetstream` (set `BENCH_MESSAGES` to
//! change the count). Prints msgs/s for both and the ratio.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, consumer::AckPolicy, stream};
use futures::StreamExt;
use natsfn_e2e::{guest, nats, HandlerDir};

const PAYLOAD: [u8; 128] = [b'x'; 128];

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let server = nats();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("stream");
    let published = futures::stream::iter(0..n)
        .map(|_| {
            let js = js.clone();
            async move { js.publish("bench.in", PAYLOAD.to_vec().into()).await.expect("publish").await.expect("ack") }
        })
        .buffer_unordered(512)
        .count()
        .await;
    assert_eq!(published, n);

    let native = native(&js, n).await;
    let wasm = natsfn(&server, n).await;
    println!("JetStream consume + ack, {n} x 128 B, file storage");
    println!("{:<28} {:>12}", "path", "msgs/s");
    println!("{:<28} {:>12.0}", "native async-nats", native);
    println!("{:<28} {:>12.0}", "natsfn (wasm, fresh inst.)", wasm);
    println!("ratio natsfn/native: {:.2}", wasm / native);
}

/// A durable pull consumer acking every message, as an application would.
async fn native(js: &jetstream::Context, n: usize) -> f64 {
    let stream = js.get_stream("BENCH").await.expect("stream");
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("native".into()),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let start = Instant::now();
    let mut messages = consumer.stream().max_messages_per_batch(256).messages().await.expect("messages");
    let mut done = 0;
    while done < n {
        let m = messages.next().await.expect("stream ended").expect("message");
        m.ack().await.expect("ack");
        done += 1;
    }
    // The last acks must reach the server for the comparison to be fair.
    js.client().flush().await.expect("flush");
    n as f64 / start.elapsed().as_secs_f64()
}

async fn natsfn(server: &natsfn::NatsServer, n: usize) -> f64 {
    let dir = HandlerDir::new();
    dir.add(
        "trivial",
        "trivial",
        "echo",
        "[[trigger]]\njetstream = { stream = \"BENCH\", durable = \"wasm\" }\n[limits]\nmax_concurrency = 64",
    );
    assert!(guest("echo").is_file());
    let host = natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path()).build().await.expect("build");
    let start = Instant::now();
    let running = host.start().await.expect("start");
    while running.handler_stats("trivial").map_or(0, |s| s.acked) < n as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    running.shutdown().await;
    n as f64 / elapsed.as_secs_f64()
}
