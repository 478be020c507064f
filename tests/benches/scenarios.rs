//! natsfn's named benchmark scenarios, each run natively and through
//! natsfn back to back against a fresh local nats-server (see
//! `natsfn::bench` for the method, BENCHMARKS.md for the figures):
//!
//! `cargo bench -p natsfn-e2e --bench scenarios -- --json target/bench.json`
//!
//! Flags: `--json PATH` writes the JSON report; `--only NAME[,NAME]` runs a
//! subset; `--scale F` multiplies every message count (`0.1` for a quick
//! look); `--rounds N` measures each scenario N times, alternating which
//! side goes first, and reports medians (`natsfn bench --rounds`).

use natsfn::bench::{self, Machine, Mode, Report, Scenario, NATIVE_JETSTREAM_WINDOW};

use natsfn_e2e::{nats, HandlerDir};

/// A scenario and the manifest body (triggers, limits...) of its handler.
struct Case {
    scenario: Scenario,
    guest: &'static str,
    manifest: String,
}

fn case(name: &str, mode: Mode, payload_size: usize, messages: u64, concurrency: usize) -> Case {
    let subject = format!("bench.{name}");
    let trigger = match &mode {
        // The same window of unacknowledged messages as the native consumer
        // (with the default, 32, a handler gets about half to two thirds of
        // the throughput: BENCHMARKS.md).
        Mode::JetStream { stream } => format!(
            "[limits]\nmax_concurrency = {NATIVE_JETSTREAM_WINDOW}\n\
             [[trigger]]\njetstream = {{ stream = \"{stream}\", durable = \"natsfn\" }}"
        ),
        Mode::Publish | Mode::Request => format!("[[trigger]]\nsubject = \"{subject}\""),
    };
    Case {
        scenario: Scenario { name: name.into(), mode, subject, payload_size, messages, concurrency, output: None },
        guest: "mirror",
        manifest: trigger,
    }
}

fn cases() -> Vec<Case> {
    let mut fan = case("fan-through", Mode::Publish, 128, 100_000, 1);
    fan.scenario.output = Some("bench.fan-through.out".into());
    fan.guest = "fanout";
    fan.manifest +=
        "\n[permissions]\npublish = [\"bench.fan-through.out\"]\n[config]\ntargets = \"bench.fan-through.out\"";
    let reused = |mut c: Case| {
        c.manifest = format!("instance = \"reuse\"\n{}", c.manifest);
        c
    };
    let reuse = reused(case("core-sub-reuse", Mode::Publish, 128, 500_000, 1));
    // Not one of the scenarios: JetStream without the fresh
    // instance, to show what the instance costs there.
    let jetstream_reuse =
        reused(case("jetstream-ack-reuse", Mode::JetStream { stream: "BENCH".into() }, 128, 50_000, 1));
    vec![
        case("core-sub", Mode::Publish, 128, 200_000, 1),
        case("req-reply-128", Mode::Request, 128, 20_000, 1),
        case("req-reply-16k", Mode::Request, 16 * 1024, 10_000, 1),
        case("req-reply-c32", Mode::Request, 128, 100_000, 32),
        case("jetstream-ack", Mode::JetStream { stream: "BENCH".into() }, 128, 50_000, 1),
        fan,
        reuse,
        jetstream_reuse,
    ]
}

/// How many handlers the idle-memory measurement loads.
const IDLE_HANDLERS: usize = 100;

/// The flag that makes this binary a child that only measures
/// [`idle_rss`] and prints it.
const IDLE_CHILD: &str = "--idle-rss-child";

/// [`idle_rss`] measured in a fresh process (this binary again, with
/// [`IDLE_CHILD`]): after the scenarios, this process's allocator keeps
/// what their phases used, which a host that only ever held idle handlers
/// would never have had.
fn idle_rss_in_child() -> f64 {
    let exe = std::env::current_exe().expect("this benchmark's path");
    let out = std::process::Command::new(exe).arg(IDLE_CHILD).output().expect("run the idle-memory child");
    assert!(out.status.success(), "idle-memory child failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("the child prints MiB")
}

/// Resident memory of this process with [`IDLE_HANDLERS`] handlers (the
/// mirror guest, one subject each) loaded, bound and idle, in MiB.
async fn idle_rss(server: &natsfn::NatsServer) -> f64 {
    let dir = HandlerDir::new();
    for i in 0..IDLE_HANDLERS {
        dir.add(&format!("h{i}"), &format!("h{i}"), "mirror", &format!("[[trigger]]\nsubject = \"idle.{i}\""));
    }
    let host = natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path()).build().await.expect("build");
    let running = host.start().await.expect("start");
    assert_eq!(running.handlers().len(), IDLE_HANDLERS);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    running.shutdown().await;
    kib / 1024.0
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == IDLE_CHILD) {
        println!("{}", idle_rss(&nats()).await);
        return;
    }
    let scale: f64 = flag(&args, "--scale").map_or(1.0, |s| s.parse().expect("--scale takes a number"));
    let only: Option<Vec<String>> = flag(&args, "--only").map(|s| s.split(',').map(str::to_owned).collect());
    let rounds: u32 = flag(&args, "--rounds").map_or(1, |s| s.parse().expect("--rounds takes a count"));
    let mut results = Vec::new();
    let mut machine: Option<Machine> = None;
    for mut c in cases() {
        if only.as_ref().is_some_and(|o| !o.contains(&c.scenario.name)) {
            continue;
        }
        c.scenario.messages = ((c.scenario.messages as f64 * scale) as u64).max(100);
        let server = nats();
        if machine.is_none() {
            machine = Some(Machine::detect(&server.url()).await.expect("describe the machine"));
        }
        let dir = HandlerDir::new();
        dir.add("handler", "handler", c.guest, &c.manifest);
        let host = || natsfn::Host::builder().handlers_dir(dir.path());
        eprintln!("running {} ({} messages per side, {rounds} rounds)", c.scenario.name, c.scenario.messages);
        let result = bench::run(&server.url(), &c.scenario, rounds, host)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.scenario.name));
        results.push(result);
    }
    let server = nats();
    let idle = bench::IdleMemory { handlers: IDLE_HANDLERS, rss_mb: idle_rss_in_child() };
    let client = async_nats::connect(server.url()).await.expect("connect");
    let wasm = std::fs::read(natsfn_e2e::guest("mirror")).expect("read the mirror guest");
    let cost = bench::instance_cost(client, &wasm, (20_000.0 * scale) as u32 + 100).await.expect("instance cost");
    let machine = match machine {
        Some(m) => m,
        None => Machine::detect(&server.url()).await.expect("describe the machine"),
    };
    let report = Report { machine, scenarios: results, instance_cost: Some(cost), idle: Some(idle) };
    print!("{}", report.table());
    if let Some(path) = flag(&args, "--json") {
        report.write_json(path.as_ref()).expect("write the JSON report");
        eprintln!("wrote {path}");
    }
}
