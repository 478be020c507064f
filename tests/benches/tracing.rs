//! Throughput with tracing off and on, in the same run:
//! `cargo bench -p natsfn-e2e --bench tracing`.
//!
//! A trivial echo handler serves N messages, three times per mode, alternating
//! off/on so drift on a shared machine hits both. "Off" runs a host with no
//! tracer (it makes no spans at all); "on" samples 100% and exports over
//! OTLP/gRPC to a receiver in this process. Two workloads: request/reply with
//! 64 requests in flight, and publish-only (the handler's own throughput,
//! replies not involved). Prints msgs/s, the on/off ratio, and the process's
//! CPU time per message (an "on" run is charged until its spans are
//! exported), with the receiver's share given apart, since a real collector
//! would not run on the host's cores; nothing is asserted.
//!
//! `NATSFN_BENCH_N` sets N (default 20000); `NATSFN_BENCH_WORKLOAD=request`
//! or `publish` runs one workload only; `NATSFN_BENCH_PROTOCOL=http/protobuf`
//! exports over OTLP/HTTP instead of gRPC.

use std::time::{Duration, Instant};

use futures::StreamExt;
use natsfn::bench::process_cpu;
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
        .thread_name(RECEIVER_THREAD)
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
        let mut cpu = [Vec::new(), Vec::new()];
        for round in 0..ROUNDS {
            for traced in [false, true] {
                let run = run(&server, &dir, traced.then_some(&pipeline), workload, n);
                println!(
                    "  {workload:?} round {round} tracing {}: {:>8.0} msgs/s, CPU {:.1} µs/msg ({:.1} of it the receiver)",
                    if traced { "on " } else { "off" },
                    run.rate,
                    run.cpu_us,
                    run.receiver_us,
                );
                if traced { &mut on } else { &mut off }.push(run.rate);
                cpu[usize::from(traced)].push(run.cpu_us - run.receiver_us);
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
        let (cpu_off, cpu_on) = (median(&mut cpu[0]), median(&mut cpu[1]));
        println!(
            "{workload:?}: median CPU without the receiver: off {cpu_off:.1} / on {cpu_on:.1} µs/msg, \
             tracing costs {:.1} µs/msg ({:.0} %)",
            cpu_on - cpu_off,
            (cpu_on - cpu_off) / cpu_on * 100.0,
        );
    }
    pipeline.force_flush();
    let stats = pipeline.stats();
    println!("export: {stats:?}; receiver got {} spans", receiver.count());
    pipeline.shutdown();
    drop(collector);
}

/// What one run measured.
struct Run {
    rate: f64,
    /// CPU time of the whole process per message.
    cpu_us: f64,
    /// The part of `cpu_us` spent on the receiver's thread.
    receiver_us: f64,
}

/// Serves `n` messages of `workload` on a fresh host and runtime traced by
/// `pipeline` (or by nothing).
fn run(server: &NatsServer, dir: &HandlerDir, pipeline: Option<&OtlpPipeline>, workload: Workload, n: usize) -> Run {
    let rt = runtime();
    let (rate, cpu, receiver) = rt.block_on(async {
        let host = start_traced_host(server, dir, pipeline.map(OtlpPipeline::tracer)).await;
        let client = client(server).await;
        // Warm-up: first instantiations, connection buffers.
        requests(&client, 500).await;
        if let Some(p) = pipeline {
            tokio::task::block_in_place(|| p.force_flush());
        }
        let before = host.handler_stats("echo").unwrap().ok;
        let (cpu_before, receiver_before) = (process_cpu(), thread_cpu(RECEIVER_THREAD));
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
        // The run's spans are its cost too: charge their export to it.
        if let Some(p) = pipeline {
            tokio::task::block_in_place(|| p.force_flush());
        }
        let cpu = process_cpu().saturating_sub(cpu_before);
        let receiver = thread_cpu(RECEIVER_THREAD).saturating_sub(receiver_before);
        host.shutdown().await;
        (rate, cpu, receiver)
    });
    let per_msg = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Run { rate, cpu_us: per_msg(cpu), receiver_us: per_msg(receiver) }
}

/// The receiver runtime's thread name.
const RECEIVER_THREAD: &str = "otlp-receiver";

/// CPU time (user + system) of this process's threads named `name`, from
/// `/proc/self/task/*/stat`, in clock ticks of 10 ms: coarse, but a run
/// lasts seconds.
fn thread_cpu(name: &str) -> Duration {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // `pid (comm) state ...`: comm may hold spaces, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        if head.split_once('(').map(|(_, comm)| comm) != Some(name) {
            continue;
        }
        // After the comm: state is field 3, utime 14 and stime 15.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Duration::from_millis(ticks * 10)
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
