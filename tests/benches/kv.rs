//! KV get/put throughput from a guest (one host call per operation, on a
//! fresh instance) against the same calls from native async-nats, same run,
//! same local nats-server. Both sides make the calls one after another, so
//! the difference is what a host call costs on top of the NATS round trip.
//!
//! `cargo bench -p natsfn-e2e --bench kv` (`BENCH_OPS` sets the count).

use std::time::{Duration, Instant};

use async_nats::jetstream;
use natsfn::{BucketKind, BucketSpec};
use natsfn_e2e::{guest, nats, HandlerDir};

#[tokio::main]
async fn main() {
    let n: u32 = std::env::var("BENCH_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let server = nats();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let dir = HandlerDir::new();
    dir.add(
        "kv",
        "kv",
        "kvcounter",
        "[[trigger]]\nsubject = \"bench\"\n[limits]\ntimeout_ms = 600000\n[permissions]\nkv = { bench = \"write\" }\n[config]\nbucket = \"bench\"",
    );
    assert!(guest("kvcounter").is_file());
    let host = natsfn::Host::builder()
        .nats_url(server.url())
        .handlers_dir(dir.path())
        .bucket(BucketSpec::parse(BucketKind::Kv, "bench").expect("spec"))
        .build()
        .await
        .expect("build")
        .start()
        .await
        .expect("start");

    let store = jetstream::new(client.clone()).get_key_value("bench").await.expect("bucket");
    let start = Instant::now();
    for i in 0..n {
        store.put(format!("native.{i}"), "0123456789abcdef".into()).await.expect("put");
    }
    let native_put = start.elapsed();
    let start = Instant::now();
    for i in 0..n {
        store.get(format!("native.{i}")).await.expect("get");
    }
    let native_get = start.elapsed();

    let start = Instant::now();
    let req = async_nats::Request::new().payload(format!("bench {n}").into()).timeout(Some(Duration::from_secs(600)));
    let reply = client.send_request("bench", req).await.expect("guest bench");
    assert_eq!(reply.payload.as_ref(), b"ok");
    let guest_both = start.elapsed();
    host.shutdown().await;

    let rate = |d: Duration, ops: u32| f64::from(ops) / d.as_secs_f64();
    let native_both = native_put + native_get;
    println!("KV put + get, {n} of each, sequential, 16 B values");
    println!("{:<34} {:>12}", "path", "ops/s");
    println!("{:<34} {:>12.0}", "native async-nats put", rate(native_put, n));
    println!("{:<34} {:>12.0}", "native async-nats get", rate(native_get, n));
    println!("{:<34} {:>12.0}", "native put+get", rate(native_both, 2 * n));
    println!("{:<34} {:>12.0}", "guest host calls put+get", rate(guest_both, 2 * n));
    println!("ratio guest/native: {:.2}", native_both.as_secs_f64() / guest_both.as_secs_f64());
}
