//! Instance reuse (`instance = "reuse"`): an opt-in that keeps guest state
//! between messages, and the rules that keep it safe: a trapped or timed-out
//! instance is discarded, limits apply per message, a reload retires the old
//! instances, and fresh instances stay the default.

use std::time::Duration;

use natsfn_e2e::*;

/// The guest's own count of calls on the instance that answered.
async fn calls(client: &async_nats::Client, subject: &str) -> u32 {
    let reply = request(client, subject, "hi").await;
    header(&reply, "x-natsfn-calls").expect("echo sets x-natsfn-calls").parse().expect("a number")
}

/// A request to the `slow` guest, which sleeps `ms` before echoing
/// `payload`; the requester gives up after `timeout`.
fn sleeping(ms: u64, payload: &'static str, timeout: Duration) -> async_nats::Request {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("delay-ms", ms.to_string().as_str());
    async_nats::Request::new().headers(headers).payload(payload.into()).timeout(Some(timeout))
}

/// A host serving the `slow` guest in reuse mode. Bind every field: the
/// server and directory must outlive the test.
struct Slow {
    _server: NatsServer,
    _dir: HandlerDir,
    host: natsfn::RunningHost,
    client: async_nats::Client,
}

async fn reused_slow(subject: &str, max_concurrency: u32, timeout_ms: u64) -> Slow {
    let server = nats();
    let dir = HandlerDir::new();
    let manifest = format!(
        "instance = \"reuse\"\n[[trigger]]\nsubject = \"{subject}\"\n[limits]\n\
         max_concurrency = {max_concurrency}\ntimeout_ms = {timeout_ms}"
    );
    dir.add("slow", "slow", "slow", &manifest);
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    Slow { _server: server, _dir: dir, host, client }
}

/// A host whose instance pool holds two instances, serving the `slow` guest
/// in reuse mode on `subject` with room for eight invocations at once (so it
/// can want more instances than the pool has), and `other` (name, guest,
/// manifest) beside it.
async fn slow_in_a_pool_of_two(subject: &str, other: Option<(&str, &str, &str)>) -> Slow {
    let server = nats();
    let dir = HandlerDir::new();
    let manifest = format!("instance = \"reuse\"\n[[trigger]]\nsubject = \"{subject}\"\n[limits]\nmax_concurrency = 8");
    dir.add("slow", "slow", "slow", &manifest);
    if let Some((name, guest, manifest)) = other {
        dir.add(name, name, guest, manifest);
    }
    let host = start_host_with(&server, &dir, |b| b.max_instances(2)).await;
    let client = client(&server).await;
    Slow { _server: server, _dir: dir, host, client }
}

/// One instance at a time, so consecutive messages see the same one.
const REUSE_ECHO: &str = "instance = \"reuse\"\n[[trigger]]\nsubject = \"reuse.echo\"\n[limits]\nmax_concurrency = 1";

/// A host serving [`REUSE_ECHO`] whose instance has handled two messages.
/// Bind every field: the server and directory must outlive the test.
struct Warm {
    _server: NatsServer,
    dir: HandlerDir,
    host: natsfn::RunningHost,
    client: async_nats::Client,
}

async fn warm_reused_echo() -> Warm {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("reused", "reused", "echo", REUSE_ECHO);
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    assert_eq!(calls(&client, "reuse.echo").await, 1);
    assert_eq!(calls(&client, "reuse.echo").await, 2);
    Warm { _server: server, dir, host, client }
}

#[tokio::test]
async fn a_reused_instance_keeps_its_state_and_a_fresh_one_never_does() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("reused", "reused", "echo", REUSE_ECHO);
    dir.add("fresh", "fresh", "echo", "instance = \"fresh\"\n[[trigger]]\nsubject = \"fresh.echo\"");
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    for expected in 1..=5 {
        assert_eq!(calls(&client, "reuse.echo").await, expected);
        assert_eq!(calls(&client, "fresh.echo").await, 1);
    }
    assert!(host.shutdown().await.clean);
}

#[tokio::test]
async fn a_trapped_instance_is_discarded() {
    let Warm { _server, dir: _dir, host, client } = warm_reused_echo().await;
    let req = async_nats::Request::new().payload("natsfn:trap".into()).timeout(Some(Duration::from_millis(500)));
    assert!(client.send_request("reuse.echo", req).await.is_err(), "a trap sends no reply");
    assert_eq!(calls(&client, "reuse.echo").await, 1, "the next message runs on a new instance");
    assert_eq!(calls(&client, "reuse.echo").await, 2);
    assert_eq!(host.handler_stats("reused").unwrap().trapped, 1);
    assert!(host.shutdown().await.clean);
}

#[tokio::test]
async fn time_limits_apply_to_every_message_of_a_reused_instance() {
    let Slow { _server, _dir, host, client } = reused_slow("reuse.slow", 1, 300).await;
    let slow = |ms: u64| sleeping(ms, "x", Duration::from_secs(2));
    assert!(client.send_request("reuse.slow", slow(10)).await.is_ok());
    // Past the first message's deadline: a deadline that was not renewed
    // would interrupt this one at once.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(client.send_request("reuse.slow", slow(10)).await.is_ok(), "the deadline is renewed per message");
    assert!(client.send_request("reuse.slow", slow(1500)).await.is_err(), "stopped at its own deadline");
    assert!(client.send_request("reuse.slow", slow(10)).await.is_ok(), "a fresh instance replaces the stopped one");
    let stats = host.handler_stats("slow").unwrap();
    assert_eq!((stats.ok, stats.timed_out), (3, 1));
    assert!(host.shutdown().await.clean);
}

#[tokio::test]
async fn a_reload_retires_the_old_instances() {
    let Warm { _server, dir, host, client } = warm_reused_echo().await;
    dir.add("reused", "reused", "echo", &format!("{REUSE_ECHO}\n[config]\nversion = \"2\""));
    let report = host.reload().await;
    assert_eq!(report.changes.len(), 1, "{report:?}");
    assert_eq!(calls(&client, "reuse.echo").await, 1, "the new version starts from a new instance");
    assert_eq!(calls(&client, "reuse.echo").await, 2);
    assert!(host.shutdown().await.clean);
}

/// Idle instances keep the host's instance permits they ran with, and a
/// message runs on an idle one by taking those permits over. With every
/// permit held by an idle instance, a message that asked the pool for a
/// permit of its own would wait forever; and however many rounds, no more
/// instances run at once than the pool holds.
#[tokio::test]
async fn idle_instances_holding_the_whole_pool_serve_the_next_messages() {
    let Slow { _server, _dir, host, client } = slow_in_a_pool_of_two("reuse.pool", None).await;
    for round in 1..=3u64 {
        let requests = (0..6).map(|_| client.send_request("reuse.pool", sleeping(100, "x", Duration::from_secs(10))));
        for reply in futures::future::join_all(requests).await {
            assert_eq!(&reply.expect("answered").payload[..], b"x", "round {round}");
        }
        let stats = host.handler_stats("slow").unwrap();
        assert_eq!((stats.ok, stats.in_flight), (6 * round, 0), "round {round}: {stats:?}");
    }
    assert_eq!(host.handler_stats("slow").unwrap().peak_in_flight, 2, "the pool holds two instances");
    assert!(host.shutdown().await.clean);
}

/// Idle instances give their permits up to a message of another handler
/// that needs them: a few reuse-mode handlers that once ran at their limits
/// must not leave the rest of the host waiting for good.
#[tokio::test]
async fn idle_instances_give_their_permits_to_other_handlers() {
    let fresh = ("fresh", "echo", "[[trigger]]\nsubject = \"fresh.echo\"");
    let Slow { _server, _dir, host, client } = slow_in_a_pool_of_two("reuse.hog", Some(fresh)).await;
    let hog = || client.send_request("reuse.hog", sleeping(200, "x", Duration::from_secs(5)));
    for reply in futures::future::join_all([hog(), hog()]).await {
        reply.expect("answered");
    }
    assert_eq!(host.handler_stats("slow").unwrap().peak_in_flight, 2, "both instances ran, and are idle now");
    let req = async_nats::Request::new().payload("hi".into()).timeout(Some(Duration::from_secs(5)));
    let reply = client.send_request("fresh.echo", req).await.expect("the other handler gets a permit");
    assert_eq!(&reply.payload[..], b"hi");
    hog().await.expect("the reuse handler still serves");
    assert!(host.shutdown().await.clean);
}

/// A reuse-mode invocation starts on its trigger's task when the lanes are
/// idle (it usually finishes there); one that waits must move on and leave
/// the trigger free to read the next message.
#[tokio::test]
async fn a_reused_invocation_that_waits_does_not_hold_up_the_next_message() {
    let Slow { _server, _dir, host, client } = reused_slow("reuse.wait", 4, 10_000).await;
    let delayed = |ms: u64, payload: &'static str| sleeping(ms, payload, Duration::from_secs(10));
    // The first message finds the lanes idle and starts on the trigger's
    // task, where its guest then sleeps for 3 s.
    let slow = tokio::spawn({
        let client = client.clone();
        async move { client.send_request("reuse.wait", delayed(3000, "slow")).await.map(|_| std::time::Instant::now()) }
    });
    eventually(Duration::from_secs(5), "the slow message is in flight", || async {
        host.handler_stats("slow").is_some_and(|s| s.in_flight == 1)
    })
    .await;
    let fast = client.send_request("reuse.wait", delayed(0, "fast")).await.expect("the fast message is answered");
    let fast_at = std::time::Instant::now();
    assert_eq!(&fast.payload[..], b"fast");
    let slow_at = slow.await.expect("task").expect("the slow message is answered");
    assert!(fast_at < slow_at, "the fast message was answered while the slow one still waited");
    let stats = host.handler_stats("slow").unwrap();
    assert_eq!((stats.ok, stats.peak_in_flight), (2, 2));
    assert!(host.shutdown().await.clean);
}

/// Everything the host logs in this test binary, each line with the name
/// of the thread that wrote it.
fn captured_log() -> &'static LogLines {
    static LOG: std::sync::OnceLock<LogLines> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let lines = LogLines::default();
        tracing_subscriber::fmt()
            .with_thread_names(true)
            .with_ansi(false)
            .with_writer(lines.clone())
            .try_init()
            .expect("the only subscriber of this test binary");
        lines
    })
}

#[derive(Clone, Default)]
struct LogLines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogLines {
    fn line_with(&self, text: &str) -> Option<String> {
        let bytes = self.0.lock().unwrap();
        String::from_utf8_lossy(&bytes).lines().find(|l| l.contains(text)).map(str::to_owned)
    }
}

impl std::io::Write for LogLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogLines {
    type Writer = LogLines;
    fn make_writer(&'a self) -> LogLines {
        self.clone()
    }
}

/// A tenant with threads of its own runs its guests there, reuse mode
/// included: a reused invocation may start on its trigger's task only when
/// the tenant shares the host's threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_its_own_threads_runs_reused_guests_on_them() {
    let log = captured_log();
    let server = nats();
    let dir = HandlerDir::new();
    let manifest = "tenant = \"own\"\ninstance = \"reuse\"\n[[trigger]]\nsubject = \"own.slow\"";
    dir.add("slow", "slow", "slow", manifest);
    let config = natsfn::HostConfig::from_toml("[tenants.own]\nthreads = 1\n", &dir.path().join("natsfn.toml"))
        .expect("host config");
    let host = natsfn::Host::builder()
        .nats_url(server.url())
        .config(config)
        .handlers_dir(dir.path())
        .build()
        .await
        .expect("host builds");
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    let host = host.start().await.expect("host starts");
    let client = client(&server).await;
    for i in 0..3 {
        let payload = ["first", "second", "third"][i];
        let reply = client.send_request("own.slow", sleeping(0, payload, Duration::from_secs(5))).await.unwrap();
        assert_eq!(&reply.payload[..], payload.as_bytes());
        let line = log.line_with(&format!("sleeping 0 ms on {payload}")).expect("the guest's log line");
        assert!(line.contains("natsfn-own"), "the guest ran on a thread of its tenant: {line}");
    }
    assert!(host.shutdown().await.clean);
}
