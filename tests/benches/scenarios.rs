//! natsfn's named benchmark scenarios, each run natively and through
//! natsfn back to back against a fresh local nats-server (see
//! `natsfn::bench` for the method, BENCHMARKS.md for the figures):
//!
//! `cargo bench -p natsfn-e2e --bench scenarios -- --json target/bench.json`
//!
//! Flags: see [`USAGE`]. An unknown flag or scenario name is an error that
//! names it, so a typo never silently runs the whole (long) suite.

use std::path::PathBuf;

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
    // Nor this: req-reply-128 without the fresh instance.
    let req_reply_reuse = reused(case("req-reply-reuse", Mode::Request, 128, 20_000, 1));
    // Nor this: core-sub with `mirror` built without the standard library,
    // to show what the guest's shape costs a fresh instance.
    let mut bare = case("core-sub-bare", Mode::Publish, 128, 200_000, 1);
    bare.guest = "mirror_bare";
    vec![
        case("core-sub", Mode::Publish, 128, 200_000, 1),
        case("req-reply-128", Mode::Request, 128, 20_000, 1),
        case("req-reply-16k", Mode::Request, 16 * 1024, 10_000, 1),
        case("req-reply-c32", Mode::Request, 128, 100_000, 32),
        case("jetstream-ack", Mode::JetStream { stream: "BENCH".into() }, 128, 50_000, 1),
        fan,
        reuse,
        jetstream_reuse,
        bare,
        req_reply_reuse,
    ]
}

/// The guests whose instance cost is measured in isolation: the trivial
/// guest as most handlers are built (with `std`), and without `std`.
const INSTANCE_COST_GUESTS: [&str; 2] = ["mirror", "mirror_bare"];

/// How many handlers the idle-memory measurement loads.
const IDLE_HANDLERS: usize = 100;

/// The flag that makes this binary a child that only measures
/// [`idle_rss`] and prints it; after it, `same`, or `distinct CACHE_DIR`.
const IDLE_CHILD: &str = "--idle-rss-child";

/// What the idle handlers run.
enum IdleComponents {
    /// All the mirror guest: one component, compiled once, shared.
    Same,
    /// Each a [`natsfn_e2e::distinct_copy`] of the mirror guest, compiled
    /// on its own, with this compiled-code cache.
    Distinct { cache: PathBuf },
}

/// The idle memory, each figure measured in a fresh process (this binary
/// again, with [`IDLE_CHILD`]): after the scenarios, this process's
/// allocator keeps what their phases used, which a host that only ever
/// held idle handlers would never have had. The distinct components are
/// loaded twice with one cache: a first start, then a restart.
fn idle_memory() -> bench::IdleMemory {
    let cache_dir = tempfile::tempdir().expect("a compiled-code cache folder");
    let cache = cache_dir.path().to_str().expect("a UTF-8 temp path");
    bench::IdleMemory {
        handlers: IDLE_HANDLERS,
        rss_mb: idle_rss_in_child(&["same"]),
        distinct: Some(bench::DistinctIdle {
            first_start_mb: idle_rss_in_child(&["distinct", cache]),
            restart_mb: idle_rss_in_child(&["distinct", cache]),
        }),
    }
}

/// [`idle_rss`] in a child process given `args` after [`IDLE_CHILD`].
fn idle_rss_in_child(args: &[&str]) -> f64 {
    let exe = std::env::current_exe().expect("this benchmark's path");
    let out = std::process::Command::new(exe).arg(IDLE_CHILD).args(args).output().expect("run the idle-memory child");
    assert!(out.status.success(), "idle-memory child failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().expect("the child prints MiB")
}

/// The child's side of [`idle_rss_in_child`]: `args` are those after
/// [`IDLE_CHILD`].
fn idle_components(args: &[String]) -> IdleComponents {
    match args {
        [same] if same == "same" => IdleComponents::Same,
        [distinct, cache] if distinct == "distinct" => IdleComponents::Distinct { cache: cache.into() },
        other => panic!("{IDLE_CHILD}: expected `same` or `distinct CACHE_DIR`, got {other:?}"),
    }
}

/// Resident memory of this process with [`IDLE_HANDLERS`] handlers (one
/// subject each) loaded, bound and idle, in MiB.
async fn idle_rss(server: &natsfn::NatsServer, components: IdleComponents) -> f64 {
    let dir = HandlerDir::new();
    let mut builder = natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path());
    let trigger = |i| format!("[[trigger]]\nsubject = \"idle.{i}\"");
    match components {
        IdleComponents::Same => {
            for i in 0..IDLE_HANDLERS {
                dir.add(&format!("h{i}"), &format!("h{i}"), "mirror", &trigger(i));
            }
        }
        IdleComponents::Distinct { cache } => {
            let wasm = std::fs::read(natsfn_e2e::guest("mirror")).expect("read the mirror guest");
            for i in 0..IDLE_HANDLERS {
                dir.write_bytes(&format!("h{i}.wasm"), &natsfn_e2e::distinct_copy(&wasm, i));
                dir.write(
                    &format!("h{i}.toml"),
                    &format!("name = \"h{i}\"\ncomponent = \"h{i}.wasm\"\n{}\n", trigger(i)),
                );
            }
            builder = builder.cache_dir(cache);
        }
    }
    let host = builder.build().await.expect("build");
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

const USAGE: &str = "\
usage: scenarios [--only NAME[,NAME...]|none] [--scale F] [--rounds N] [--json PATH]
  --only    run these scenarios only; `none` runs none (only the instance cost and idle memory)
  --scale   multiply every scenario's message count by F (0.1 for a quick look)
  --rounds  measure each scenario N times, alternating which side goes first; report medians
  --json    also write the report as JSON to PATH";

/// What the command line asks for.
struct Options {
    only: Option<Vec<String>>,
    scale: f64,
    rounds: u32,
    json: Option<String>,
}

/// Reads the command line (without the program name): `None` for `--help`,
/// `Err` saying what is wrong. `known` are the scenarios' names.
fn options(args: &[String], known: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options { only: None, scale: 1.0, rounds: 1, json: None };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().cloned().ok_or_else(|| format!("{arg} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--only" => {
                let names: Vec<String> = value()?.split(',').map(str::to_owned).collect();
                if let Some(bad) = names.iter().find(|n| *n != "none" && !known.contains(n)) {
                    return Err(format!("--only: no scenario `{bad}`; there are: {}", known.join(", ")));
                }
                o.only = Some(names);
            }
            "--scale" => {
                let v = value()?;
                o.scale = v
                    .parse()
                    .ok()
                    .filter(|f: &f64| *f > 0.0)
                    .ok_or(format!("--scale: `{v}` is not a positive number"))?;
            }
            "--rounds" => {
                let v = value()?;
                o.rounds =
                    v.parse().ok().filter(|n| *n > 0).ok_or(format!("--rounds: `{v}` is not a count of 1 or more"))?;
            }
            "--json" => o.json = Some(value()?),
            // cargo bench passes this to every benchmark binary.
            "--bench" => {}
            "--help" | "-h" => return Ok(None),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    Ok(Some(o))
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == IDLE_CHILD) {
        println!("{}", idle_rss(&nats(), idle_components(&args[at + 1..])).await);
        return;
    }
    let known: Vec<String> = cases().into_iter().map(|c| c.scenario.name).collect();
    let Options { only, scale, rounds, json } = match options(&args, &known) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return;
        }
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
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
        let result = bench::run(&bench::Server::local(&server), &c.scenario, rounds, host)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", c.scenario.name));
        results.push(result);
    }
    let server = nats();
    let idle = idle_memory();
    let client = async_nats::connect(server.url()).await.expect("connect");
    let mut instance_costs = Vec::new();
    for guest in INSTANCE_COST_GUESTS {
        let wasm = std::fs::read(natsfn_e2e::guest(guest)).unwrap_or_else(|e| panic!("read the {guest} guest: {e}"));
        let iterations = (20_000.0 * scale) as u32 + 100;
        let cost = bench::instance_cost(client.clone(), &wasm, iterations).await.expect("instance cost");
        instance_costs.push(bench::GuestCost { guest: guest.into(), cost });
    }
    let machine = match machine {
        Some(m) => m,
        None => Machine::detect(&server.url()).await.expect("describe the machine"),
    };
    let report = Report { machine, scenarios: results, instance_costs, idle: Some(idle) };
    print!("{}", report.table());
    if let Some(path) = json {
        report.write_json(path.as_ref()).expect("write the JSON report");
        eprintln!("wrote {path}");
    }
}
