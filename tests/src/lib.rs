//! Support for natsfn's end-to-end tests: a real `nats-server` per test, the
//! guest components built once from `guests/`, handler directories written
//! on the fly, and the `natsfn` binary for tests that drive the CLI.
//!
//! Nothing here mocks NATS. Every test talks to a server process started on
//! a free loopback port with JetStream and a temporary store, which is killed
//! and removed when the test's [`natsfn::NatsServer`] is dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use futures::StreamExt;

pub use natsfn::NatsServer;

/// The workspace root (the folder with the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds every guest in `guests/` once per test process (cargo makes
/// concurrent processes wait for each other) and returns the path of the
/// component for crate `name`.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let guests = workspace_root().join("guests");
        // The components are looked for under guests/target: a target
        // directory set for the host build must not send them elsewhere.
        let status = cargo()
            .current_dir(&guests)
            .env_remove("CARGO_TARGET_DIR")
            .args(["build", "--release", "--quiet"])
            .status()
            .expect("run cargo to build the guests");
        assert!(status.success(), "building guests/ failed");
        guests.join("target/wasm32-wasip2/release")
    });
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.is_file(), "no guest component at {}", path.display());
    path
}

/// Starts a fresh server for one test.
pub fn nats() -> NatsServer {
    NatsServer::start().expect("start nats-server (is it installed? see README)")
}

/// A temporary handlers directory that tests fill with manifests.
pub struct HandlerDir {
    dir: tempfile::TempDir,
}

impl Default for HandlerDir {
    fn default() -> Self {
        Self::new()
    }
}

impl HandlerDir {
    /// An empty directory.
    pub fn new() -> Self {
        HandlerDir { dir: tempfile::tempdir().expect("temp dir") }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `<file>.toml` for a handler named `name` running guest
    /// `guest`; `body` is the rest of the manifest (triggers, permissions...).
    pub fn add(&self, file: &str, name: &str, guest_name: &str, body: &str) -> &Self {
        let component = guest(guest_name);
        let text = format!("name = \"{name}\"\ncomponent = \"{}\"\n{body}\n", component.display());
        self.write(&format!("{file}.toml"), &text);
        self
    }

    /// Writes a raw file (for broken manifests).
    pub fn write(&self, rel: &str, text: &str) -> &Self {
        self.write_bytes(rel, text.as_bytes())
    }

    /// Writes a raw file of bytes (a component of its own).
    pub fn write_bytes(&self, rel: &str, bytes: &[u8]) -> &Self {
        let path = self.dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create folder");
        }
        std::fs::write(path, bytes).expect("write file");
        self
    }
}

/// `wasm` (a component) with a custom section numbered `n` appended: the
/// same code in other bytes, which natsfn compiles and holds as a component
/// of its own, as it would a different handler's.
pub fn distinct_copy(wasm: &[u8], n: usize) -> Vec<u8> {
    fn leb128(mut v: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"natsfn-copy";
    let mut section = Vec::new();
    leb128(name.len(), &mut section);
    section.extend_from_slice(name);
    section.extend_from_slice(n.to_string().as_bytes());
    let mut out = wasm.to_vec();
    // Section id 0: a custom section, allowed anywhere in a component.
    out.push(0);
    leb128(section.len(), &mut out);
    out.extend_from_slice(&section);
    out
}

/// Builds and starts a host on `dir` against `server`.
pub async fn start_host(server: &NatsServer, dir: &HandlerDir) -> natsfn::RunningHost {
    start_traced_host(server, dir, None).await
}

/// Like [`start_host`], with options of the test's own set on the builder.
pub async fn start_host_with(
    server: &NatsServer,
    dir: &HandlerDir,
    options: impl FnOnce(natsfn::HostBuilder) -> natsfn::HostBuilder,
) -> natsfn::RunningHost {
    let builder = options(natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path()));
    let host = builder.build().await.expect("build host");
    assert!(host.load_errors().is_empty(), "unexpected load errors: {:?}", host.load_errors());
    host.start().await.expect("start host")
}

/// Like [`start_host`], with the host's spans going to `tracer`.
pub async fn start_traced_host(
    server: &NatsServer,
    dir: &HandlerDir,
    tracer: Option<natsfn::telemetry::Tracer>,
) -> natsfn::RunningHost {
    start_host_with(server, dir, |builder| match tracer {
        Some(tracer) => builder.tracer(tracer),
        None => builder,
    })
    .await
}

/// Waits until `cond` holds, polling; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while !cond().await {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A plain client for the test's side of the conversation.
pub async fn client(server: &NatsServer) -> async_nats::Client {
    async_nats::connect(server.url()).await.expect("connect test client")
}

/// Sends a request with a generous timeout and returns the reply.
pub async fn request(client: &async_nats::Client, subject: &str, payload: &str) -> async_nats::Message {
    let req = async_nats::Request::new().payload(payload.to_owned().into()).timeout(Some(Duration::from_secs(10)));
    client.send_request(subject.to_owned(), req).await.unwrap_or_else(|e| panic!("request to {subject}: {e}"))
}

/// The reply payload as text.
pub fn text(msg: &async_nats::Message) -> String {
    String::from_utf8_lossy(&msg.payload).into_owned()
}

/// Collects what arrives on `sub` until nothing has come for `quiet`.
pub async fn collect_until_quiet(sub: &mut async_nats::Subscriber, quiet: Duration) -> Vec<async_nats::Message> {
    let mut got = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(quiet, sub.next()).await {
        got.push(msg);
    }
    got
}

/// A header's first value, if present.
pub fn header<'a>(msg: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// A running `natsfn` process whose stdout and stderr lines are collected.
/// Killed when dropped.
pub struct NatsfnProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl NatsfnProcess {
    /// Starts `bin` (a test file's `env!("CARGO_BIN_EXE_natsfn-cli")`) with
    /// `args` and extra environment variables.
    pub fn spawn(bin: &str, args: &[&str], env: &[(&str, &str)]) -> NatsfnProcess {
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn natsfn");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        for stream in [Box::new(out) as Box<dyn std::io::Read + Send>, Box::new(err)] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        NatsfnProcess { child, lines, seen: Vec::new() }
    }

    /// Waits (up to a minute) for an output line containing all of
    /// `needles` and returns it.
    pub fn wait_for(&mut self, needles: &[&str]) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self.seen.iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no line with {needles:?}; output so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Everything the process printed so far.
    pub fn output(&mut self) -> String {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen.join("\n")
    }

    /// Sends a signal (`-TERM`, `-INT`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([sig, &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success());
    }

    /// Kills the process without warning, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (up to 15 s) for the process to exit and returns its code.
    pub fn wait_exit(&mut self) -> i32 {
        for _ in 0..300 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("natsfn did not exit; output:\n{}", self.seen.join("\n"));
    }
}

impl Drop for NatsfnProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub mod otlp;
pub mod tenancy;

/// A two-thread runtime of its own, for tests and benchmarks that run
/// several (a collector's and a host's) in one process.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("build a tokio runtime")
}
