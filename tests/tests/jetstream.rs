//! JetStream consumer triggers end to end, on file storage: at-least-once
//! across host crashes and server restarts, the outcome policy with dead
//! letters, flow control, and the `acks` interface.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures::StreamExt;
use natsfn_e2e::*;

/// Creates a file-backed stream.
async fn make_stream(js: &jetstream::Context, name: &str, subjects: &[&str]) -> stream::Stream {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create stream {name}: {e}"))
}

/// Publishes `n` messages `prefix.<i>` with payload `<i>` and waits for
/// every stream ack.
async fn publish_numbered(js: &jetstream::Context, prefix: &str, n: usize) {
    publish_range(js, prefix, 0..n).await;
}

/// Like [`publish_numbered`], for the numbers in `range`.
async fn publish_range(js: &jetstream::Context, prefix: &str, range: std::ops::Range<usize>) {
    let n = range.len();
    let acks = futures::stream::iter(range)
        .map(|i| {
            let js = js.clone();
            let prefix = prefix.to_owned();
            async move { js.publish(format!("{prefix}.{i}"), i.to_string().into()).await.unwrap().await.unwrap() }
        })
        .buffer_unordered(256)
        .count()
        .await;
    assert_eq!(acks, n);
}

async fn stream_len(js: &jetstream::Context, name: &str) -> u64 {
    try_stream_len(js, name).await.unwrap_or_else(|| panic!("read stream {name}"))
}

/// The stream's message count, or `None` while the server cannot answer.
async fn try_stream_len(js: &jetstream::Context, name: &str) -> Option<u64> {
    Some(js.get_stream(name).await.ok()?.info().await.ok()?.state.messages)
}

/// Waits up to `within` for the RESULTS stream to hold `n` messages.
async fn results_reach(js: &jetstream::Context, n: u64, within: Duration) {
    eventually(within, &format!("{n} results"), || async { stream_len(js, "RESULTS").await == n }).await;
}

async fn consumer(js: &jetstream::Context, stream: &str, durable: &str) -> PullConsumer {
    js.get_stream(stream).await.unwrap().get_consumer(durable).await.unwrap()
}

/// Waits for a consumer to have nothing pending and nothing unacked.
async fn drained(js: &jetstream::Context, stream: &str, durable: &str) -> jetstream::consumer::Info {
    let mut c = consumer(js, stream, durable).await;
    let start = Instant::now();
    loop {
        let info = c.info().await.unwrap().clone();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return info;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "consumer never drained: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every invocation of `handler` that started has its outcome
/// counted (`in_flight` falls as it is). What an invocation did (an ack, a
/// dead letter, a result) can be seen before that: the host counts the
/// outcome after the call returns, and often only after its own ack or
/// dead letter.
async fn outcomes_counted(host: &natsfn::RunningHost, handler: &str) {
    eventually(Duration::from_secs(10), &format!("{handler}'s outcomes to be counted"), || async {
        host.handler_stats(handler).is_some_and(|s| s.in_flight == 0)
    })
    .await;
}

/// A worker whose messages survive a loaded machine: a short ack wait would
/// let a slow CI box exhaust `max_deliver` on messages nobody failed.
const WORKER: &str = r#"
[[trigger]]
jetstream = { stream = "WORK", durable = "workers", filter = "work.>", ack_wait_ms = 5000, max_deliver = 100 }
[permissions]
publish = ["results.>"]
[config]
results = "results.out"
"#;

/// The WORK and RESULTS streams, and a handlers directory with the
/// `jsworker` guest under `manifest`.
async fn worker_setup(server: &NatsServer, manifest: &str) -> (jetstream::Context, HandlerDir) {
    let js = jetstream::new(client(server).await);
    make_stream(&js, "WORK", &["work.>"]).await;
    make_stream(&js, "RESULTS", &["results.>"]).await;
    let dir = HandlerDir::new();
    dir.add("worker", "worker", "jsworker", manifest);
    (js, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_shared_by_two_hosts_each_processed_once() {
    let server = nats();
    let (js, dir) = worker_setup(&server, WORKER).await;
    let host_a = start_host(&server, &dir).await;
    let host_b = start_host(&server, &dir).await;

    publish_numbered(&js, "work", 10_000).await;
    results_reach(&js, 10_000, Duration::from_secs(120)).await;
    let info = drained(&js, "WORK", "workers").await;
    assert_eq!(info.num_redelivered, 0, "nothing was delivered twice: {info:?}");
    assert_eq!(info.ack_floor.stream_sequence, 10_000);

    // The guest acks and publishes its result during its call.
    outcomes_counted(&host_a, "worker").await;
    outcomes_counted(&host_b, "worker").await;
    let a = host_a.handler_stats("worker").unwrap();
    let b = host_b.handler_stats("worker").unwrap();
    assert_eq!(a.invocations + b.invocations, 10_000, "a: {a:?}, b: {b:?}");
    assert!(a.invocations > 0 && b.invocations > 0, "both hosts took a share: a {a:?}, b {b:?}");
    // The guest acks itself: the host must not ack again.
    assert_eq!((a.acked, b.acked, a.ok + b.ok), (0, 0, 10_000));
    host_a.shutdown().await;
    host_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_killed_mid_stream_loses_nothing_after_restart() {
    let server = nats();
    let (js, dir) = worker_setup(&server, WORKER).await;
    let spawn = || {
        NatsfnProcess::spawn(
            env!("CARGO_BIN_EXE_natsfn-cli"),
            &["run", "--handlers", dir.path().to_str().unwrap(), "--nats", &server.url()],
            &[],
        )
    };

    let mut first = spawn();
    first.wait_for(&["natsfn: ready"]);
    publish_numbered(&js, "work", 10_000).await;
    eventually(Duration::from_secs(60), "some progress", || async { stream_len(&js, "RESULTS").await >= 1_500 }).await;
    first.kill9();
    let done_by_first = stream_len(&js, "RESULTS").await;
    assert!(done_by_first < 10_000, "the kill landed mid-stream ({done_by_first} done)");

    let mut second = spawn();
    second.wait_for(&["natsfn: ready"]);
    // Results are deduplicated by the input's stream sequence, so the
    // stream's count is the number of distinct inputs processed.
    eventually(Duration::from_secs(120), "10,000 distinct results", || async {
        stream_len(&js, "RESULTS").await == 10_000
    })
    .await;
    drained(&js, "WORK", "workers").await;
    let mut seen = HashSet::new();
    let results = js.get_stream("RESULTS").await.unwrap();
    for seq in 1..=10_000u64 {
        let m = results.get_raw_message(seq).await.unwrap();
        seen.insert(m.headers.get("source-seq").unwrap().as_str().to_owned());
    }
    assert_eq!(seen.len(), 10_000, "every input was processed");
    second.signal("-TERM");
    assert_eq!(second.wait_exit(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_rides_out_a_server_restart() {
    let store = tempfile::tempdir().unwrap();
    let mut server = NatsServer::builder().store_dir(store.path()).start().unwrap();
    let port = server.port();
    let (js, dir) = worker_setup(&server, WORKER).await;
    let host = start_host(&server, &dir).await;

    publish_numbered(&js, "work", 5_000).await;
    eventually(Duration::from_secs(60), "some progress", || async { stream_len(&js, "RESULTS").await >= 500 }).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _server = NatsServer::builder().store_dir(store.path()).port(port).start().unwrap();

    eventually(Duration::from_secs(120), "5,000 results after the restart", || async {
        try_stream_len(&js, "RESULTS").await == Some(5_000)
    })
    .await;
    drained(&js, "WORK", "workers").await;
    host.shutdown().await;
}

#[tokio::test]
async fn a_flaky_handler_is_retried_with_its_delay_then_dead_lettered() {
    let server = nats();
    let client = client(&server).await;
    let js = jetstream::new(client.clone());
    make_stream(&js, "FLAKY", &["flaky.in.>"]).await;
    make_stream(&js, "DLQ", &["dlq.>"]).await;
    let dir = HandlerDir::new();
    dir.add(
        "flaky",
        "flaky",
        "flaky",
        r#"
[[trigger]]
jetstream = { stream = "FLAKY", durable = "flaky", filter = "flaky.in.>", max_deliver = 3, dead_letter = "dlq.flaky" }
[permissions]
publish = ["flaky.attempts"]
[config]
fail_times = 10
retry_ms = 300
"#,
    )
    .add(
        "recovers",
        "recovers",
        "flaky",
        r#"
[[trigger]]
jetstream = { stream = "FLAKY", durable = "recovers", filter = "flaky.in.recover", max_deliver = 3, dead_letter = "dlq.flaky" }
[config]
fail_times = 1
"#,
    );
    let mut attempts = client.subscribe("flaky.attempts").await.unwrap();
    client.flush().await.unwrap();
    let host = start_host(&server, &dir).await;

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("x-original", "kept");
    js.publish_with_headers("flaky.in.doomed", headers, "payload".into()).await.unwrap().await.unwrap();

    let mut times = Vec::new();
    for expected in 1..=3 {
        let m = tokio::time::timeout(Duration::from_secs(10), attempts.next()).await.unwrap().unwrap();
        assert_eq!(text(&m), expected.to_string(), "delivery count seen by the guest");
        times.push(Instant::now());
    }
    for gap in times.windows(2) {
        assert!(gap[1] - gap[0] >= Duration::from_millis(250), "redelivered after the retry delay, not at once");
    }

    eventually(Duration::from_secs(10), "the dead letter", || async { stream_len(&js, "DLQ").await == 1 }).await;
    let dead = js.get_stream("DLQ").await.unwrap().get_raw_message(1).await.unwrap();
    let h = |name: &str| dead.headers.get(name).map(|v| v.as_str().to_owned()).unwrap_or_default();
    assert_eq!(dead.payload.as_ref(), b"payload");
    assert_eq!(h("x-original"), "kept", "original headers are kept");
    assert_eq!(h("Natsfn-Stream"), "FLAKY");
    assert_eq!(h("Natsfn-Stream-Sequence"), "1");
    assert_eq!(h("Natsfn-Consumer"), "flaky");
    assert_eq!(h("Natsfn-Subject"), "flaky.in.doomed");
    assert_eq!(h("Natsfn-Handler"), "flaky");
    assert_eq!(h("Natsfn-Delivered"), "3");
    assert!(h("Natsfn-Error").starts_with("gave up after 3 deliveries"), "{}", h("Natsfn-Error"));
    drained(&js, "FLAKY", "flaky").await;

    // A handler that fails once and then succeeds is acked, not dead-lettered.
    js.publish("flaky.in.recover", "again".into()).await.unwrap().await.unwrap();
    eventually(Duration::from_secs(10), "the recovering handler is acked", || async {
        host.handler_stats("recovers").unwrap().acked == 1
    })
    .await;
    let stats = host.handler_stats("recovers").unwrap();
    assert_eq!((stats.invocations, stats.naked, stats.dead_lettered), (2, 1, 0));
    assert_eq!(stream_len(&js, "DLQ").await, 1);
    let flaky = host.handler_stats("flaky").unwrap();
    assert_eq!((flaky.naked, flaky.dead_lettered), (2 + 1, 1), "the doomed one nak'ed twice; `recover` went to it too");
    host.shutdown().await;
}

#[tokio::test]
async fn a_trapping_handler_is_dead_lettered_at_once_or_retried_by_policy() {
    let server = nats();
    let client = client(&server).await;
    let js = jetstream::new(client.clone());
    make_stream(&js, "JOBS", &["jobs.>"]).await;
    make_stream(&js, "DLQ", &["dlq.>"]).await;
    let dir = HandlerDir::new();
    dir.add(
        "term",
        "term",
        "panicker",
        "[[trigger]]\njetstream = { stream = \"JOBS\", durable = \"term\", filter = \"jobs.term\", dead_letter = \"dlq.term\" }",
    )
    .add(
        "nak",
        "nak",
        "panicker",
        "[[trigger]]\njetstream = { stream = \"JOBS\", durable = \"nak\", filter = \"jobs.nak\", max_deliver = 2, on_error = \"nak\", dead_letter = \"dlq.nak\" }",
    );
    let host = start_host(&server, &dir).await;
    js.publish("jobs.term", "panic".into()).await.unwrap().await.unwrap();
    js.publish("jobs.nak", "panic".into()).await.unwrap().await.unwrap();

    eventually(Duration::from_secs(15), "two dead letters", || async { stream_len(&js, "DLQ").await == 2 }).await;
    let dlq = js.get_stream("DLQ").await.unwrap();
    let mut by_handler = std::collections::HashMap::new();
    for seq in 1..=2 {
        let m = dlq.get_raw_message(seq).await.unwrap();
        let get = |n: &str| m.headers.get(n).unwrap().as_str().to_owned();
        by_handler.insert(get("Natsfn-Handler"), (get("Natsfn-Delivered"), get("Natsfn-Error")));
    }
    let (delivered, error) = &by_handler["term"];
    assert_eq!(delivered, "1", "on_error = term gives up on the first failure");
    assert!(error.starts_with("handler trapped"), "{error}");
    let (delivered, error) = &by_handler["nak"];
    assert_eq!(delivered, "2", "on_error = nak retries until max_deliver");
    assert!(error.starts_with("gave up after 2 deliveries: handler trapped"), "{error}");
    outcomes_counted(&host, "nak").await;
    assert_eq!(host.handler_stats("nak").unwrap().trapped, 2);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_pending_never_exceeds_max_concurrency() {
    let server = nats();
    let client = client(&server).await;
    let js = jetstream::new(client.clone());
    make_stream(&js, "SLOW", &["slow.>"]).await;
    let dir = HandlerDir::new();
    dir.add(
        "slow",
        "slow",
        "slow",
        "[[trigger]]\njetstream = { stream = \"SLOW\", durable = \"slow\", batch = 10 }\n[limits]\nmax_concurrency = 2\n[config]\ndelay_ms = 100",
    );
    let host = start_host(&server, &dir).await;
    publish_numbered(&js, "slow", 20).await;

    let mut c = consumer(&js, "SLOW", "slow").await;
    let mut peak = 0;
    let start = Instant::now();
    loop {
        let info = c.info().await.unwrap().clone();
        peak = peak.max(info.num_ack_pending);
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never finished: {info:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Success acks are not confirmed, so a slot's previous message can
    // still count on the server while its next one is delivered: at most
    // twice the slots. Pulling past the permits (batch = 10) would show here.
    assert!((1..=4).contains(&peak), "ack pending peaked at {peak}, bound is 2 slots + 2 acks in flight");
    outcomes_counted(&host, "slow").await;
    let stats = host.handler_stats("slow").unwrap();
    assert_eq!((stats.acked, stats.peak_in_flight), (20, 2));
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_drains_a_burst_promptly() {
    let server = nats();
    let (js, dir) = worker_setup(&server, WORKER).await;
    let host = start_host(&server, &dir).await;

    // Longer than a pull stays open, so the burst meets a re-issued pull.
    tokio::time::sleep(Duration::from_secs(6)).await;
    publish_numbered(&js, "work", 500).await;
    // A stalled pull would sit until its expiry or longer; 10 s is generous
    // for 500 trivial messages and far below any stall.
    results_reach(&js, 500, Duration::from_secs(10)).await;
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_after_an_idle_heartbeat_is_delivered_at_once() {
    let server = nats();
    let (js, dir) = worker_setup(&server, WORKER).await;
    let host = start_host(&server, &dir).await;

    // The open pull has had its first idle heartbeat (every 2 s) by now but
    // not yet expired (5 s): the message meets a pull that has only ever
    // seen a heartbeat.
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    let sent = Instant::now();
    publish_numbered(&js, "work", 1).await;
    results_reach(&js, 1, Duration::from_secs(20)).await;
    let waited = sent.elapsed();
    // A trivial message takes milliseconds, seconds on a loaded machine; a
    // pull that stopped listening after the heartbeat would deliver it only
    // once the pull ran out and more (7.4 s).
    assert!(waited < Duration::from_secs(4), "delivered after {waited:?}");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_trigger_of_a_handler_with_idle_pulls_delivers_at_once() {
    let server = nats();
    let manifest = WORKER.replace(
        "[permissions]",
        "[[trigger]]\njetstream = { stream = \"JOBS\", durable = \"jobs\", filter = \"jobs.>\" }\n\
         [[trigger]]\nsubject = \"ask\"\n[permissions]",
    );
    let (js, dir) = worker_setup(&server, &manifest).await;
    make_stream(&js, "JOBS", &["jobs.>"]).await;
    let host = start_host(&server, &dir).await;

    // Both pulls are open by now. An idle pull holds slots for the messages
    // it asks for: were one trigger to hold all of the handler's slots, the
    // others could not run a message until that pull expired.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let client = client(&server).await;
    let sent = Instant::now();
    assert_eq!(
        text(&request(&client, "ask", "x").await),
        "invalid: ack: the message being handled is not from JetStream"
    );
    // Milliseconds, or seconds on a loaded machine; until the pull expired
    // would be 4.5 s.
    assert!(sent.elapsed() < Duration::from_secs(3), "the core message waited {:?}", sent.elapsed());

    let sent = Instant::now();
    publish_numbered(&js, "work", 1).await;
    publish_numbered(&js, "jobs", 1).await;
    results_reach(&js, 2, Duration::from_secs(20)).await;
    let waited = sent.elapsed();
    assert!(waited < Duration::from_secs(3), "both delivered only after {waited:?}");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_is_made_again_and_consumption_resumes() {
    let server = nats();
    let (js, dir) = worker_setup(&server, WORKER).await;
    let host = start_host(&server, &dir).await;
    publish_numbered(&js, "work", 10).await;
    results_reach(&js, 10, Duration::from_secs(10)).await;

    // An operator removes the durable while the host has pulls open on it.
    js.get_stream("WORK").await.unwrap().delete_consumer("workers").await.unwrap();
    publish_range(&js, "work", 10..20).await;
    // The consumer comes back as the manifest describes it (deliver all):
    // the first ten are delivered again, and their results deduplicated.
    results_reach(&js, 20, Duration::from_secs(20)).await;
    drained(&js, "WORK", "workers").await;
    assert_eq!(stream_len(&js, "RESULTS").await, 20);
    host.shutdown().await;
}

#[tokio::test]
async fn in_progress_keeps_a_long_job_from_being_redelivered() {
    let server = nats();
    let client = client(&server).await;
    let js = jetstream::new(client.clone());
    make_stream(&js, "LONG", &["long"]).await;
    let dir = HandlerDir::new();
    dir.add(
        "slow",
        "slow",
        "slow",
        "[[trigger]]\njetstream = { stream = \"LONG\", durable = \"long\", ack_wait_ms = 700 }\n[config]\ndelay_ms = 2500\nprogress_ms = 200",
    );
    let host = start_host(&server, &dir).await;
    js.publish("long", "job".into()).await.unwrap().await.unwrap();
    let info = drained(&js, "LONG", "long").await;
    assert_eq!(info.num_redelivered, 0);
    outcomes_counted(&host, "slow").await;
    let stats = host.handler_stats("slow").unwrap();
    assert_eq!((stats.invocations, stats.acked), (1, 1), "one delivery, though the job took 3x the ack wait");
    host.shutdown().await;
}

#[tokio::test]
async fn msg_id_makes_a_redelivered_write_idempotent() {
    let server = nats();
    let (js, dir) = worker_setup(&server, &format!("{WORKER}retry_first_delivery = \"true\"\n")).await;
    let host = start_host(&server, &dir).await;
    let published_from = std::time::SystemTime::now();
    publish_numbered(&js, "work", 50).await;
    drained(&js, "WORK", "workers").await;
    outcomes_counted(&host, "worker").await;
    let stats = host.handler_stats("worker").unwrap();
    assert_eq!((stats.invocations, stats.naked), (100, 50), "every message written, retried and written again");
    assert_eq!(stream_len(&js, "RESULTS").await, 50, "the second write of each was deduplicated");
    // Each stored result is from its input's first delivery, and its
    // headers say what the guest was told about that delivery.
    let results = js.get_stream("RESULTS").await.unwrap();
    let ns = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    let mut consumer_seqs = HashSet::new();
    for seq in 1..=50u64 {
        let m = results.get_raw_message(seq).await.unwrap();
        let header = |name: &str| m.headers.get(name).unwrap().as_str().to_owned();
        assert_eq!(
            (header("source-stream"), header("source-consumer"), header("source-delivered")),
            ("WORK".to_owned(), "workers".to_owned(), "1".to_owned())
        );
        assert!(header("source-pending").parse::<u64>().unwrap() < 50);
        let stored: i64 = header("source-stored-ns").parse().unwrap();
        assert!((ns(published_from)..=ns(std::time::SystemTime::now())).contains(&stored), "stored at {stored}");
        consumer_seqs.insert(header("source-consumer-seq"));
    }
    assert_eq!(consumer_seqs.len(), 50, "each first delivery has its own consumer sequence");
    host.shutdown().await;
}

#[tokio::test]
async fn acks_on_a_core_message_are_a_clear_error() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("worker", "worker", "jsworker", "[[trigger]]\nsubject = \"core.work\"");
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    assert_eq!(
        text(&request(&client, "core.work", "x").await),
        "invalid: ack: the message being handled is not from JetStream"
    );
    host.shutdown().await;
}

#[tokio::test]
async fn a_missing_stream_is_named_unless_the_host_may_create_it() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "worker",
        "worker",
        "jsworker",
        "[[trigger]]\njetstream = { stream = \"NOPE\", durable = \"w\", filter = \"nope.>\" }",
    );

    dir.add("echo", "echo", "echo", "[[trigger]]\nsubject = \"still.serving\"");

    let host = natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path()).build().await.unwrap();
    let running = host.start().await.unwrap();
    let errors: Vec<String> = running.load_errors().iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("worker.toml: handler worker: stream `NOPE`") && errors[0].contains("--create-streams"),
        "{errors:?}"
    );
    let names: Vec<String> = running.handlers().iter().map(|h| h.name.to_string()).collect();
    assert_eq!(names, vec!["echo"], "the others serve");
    assert_eq!(text(&request(&client(&server).await, "still.serving", "yes").await), "yes");
    running.shutdown().await;

    let host = start_host_with(&server, &dir, |b| b.create_streams(true)).await;
    let js = jetstream::new(client(&server).await);
    let mut created = js.get_stream("NOPE").await.unwrap();
    assert_eq!(created.info().await.unwrap().config.subjects, vec!["nope.>".to_string()]);
    host.shutdown().await;
}

#[tokio::test]
async fn the_consumer_is_created_and_updated_to_match_the_manifest() {
    let server = nats();
    let js = jetstream::new(client(&server).await);
    make_stream(&js, "ORDERS", &["orders.>", "refunds.>"]).await;
    let dir = HandlerDir::new();
    let manifest = |max_ack_pending: u32| {
        format!(
            "[[trigger]]\njetstream = {{ stream = \"ORDERS\", durable = \"shaped\", filter = [\"orders.>\", \"refunds.*\"], deliver = \"by-start-sequence\", start_sequence = 3, max_deliver = 4, backoff_ms = [4000, 200], max_ack_pending = {max_ack_pending} }}"
        )
    };
    dir.add("shaped", "shaped", "jsworker", &manifest(7));
    let host = start_host(&server, &dir).await;
    let mut c = consumer(&js, "ORDERS", "shaped").await;
    let config = c.info().await.unwrap().config.clone();
    assert_eq!(config.durable_name.as_deref(), Some("shaped"));
    assert_eq!(config.filter_subjects, vec!["orders.>".to_string(), "refunds.*".to_string()]);
    assert!(matches!(
        config.deliver_policy,
        async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: 3 }
    ));
    assert_eq!(config.ack_wait, Duration::from_millis(4000));
    assert_eq!(config.max_deliver, 4);
    assert_eq!(config.backoff, vec![Duration::from_millis(4000), Duration::from_millis(200)]);
    assert_eq!(config.max_ack_pending, 7);
    host.shutdown().await;

    // A changed manifest updates the same durable in place.
    dir.add("shaped", "shaped", "jsworker", &manifest(9));
    let host = start_host(&server, &dir).await;
    let mut c = consumer(&js, "ORDERS", "shaped").await;
    assert_eq!(c.info().await.unwrap().config.max_ack_pending, 9);
    host.shutdown().await;
}

/// In reuse mode an invocation usually runs to its end, settling included,
/// on the trigger's own task (the lanes are idle); one whose settling waits
/// on the server (a nak or a dead letter is confirmed) moves to a lane. Every
/// message is still settled as its outcome says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_instances_settle_every_message_as_its_outcome_says() {
    let server = nats();
    let js = jetstream::new(client(&server).await);
    make_stream(&js, "RE", &["re.>"]).await;
    make_stream(&js, "DLQ", &["dlq.>"]).await;
    let dir = HandlerDir::new();
    let manifest = |durable: &str, filter: &str, max_deliver: u32, fail_times: u32| {
        format!(
            "instance = \"reuse\"\n[[trigger]]\njetstream = {{ stream = \"RE\", durable = \"{durable}\", filter = \
             \"{filter}\", max_deliver = {max_deliver}, dead_letter = \"dlq.re\" }}\n[config]\nfail_times = \
             {fail_times}\n"
        )
    };
    dir.add("retries", "retries", "flaky", &manifest("retries", "re.retry", 2, 1));
    dir.add("gives-up", "gives-up", "flaky", &manifest("gives-up", "re.doomed", 1, 10));
    let host = start_host(&server, &dir).await;

    const N: u64 = 50;
    for i in 0..N {
        js.publish("re.retry", i.to_string().into()).await.unwrap().await.unwrap();
        js.publish("re.doomed", i.to_string().into()).await.unwrap().await.unwrap();
    }
    eventually(Duration::from_secs(30), "every message settled", || async {
        let (r, g) = (host.handler_stats("retries").unwrap(), host.handler_stats("gives-up").unwrap());
        r.acked == N && g.dead_lettered == N
    })
    .await;
    let retries = host.handler_stats("retries").unwrap();
    assert_eq!((retries.invocations, retries.naked, retries.acked), (2 * N, N, N), "{retries:?}");
    let gives_up = host.handler_stats("gives-up").unwrap();
    assert_eq!((gives_up.invocations, gives_up.dead_lettered), (N, N), "{gives_up:?}");
    assert_eq!(stream_len(&js, "DLQ").await, N);
    drained(&js, "RE", "retries").await;
    drained(&js, "RE", "gives-up").await;
    assert!(host.shutdown().await.clean);
}
