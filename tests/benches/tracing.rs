//! Throughput with tracing off and on, in the same run:
//! `cargo bench -p natsfn-e2e --bench tracing`.
//!
//! A trivial echo handler serves N messages, three times per mode, alternating
//! off/on so drift on a shared machine hits both. "Off" runs with no
//! subscriber at all (natsfn's spans are disabled at their call sites); "on"
//! samples 100% and exports over OTLP/gRPC to a receiver in this process.
//! Two workloads: request/reply with 64 requests in flight, and publish-only
//! (the handler's own throughput, replies not involved). Prints msgs/s and
//! the on/off ratio; nothing is asserted.
//!
//! `NATSFN_BENCH_N` sets N (default 20000); `NATSFN_BENCH_WORKLOAD=request`
//! or `publish` runs one workload only; `NATSFN_BENCH_PROTOCOL=http/protobuf`
//! exports over OTLP/HTTP instead of gRPC.

use std::time::{Duration, Instant};

use futures::StreamExt;
use natsfn::telemetry::{Otlp, OtlpPipeline, Protocol, Sampler};
use natsfn_e2e::otlp::OtlpReceiver;
use natsfn_e2e::*;

/// Off/on pairs per workload; the best and the median of each are reported,
/// since other work on the machine only ever makes a run slower.
const ROUNDS: usize = 3;

#[derive(Clone, Copy, Debug)]
enum Workload {
    Request,
    Publish,
}

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore any arguments.
    let n: usize = std::env::var("NATSFN_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("echo", "echo", "echo", "[[trigger]]\nsubject = \"bench.echo\"\n[limits]\nmax_concurrency = 64");
    // Named threads, so a profiler can tell the receiver's share apart.
    let collector = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-receiver")
        .enable_all()
        .build()
        .expect("receiver runtime");
    let protocol = match std::env::var("NATSFN_BENCH_PROTOCOL").as_deref() {
        Ok("http/protobuf") => Protocol::HttpProtobuf,
        _ => Protocol::Grpc,
    };
    let receiver = collector.block_on(OtlpReceiver::counting(protocol));
    let pipeline = Otlp::new()
        .protocol(protocol)
        .endpoint(receiver.endpoint())
        .sampler(Sampler::AlwaysOn)
        .build()
        .expect("build pipeline");

    println!("natsfn tracing benchmark: {n} messages per run, echo handler");
    let workloads = match std::env::var("NATSFN_BENCH_WORKLOAD").as_deref() {
        Ok("request") => vec![Workload::Request],
        Ok("publish") => vec![Workload::Publish],
        _ => vec![Workload::Request, Workload::Publish],
    };
    for workload in workloads {
        let mut off = Vec::new();
        let mut on = Vec::new();
        for round in 0..ROUNDS {
            for traced in [false, true] {
                let rate = run(&server, &dir, traced.then_some(&pipeline), workload, n);
                println!(
                    "  {workload:?} round {round} tracing {}: {rate:>8.0} msgs/s",
                    if traced { "on " } else { "off" }
                );
                if traced { &mut on } else { &mut off }.push(rate);
            }
        }
        let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (best_off, best_on) = (best(&off), best(&on));
        let (median_off, median_on) = (median(&mut off), median(&mut on));
        println!(
            "{workload:?}: best off {best_off:.0} / on {best_on:.0} msgs/s, on/off = {:.3}; \
             median off {median_off:.0} / on {median_on:.0} msgs/s, on/off = {:.3}",
            best_on / best_off,
            median_on / median_off,
        );
    }
    pipeline.force_flush();
    let stats = pipeline.stats();
    println!("export: {stats:?}; receiver got {} spans", receiver.count());
    pipeline.shutdown();
    drop(collector);
}

/// Serves `n` messages of `workload` on a fresh host and runtime traced by
/// `pipeline` (or by nothing), and returns messages per second.
fn run(server: &NatsServer, dir: &HandlerDir, pipeline: Option<&OtlpPipeline>, workload: Workload, n: usize) -> f64 {
    let rt = runtime_with(pipeline.map(otlp_dispatch));
    rt.block_on(async {
        let host = start_host(server, dir).await;
        let client = client(server).await;
        // Warm-up: first instantiations, connection buffers.
        requests(&client, 500).await;
        let before = host.handler_stats("echo").unwrap().ok;
        let started = Instant::now();
        match workload {
            Workload::Request => requests(&client, n).await,
            Workload::Publish => {
                for i in 0..n {
                    client.publish("bench.echo", i.to_string().into()).await.expect("publish");
                }
                client.flush().await.expect("flush");
                let deadline = Instant::now() + Duration::from_secs(120);
                while host.handler_stats("echo").unwrap().ok < before + n as u64 {
                    assert!(Instant::now() < deadline, "messages were lost");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        host.shutdown().await;
        rate
    })
}

async fn requests(client: &async_nats::Client, n: usize) {
    futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move { request(&client, "bench.echo", &i.to_string()).await }
        })
        .buffer_unordered(64)
        .for_each(|_| async {})
        .await;
}
