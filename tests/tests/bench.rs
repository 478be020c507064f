//! `natsfn bench` and the bench library end to end, with message counts too
//! small to mean anything: these check that every scenario kind runs both
//! sides to completion and reports every field, never how fast it was
//! (speed lives in `benches/`, see BENCHMARKS.md).

use natsfn::bench::{self, Mode, Scenario};
use natsfn_e2e::*;
use serde_json::Value;

/// Every per-side field of the JSON report, with a sane value.
fn check_side(side: &Value, timed: bool) {
    for field in ["msgs_per_sec", "cpu_us_per_msg", "peak_rss_mb"] {
        let v = side[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {side}"));
        assert!(v > 0.0 && v.is_finite(), "{field} = {v}");
    }
    for field in ["p50_us", "p90_us", "p99_us", "p999_us"] {
        if timed {
            let v = side[field].as_f64().unwrap_or_else(|| panic!("{field} missing in {side}"));
            assert!(v > 0.0, "{field} = {v}");
        } else {
            assert!(side[field].is_null(), "{field} is only timed for requests: {side}");
        }
    }
    assert!(side["p50_us"].as_f64() <= side["p99_us"].as_f64());
    let server_cpu = &side["server_cpu_us_per_msg"];
    assert!(server_cpu.is_null() || server_cpu.as_f64().is_some_and(|c| c > 0.0), "{side}");
}

fn check_report(json: &Value, names: &[&str], timed: bool) {
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!json["machine"]["nats_server"].as_str().unwrap().is_empty());
    let scenarios = json["scenarios"].as_array().expect("scenarios");
    let got: Vec<&str> = scenarios.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(got, names);
    for s in scenarios {
        check_side(&s["natsfn"], timed);
        check_side(&s["native"], timed);
        assert!(s["ratio"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn the_bench_command_writes_a_table_and_json() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("mirror", "mirror", "mirror", "[[trigger]]\nsubject = \"bench.cli\"");
    let out = tempfile::tempdir().unwrap();
    let json_path = out.path().join("bench.json");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_natsfn-cli"))
        .args(["bench", "--handlers", dir.path().to_str().unwrap(), "--subject", "bench.cli", "--mode", "request"])
        .args(["--messages", "200", "--concurrency", "4", "--name", "cli-echo", "--nats", &server.url()])
        .args(["--rounds", "2", "--instance-iterations", "100"])
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run natsfn bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("cli-echo") && stdout.contains("natsfn") && stdout.contains("native"), "{stdout}");
    assert!(stdout.contains("cli-echo: medians of 2 rounds; ratio per round"), "{stdout}");
    assert!(stdout.contains("instantiate + call + drop of mirror, in isolation"), "{stdout}");
    let json: Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    check_report(&json, &["cli-echo"], true);
    // The handler's own instance cost, named after it.
    let costs = json["instance_cost_us"].as_array().unwrap();
    assert_eq!(costs.len(), 1, "{costs:?}");
    assert_eq!(costs[0]["guest"], "mirror");
    for mode in ["fresh", "reuse"] {
        assert!(costs[0][mode].as_f64().is_some_and(|us| us > 0.0), "{mode}: {costs:?}");
    }
    // Two rounds: the ratio is the median of the two, their mean.
    let scenario = &json["scenarios"][0];
    let rounds: Vec<f64> = scenario["round_ratios"].as_array().unwrap().iter().map(|r| r.as_f64().unwrap()).collect();
    assert_eq!(rounds.len(), 2, "{scenario}");
    let ratio = scenario["ratio"].as_f64().unwrap();
    assert!((ratio - (rounds[0] + rounds[1]) / 2.0).abs() < 1e-9, "{ratio} vs {rounds:?}");
}

/// Fire-and-forget, fan-through and JetStream through the library.
#[tokio::test]
async fn every_scenario_kind_runs_both_sides_to_completion() {
    let server = nats();
    let url = server.url();
    let machine = bench::Machine::detect(&url).await.unwrap();
    let scenario = |name: &str, mode: Mode, output: Option<&str>| Scenario {
        name: name.into(),
        mode,
        subject: format!("bench.{name}"),
        payload_size: 128,
        messages: 300,
        concurrency: 1,
        output: output.map(Into::into),
    };
    let cases = [
        (scenario("sub", Mode::Publish, None), "mirror", "[[trigger]]\nsubject = \"bench.sub\""),
        (
            scenario("fan", Mode::Publish, Some("bench.fan.out")),
            "fanout",
            "[[trigger]]\nsubject = \"bench.fan\"\n[permissions]\npublish = [\"bench.fan.out\"]\n[config]\ntargets = \"bench.fan.out\"",
        ),
        (
            scenario("js", Mode::JetStream { stream: "BENCHJS".into() }, None),
            "mirror",
            "[[trigger]]\njetstream = { stream = \"BENCHJS\", durable = \"natsfn\" }",
        ),
    ];
    let mut results = Vec::new();
    for (s, guest_name, manifest) in cases {
        let dir = HandlerDir::new();
        dir.add("h", "h", guest_name, manifest);
        let host = || natsfn::Host::builder().handlers_dir(dir.path());
        let r =
            bench::run(&bench::Server::local(&server), &s, 1, host).await.unwrap_or_else(|e| panic!("{}: {e}", s.name));
        assert_eq!((r.natsfn.messages, r.native.messages), (300, 300));
        // The server runs here, so its CPU time is measured: never nothing,
        // since it routed every message.
        for side in [&r.natsfn, &r.native] {
            let server_cpu = side.server_cpu_us_per_msg.unwrap_or_else(|| panic!("{}: no server CPU", s.name));
            assert!(server_cpu > 0.0 && server_cpu.is_finite(), "{}: {server_cpu}", s.name);
        }
        results.push(r);
    }
    let report = bench::Report { machine, scenarios: results, instance_costs: Vec::new(), idle: None };
    check_report(&report.to_json(), &["sub", "fan", "js"], false);
    assert!(report.table().lines().count() >= 8);
}

/// The instance's own cost: both modes measured, and the fresh figure split
/// into steps that each took time and together make the whole.
#[tokio::test]
async fn instance_cost_splits_a_fresh_message_into_its_steps() {
    let server = nats();
    let client = async_nats::connect(server.url()).await.unwrap();
    let wasm = std::fs::read(guest("mirror")).unwrap();
    let cost = bench::instance_cost(client, &wasm, 50).await.unwrap();
    let s = cost.fresh_steps;
    for (step, us) in
        [("store", s.store_us), ("instantiate", s.instantiate_us), ("call", s.call_us), ("drop", s.drop_us)]
    {
        assert!(us > 0.0 && us.is_finite(), "{step} = {us} µs");
    }
    assert_eq!(cost.fresh_us, s.total());
    assert!(cost.reuse_us > 0.0 && cost.reuse_us.is_finite(), "reuse = {} µs", cost.reuse_us);
    let report = bench::Report {
        machine: bench::Machine::detect(&server.url()).await.unwrap(),
        scenarios: Vec::new(),
        instance_costs: vec![bench::GuestCost { guest: "mirror".into(), cost }],
        idle: Some(bench::IdleMemory {
            handlers: 100,
            rss_mb: 26.5,
            distinct: Some(bench::DistinctIdle { first_start_mb: 47.3, restart_mb: 36.5 }),
        }),
    };
    let json = report.to_json();
    assert_eq!(json["instance_cost_us"][0]["guest"], "mirror");
    assert_eq!(json["instance_cost_us"][0]["fresh_steps"]["instantiate"].as_f64(), Some(s.instantiate_us));
    assert_eq!(json["idle"]["rss_mb"].as_f64(), Some(26.5));
    assert_eq!(json["idle"]["distinct"]["first_start_rss_mb"].as_f64(), Some(47.3));
    assert_eq!(json["idle"]["distinct"]["restart_rss_mb"].as_f64(), Some(36.5));
    let table = report.table();
    assert!(table.contains("of mirror, in isolation"), "{table}");
    assert!(
        table.contains("RSS with 100 handlers loaded and idle: 26.5 MiB; with a distinct component each: 47.3 MiB on a first start, 36.5 MiB on a restart"),
        "{table}"
    );
}
