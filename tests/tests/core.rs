//! Core NATS triggers end to end: subjects, wildcards, queue groups, replies,
//! host calls and their permissions, traps and back-pressure.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use natsfn_e2e::*;

#[tokio::test]
async fn each_message_gets_a_fresh_instance_and_a_reply() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("echo", "echo", "echo", "[[trigger]]\nsubject = \"svc.echo\"");
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;

    for i in 0..20 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("x-test", format!("n{i}").as_str());
        let req = async_nats::Request::new().headers(headers).payload(format!("ping {i}").into());
        let reply = client.send_request("svc.echo", req).await.expect("echo replies");
        assert_eq!(text(&reply), format!("ping {i}"));
        // A static counter in the guest: 1 means nothing survived from the
        // previous message's instance.
        assert_eq!(header(&reply, "x-natsfn-calls"), Some("1"));
        assert_eq!(header(&reply, "x-test"), Some(format!("n{i}").as_str()), "request headers reach the guest");
        assert_eq!(header(&reply, "x-natsfn-subject"), Some("svc.echo"));
    }
    let stats = host.handler_stats("echo").unwrap();
    assert_eq!((stats.invocations, stats.ok), (20, 20));
    assert!(host.shutdown().await.clean);
}

/// After an invocation the host makes the handler's next instance, so the
/// next message does not wait for instantiation; nothing has run in that
/// instance before, so the guest still sees a fresh one.
#[tokio::test]
async fn the_next_message_finds_a_fresh_instance_made_ahead_of_it() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("echo", "echo", "echo", "[[trigger]]\nsubject = \"svc.echo\"");
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;

    for i in 0..5u64 {
        let reply = request(&client, "svc.echo", "hi").await;
        assert_eq!(header(&reply, "x-natsfn-calls"), Some("1"), "message {i} ran on a used instance");
        let stats = host.handler_stats("echo").unwrap();
        // The first message had none waiting; each later one finds the
        // instance made after the message before it.
        assert_eq!(stats.from_standby, i, "{stats:?}");
        // Instantiating takes microseconds; give it ample time.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A trap does not spoil the instance waiting for the next message.
    let trap = async_nats::Request::new().payload("natsfn:trap".into()).timeout(Some(Duration::from_millis(500)));
    assert!(client.send_request("svc.echo", trap).await.is_err(), "a trap sends no reply");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = request(&client, "svc.echo", "hi").await;
    assert_eq!(header(&reply, "x-natsfn-calls"), Some("1"));
    let stats = host.handler_stats("echo").unwrap();
    assert_eq!((stats.invocations, stats.ok, stats.trapped, stats.from_standby), (7, 6, 1, 6), "{stats:?}");
    assert!(host.shutdown().await.clean);
}

/// Whoever gets a reply finds its invocation counted, fresh or reused,
/// though the instance's drop or check-in comes after the reply. Two
/// workers, so the requester can read the counters while the invocation
/// that replied is still on the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replied_invocation_is_counted_before_its_reply_goes_out() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("fresh", "fresh", "echo", "[[trigger]]\nsubject = \"count.fresh\"").add(
        "reused",
        "reused",
        "echo",
        "instance = \"reuse\"\n[[trigger]]\nsubject = \"count.reused\"",
    );
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;

    for name in ["fresh", "reused"] {
        for i in 1..=300 {
            request(&client, &format!("count.{name}"), "hi").await;
            let stats = host.handler_stats(name).unwrap();
            assert_eq!(stats.ok, i, "{name}: reply {i} came before its invocation was counted: {stats:?}");
        }
    }
    assert!(host.shutdown().await.clean);
}

#[tokio::test]
async fn wildcard_and_exact_subjects_match_like_nats() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("star", "star", "echo", "[[trigger]]\nsubject = \"star.*.end\"")
        .add("tail", "tail", "echo", "[[trigger]]\nsubject = \"tail.>\"")
        .add("exact", "exact", "echo", "[[trigger]]\nsubject = \"exact.one\"");
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;

    for (subject, served) in [
        ("star.x.end", true),
        ("star.yy.end", true),
        ("star.x.y.end", false),
        ("star.end", false),
        ("tail.a", true),
        ("tail.a.b.c", true),
        ("tail", false),
        ("exact.one", true),
        ("exact.one.two", false),
        ("exact", false),
    ] {
        let req = async_nats::Request::new().payload("x".into()).timeout(Some(Duration::from_secs(5)));
        let got = client.send_request(subject.to_owned(), req).await;
        match (served, got) {
            (true, Ok(reply)) => assert_eq!(header(&reply, "x-natsfn-subject"), Some(subject)),
            (false, Err(e)) => assert_eq!(e.kind(), async_nats::client::RequestErrorKind::NoResponders, "{subject}"),
            (served, got) => panic!("{subject}: expected served={served}, got {got:?}"),
        }
    }
    host.shutdown().await;
}

#[tokio::test]
async fn one_handler_serves_several_triggers_and_reads_its_config() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "greeter",
        "greeter",
        "greeter",
        "[[trigger]]\nsubject = \"greet\"\n[[trigger]]\nsubject = \"greet.*\"\n[config]\ngreeting = \"Bonjour\"",
    )
    .add("plain", "plain", "greeter", "[[trigger]]\nsubject = \"plain.greet\"");
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;

    assert_eq!(text(&request(&client, "greet", "Ada").await), "Bonjour, Ada!");
    assert_eq!(text(&request(&client, "greet.fr", "Alan").await), "Bonjour, Alan!");
    // No `greeting` in the config: the guest's default.
    assert_eq!(text(&request(&client, "plain.greet", "Grace").await), "Hello, Grace!");
    assert_eq!(host.handler_stats("greeter").unwrap().ok, 2);
    host.shutdown().await;
}

#[tokio::test]
async fn a_published_message_runs_the_guest_which_publishes_onward() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "fanout",
        "fanout",
        "fanout",
        "[[trigger]]\nsubject = \"in.fanout\"\n[permissions]\npublish = [\"out.>\"]\n[config]\ntargets = \"out.a,out.b,out.c\"",
    );
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    let mut out = client.subscribe("out.>").await.unwrap();
    client.flush().await.unwrap();

    for i in 0..10 {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("seq", i.to_string().as_str());
        client.publish_with_headers("in.fanout", headers, format!("m{i}").into()).await.unwrap();
    }
    let got = collect_until_quiet(&mut out, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 30, "10 inputs x 3 targets");
    let mut per_subject: HashMap<String, usize> = HashMap::new();
    for m in &got {
        *per_subject.entry(m.subject.to_string()).or_default() += 1;
        let seq = header(m, "seq").expect("incoming headers are passed on");
        assert_eq!(text(m), format!("m{seq}"));
    }
    assert_eq!(per_subject, HashMap::from([("out.a".into(), 10), ("out.b".into(), 10), ("out.c".into(), 10)]));
    host.shutdown().await;
}

#[tokio::test]
async fn a_guest_requests_onward_within_its_permissions() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("echo", "echo", "echo", "[[trigger]]\nsubject = \"up.echo\"")
        .add(
            "relay",
            "relay",
            "relay",
            "[[trigger]]\nsubject = \"relay\"\n[permissions]\nrequest = [\"up.*\"]\n[config]\nupstream = \"up.echo\"",
        )
        .add(
            "relay-nobody",
            "relay-nobody",
            "relay",
            "[[trigger]]\nsubject = \"relay.nobody\"\n[permissions]\nrequest = [\"up.*\"]\n[config]\nupstream = \"up.nobody\"",
        )
        .add(
            "relay-denied",
            "relay-denied",
            "relay",
            "[[trigger]]\nsubject = \"relay.denied\"\n[permissions]\nrequest = [\"up.*\"]\n[config]\nupstream = \"elsewhere.echo\"",
        );
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;

    assert_eq!(text(&request(&client, "relay", "via relay").await), "via relay");
    assert_eq!(text(&request(&client, "relay.nobody", "x").await), "error: no-responders");
    assert_eq!(
        text(&request(&client, "relay.denied", "x").await),
        "error: permission-denied: request to elsewhere.echo"
    );
    assert_eq!(host.handler_stats("echo").unwrap().invocations, 1, "the denied request never reached NATS");
    host.shutdown().await;
}

#[tokio::test]
async fn request_timeout_is_reported_to_the_guest() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("slow", "slow", "slow", "[[trigger]]\nsubject = \"up.slow\"\n[config]\ndelay_ms = 2000").add(
        "relay",
        "relay",
        "relay",
        "[[trigger]]\nsubject = \"relay\"\n[permissions]\nrequest = [\"up.slow\"]\n[config]\nupstream = \"up.slow\"\ntimeout_ms = 200",
    );
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    assert_eq!(text(&request(&client, "relay", "x").await), "error: timeout");
    host.shutdown().await;
}

#[tokio::test]
async fn denied_and_malformed_calls_return_errors_and_publish_nothing() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "forbidden",
        "forbidden",
        "forbidden",
        "[[trigger]]\nsubject = \"probe\"\n[permissions]\npublish = [\"allowed.>\"]\n[config]\ntarget = \"secret.stuff\"\nallowed = \"allowed.ok\"",
    );
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    let mut everything = client.subscribe(">").await.unwrap();
    client.flush().await.unwrap();

    for (probe, expected) in [
        ("publish", "permission-denied: publish to secret.stuff"),
        ("request", "permission-denied: request to secret.stuff"),
        ("wildcard", "invalid: `allowed.*` contains a wildcard; a concrete subject is needed here"),
        ("empty", "invalid: subject is empty"),
        ("header", "invalid: header name `bad name` is not a valid NATS header name"),
        ("header-value", "invalid: header `x-probe` has a line break in its value"),
    ] {
        assert_eq!(text(&request(&client, "probe", probe).await), expected, "probe {probe}");
    }

    let seen = collect_until_quiet(&mut everything, Duration::from_millis(300)).await;
    let leaked: Vec<_> =
        seen.iter().map(|m| m.subject.to_string()).filter(|s| s != "probe" && !s.starts_with("_INBOX.")).collect();
    assert!(leaked.is_empty(), "nothing may be published by denied calls, saw {leaked:?}");
    host.shutdown().await;
}

#[tokio::test]
async fn a_trapping_guest_does_not_stop_the_host() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("panicker", "panicker", "panicker", "[[trigger]]\nsubject = \"p\"").add(
        "echo",
        "echo",
        "echo",
        "[[trigger]]\nsubject = \"e\"",
    );
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;

    for round in 0..3 {
        for payload in ["panic", "abort"] {
            let req = async_nats::Request::new().payload(payload.into()).timeout(Some(Duration::from_millis(500)));
            let got = client.send_request("p", req).await;
            assert!(got.is_err(), "a trapped invocation sends no reply (round {round})");
        }
        assert_eq!(text(&request(&client, "p", "fine").await), "ok", "the same handler serves the next message");
        assert_eq!(text(&request(&client, "e", "still here").await), "still here");
    }
    let stats = host.handler_stats("panicker").unwrap();
    assert_eq!((stats.trapped, stats.ok), (6, 3));
    host.shutdown().await;
}

#[tokio::test]
async fn a_guest_past_its_deadline_is_stopped() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "slow",
        "slow",
        "slow",
        "[[trigger]]\nsubject = \"s\"\n[limits]\ntimeout_ms = 200\n[config]\ndelay_ms = 5000",
    );
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    let req = async_nats::Request::new().payload("x".into()).timeout(Some(Duration::from_secs(3)));
    assert!(client.send_request("s", req).await.is_err(), "no reply from a timed-out guest");
    let stats = host.handler_stats("slow").unwrap();
    assert_eq!((stats.timed_out, stats.in_flight), (1, 0));
    host.shutdown().await;
}

#[tokio::test]
async fn queue_group_spreads_messages_across_two_hosts() {
    let server = nats();
    let body =
        |who: &str| format!("[[trigger]]\nsubject = \"work\"\nqueue = \"workers\"\n[config]\ngreeting = \"{who}\"");
    let (dir_a, dir_b) = (HandlerDir::new(), HandlerDir::new());
    dir_a.add("greeter", "greeter", "greeter", &body("A"));
    dir_b.add("greeter", "greeter", "greeter", &body("B"));
    let host_a = start_host(&server, &dir_a).await;
    let host_b = start_host(&server, &dir_b).await;
    let client = client(&server).await;

    let replies = futures::stream::iter(0..200)
        .map(|i| {
            let client = client.clone();
            async move { text(&request(&client, "work", &i.to_string()).await) }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let by_a = replies.iter().filter(|r| r.starts_with("A, ")).count();
    let by_b = replies.iter().filter(|r| r.starts_with("B, ")).count();
    assert_eq!(by_a + by_b, 200);
    assert!(by_a > 20 && by_b > 20, "both members took a share: A {by_a}, B {by_b}");
    let total =
        host_a.handler_stats("greeter").unwrap().invocations + host_b.handler_stats("greeter").unwrap().invocations;
    assert_eq!(total, 200, "each message handled exactly once by the group");
    host_a.shutdown().await;
    host_b.shutdown().await;
}

#[tokio::test]
async fn max_concurrency_bounds_in_flight_invocations() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "slow",
        "slow",
        "slow",
        "[[trigger]]\nsubject = \"s\"\n[limits]\nmax_concurrency = 2\n[config]\ndelay_ms = 100",
    );
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;

    let replies = futures::future::join_all((0..12).map(|i| {
        let client = client.clone();
        async move { text(&request(&client, "s", &i.to_string()).await) }
    }))
    .await;
    assert_eq!(replies.len(), 12);
    let stats = host.handler_stats("slow").unwrap();
    assert_eq!(stats.ok, 12);
    assert_eq!(stats.peak_in_flight, 2, "12 concurrent requests, never more than 2 instances");
    host.shutdown().await;
}

#[tokio::test]
async fn guests_cannot_reach_files_environment_or_network() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("sandbox", "sandbox", "sandbox", "[[trigger]]\nsubject = \"sandbox\"");
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    std::env::set_var("NATSFN_TEST_SECRET", "must not leak");
    let report = text(&request(&client, "sandbox", "").await);
    assert_eq!(report, "fs-read=err\nfs-dir=err\nenv=0\nnet=err", "{report}");
    host.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_and_takes_no_more() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("slow", "slow", "slow", "[[trigger]]\nsubject = \"s\"\n[config]\ndelay_ms = 700");
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;

    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { text(&request(&client, "s", &format!("r{i}")).await) })
        })
        .collect();
    while host.handler_stats("slow").unwrap().in_flight < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = host.shutdown().await;
    assert!(report.clean && report.abandoned == 0, "{report:?}");
    for (i, task) in in_flight.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), format!("r{i}"), "in-flight request {i} got its reply");
    }
    let req = async_nats::Request::new().payload("late".into()).timeout(Some(Duration::from_millis(500)));
    let late = client.send_request("s", req).await;
    assert_eq!(late.unwrap_err().kind(), async_nats::client::RequestErrorKind::NoResponders);
}

/// The trigger takes a ready message before it looks at the shutdown
/// token; a publisher that keeps the subscription full must not keep the
/// host from shutting down cleanly, long before its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_up_by_messages_that_keep_arriving() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("mirror", "mirror", "mirror", "[[trigger]]\nsubject = \"flood\"");
    let host = start_host_with(&server, &dir, |b| b.shutdown_timeout(Duration::from_secs(60))).await;
    let client = client(&server).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..1000 {
                    client.publish("flood", "x".into()).await.unwrap();
                }
                client.flush().await.unwrap();
            }
        }
    });
    // Far more arrives than fresh instances can handle: the trigger is
    // saturated and a message is always waiting for it.
    eventually(Duration::from_secs(30), "the handler is busy", || async {
        host.handler_stats("mirror").unwrap().invocations > 2_000
    })
    .await;
    let report = tokio::time::timeout(Duration::from_secs(30), host.shutdown())
        .await
        .expect("shutdown finished while the flood went on, not at its 60 s deadline");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.await.unwrap();
    assert!(report.clean && report.abandoned == 0, "{report:?}");
}

#[tokio::test]
async fn shutdown_abandons_invocations_at_the_deadline() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "slow",
        "slow",
        "slow",
        "[[trigger]]\nsubject = \"s\"\n[limits]\ntimeout_ms = 30000\n[config]\ndelay_ms = 20000",
    );
    let host = start_host_with(&server, &dir, |b| b.shutdown_timeout(Duration::from_millis(300))).await;
    let client = client(&server).await;
    client.publish("s", "x".into()).await.unwrap();
    while host.handler_stats("slow").unwrap().in_flight < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = host.shutdown().await;
    assert_eq!(report, natsfn::ShutdownReport { abandoned: 1, clean: false });
}

/// A guest built without the standard library (`mirror-bare`, on
/// `natsfn-guest-bare`) works like any other, fresh and reused: its
/// allocator serves small messages from the module's own arena and grows
/// the memory for ones larger than it, and frees what it is given back, so
/// a reused instance serves many large messages within its memory limit.
#[tokio::test]
async fn a_guest_without_std_serves_small_and_large_messages_fresh_and_reused() {
    let bare = std::fs::read(guest("mirror_bare")).unwrap();
    let with_std = std::fs::read(guest("mirror")).unwrap();
    let imports_wasi = |wasm: &[u8]| wasm.windows(5).any(|w| w == b"wasi:");
    assert!(imports_wasi(&with_std), "the check finds std's WASI imports");
    assert!(!imports_wasi(&bare), "mirror-bare imports no WASI at all");

    let server = nats();
    let dir = HandlerDir::new();
    dir.add("fresh", "fresh", "mirror_bare", "[[trigger]]\nsubject = \"bare.fresh\"");
    // 4 MiB of memory: 20 messages of 300 KiB would not fit if freed
    // memory were not reused.
    dir.add(
        "reused",
        "reused",
        "mirror_bare",
        "instance = \"reuse\"\n[[trigger]]\nsubject = \"bare.reused\"\n[limits]\nmax_concurrency = 1\nmemory_mb = 4",
    );
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    // Past the allocator's 256 KiB arena, within NATS's 1 MiB payload limit.
    let large: String = (0..300 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    for subject in ["bare.fresh", "bare.reused"] {
        for round in 0..20 {
            for payload in ["", "hi", large.as_str()] {
                let reply = request(&client, subject, payload).await;
                assert_eq!(reply.payload.len(), payload.len(), "{subject}, round {round}");
                assert!(text(&reply) == payload, "{subject}, round {round}: the payload came back changed");
            }
        }
    }
    for name in ["fresh", "reused"] {
        let stats = host.handler_stats(name).unwrap();
        assert_eq!((stats.invocations, stats.ok), (60, 60), "{name}: {stats:?}");
    }
    assert!(host.shutdown().await.clean);
}
