//! Tracing end to end: natsfn's real OTLP exporter sends to a receiver in
//! this process (gRPC and HTTP/protobuf, decoded with the
//! opentelemetry-proto types), and the tests read the spans it got.
//!
//! Each test builds its own pipeline and gives its tracer to its own host:
//! nothing here is global, so the tests can run in parallel in this one
//! process.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use natsfn::telemetry::{ExportStats, Otlp, OtlpPipeline, SEMCONV_SCHEMA_URL};
use natsfn_e2e::otlp::{event_attr, refused_endpoint, HungCollector, OtlpReceiver, Protocol, ReceivedSpan};
use natsfn_e2e::*;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// A pipeline exporting to `endpoint` over `protocol`, sending batches
/// quickly so tests need not wait for the default 5 s schedule.
fn pipeline(protocol: Protocol, endpoint: &str) -> Otlp {
    Otlp::new().protocol(protocol).endpoint(endpoint).scheduled_delay(Duration::from_millis(50))
}

/// Runs `test` on a runtime of its own, then shuts `pipeline` down (outside
/// any runtime, as the binary does) and returns its counts.
fn traced(pipeline: OtlpPipeline, test: impl AsyncFnOnce(&OtlpPipeline)) -> ExportStats {
    let rt = runtime();
    rt.block_on(test(&pipeline));
    drop(rt);
    pipeline.shutdown()
}

/// Runs `test` with a receiver in this process and a pipeline exporting to
/// it over `protocol` (see [`traced`]), and returns the pipeline's counts.
fn with_collector(protocol: Protocol, test: impl AsyncFnOnce(&OtlpReceiver, &OtlpPipeline)) -> ExportStats {
    let collector = runtime();
    let receiver = collector.block_on(OtlpReceiver::start(protocol));
    let pipeline = pipeline(protocol, receiver.endpoint()).build().expect("build pipeline");
    let stats = traced(pipeline, async |pipeline| test(&receiver, pipeline).await);
    drop(collector);
    stats
}

/// Headers carrying a sampled `traceparent` in [`TRACE_ID`], as a caller
/// that traces would send.
fn incoming_trace() -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", format!("00-{TRACE_ID}-{PARENT_ID}-01").as_str());
    headers
}

fn find<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    spans.iter().find(|s| s.span.name == name).unwrap_or_else(|| {
        let names: Vec<_> = spans.iter().map(|s| &s.span.name).collect();
        panic!("no span named {name:?} among {names:?}")
    })
}

fn kind(s: &ReceivedSpan) -> SpanKind {
    SpanKind::try_from(s.span.kind).unwrap_or(SpanKind::Unspecified)
}

fn status(s: &ReceivedSpan) -> (StatusCode, String) {
    let st = s.span.status.clone().unwrap_or_default();
    (StatusCode::try_from(st.code).unwrap_or(StatusCode::Unset), st.message)
}

/// A → B → C: A (fanout) publishes to B, B (relay) requests C (echo, in a
/// queue group). One incoming traceparent; every span must land in its
/// trace with the right parent and attributes.
fn chain_is_one_trace(protocol: Protocol) {
    with_collector(protocol, async |receiver, pipeline| {
        let server = nats();
        let dir = HandlerDir::new();
        dir.add(
            "a",
            "chain-a",
            "fanout",
            "[[trigger]]\nsubject = \"chain.a\"\n[permissions]\npublish = [\"chain.b\"]\n[config]\ntargets = \"chain.b\"",
        )
        .add(
            "b",
            "chain-b",
            "relay",
            "[[trigger]]\nsubject = \"chain.b\"\n[permissions]\nrequest = [\"chain.c\"]\n[config]\nupstream = \"chain.c\"",
        )
        .add(
            "c",
            "chain-c",
            "echo",
            "[[trigger]]\nsubject = \"chain.c\"\nqueue = \"echoes\"",
        );
        let host = start_traced_host(&server, &dir, Some(pipeline.tracer())).await;
        let versions: HashMap<String, String> =
            host.stats().into_iter().map(|(h, _)| (h.name.to_string(), h.version)).collect();
        let client = client(&server).await;

        let mut headers = incoming_trace();
        headers.insert("tracestate", "vendor=abc");
        client.publish_with_headers("chain.a", headers, "hello".into()).await.unwrap();
        client.flush().await.unwrap();

        let spans = receiver
            .wait_for("the five spans of the chain", |s| s.iter().filter(|s| s.trace_id() == TRACE_ID).count() >= 5)
            .await;
        host.shutdown().await;

        let a = find(&spans, "process chain.a");
        let publish = find(&spans, "publish chain.b");
        let b = find(&spans, "process chain.b");
        let request = find(&spans, "request chain.c");
        let c = find(&spans, "process chain.c");

        // One trace, one tree: parent links hop through the host calls.
        for s in [a, publish, b, request, c] {
            assert_eq!(s.trace_id(), TRACE_ID, "{} is in the incoming trace", s.span.name);
            assert_eq!(s.span.trace_state, "vendor=abc", "{} keeps tracestate", s.span.name);
            assert_eq!(s.service_name.as_deref(), Some("natsfn"));
            assert_eq!(s.scope, ("natsfn".to_string(), SEMCONV_SCHEMA_URL.to_string()));
            assert_eq!(status(s).0, StatusCode::Unset, "{} succeeded", s.span.name);
            assert_eq!(s.str_attr("messaging.system"), Some("nats"));
        }
        assert_eq!(spans.iter().filter(|s| s.trace_id() == TRACE_ID).count(), 5, "nothing else in the trace");
        assert_eq!(a.parent_id(), PARENT_ID, "A's parent is the incoming traceparent");
        assert_eq!(publish.parent_id(), a.span_id());
        assert_eq!(b.parent_id(), publish.span_id(), "B continues from A's publish, not from the forwarded header");
        assert_eq!(request.parent_id(), b.span_id());
        assert_eq!(c.parent_id(), request.span_id());

        // Kinds and attributes.
        for (s, handler, subject) in [(a, "chain-a", "chain.a"), (b, "chain-b", "chain.b"), (c, "chain-c", "chain.c")] {
            assert_eq!(kind(s), SpanKind::Consumer);
            assert_eq!(s.str_attr("messaging.operation.type"), Some("process"));
            assert_eq!(s.str_attr("messaging.operation.name"), Some("process"));
            assert_eq!(s.str_attr("messaging.destination.name"), Some(subject));
            assert!(
                !s.has_attr("messaging.destination.subscription.name"),
                "an exact subscription is the subject: not repeated"
            );
            assert_eq!(s.int_attr("messaging.message.body.size"), Some(5));
            assert_eq!(s.str_attr("natsfn.handler"), Some(handler));
            assert_eq!(s.str_attr("natsfn.handler.version"), Some(versions[handler].as_str()));
            assert_eq!(s.str_attr("natsfn.tenant"), Some("default"));
            assert!(!s.has_attr("natsfn.outcome"), "success is the default");
            assert!(!s.has_attr("messaging.destination.template"), "no wildcard, no template");
        }
        assert!(!a.has_attr("messaging.consumer.group.name"), "A has no queue group");
        assert_eq!(c.str_attr("messaging.consumer.group.name"), Some("echoes"));

        assert_eq!(kind(publish), SpanKind::Producer);
        assert_eq!(kind(request), SpanKind::Client);
        for (s, op, subject) in [(publish, "publish", "chain.b"), (request, "request", "chain.c")] {
            assert_eq!(s.str_attr("messaging.operation.type"), Some("send"));
            assert_eq!(s.str_attr("messaging.operation.name"), Some(op));
            assert_eq!(s.str_attr("messaging.destination.name"), Some(subject));
            assert_eq!(s.int_attr("messaging.message.body.size"), Some(5));
        }
    });
}

#[test]
fn a_chain_of_handlers_is_one_trace_over_grpc() {
    chain_is_one_trace(Protocol::Grpc);
}

#[test]
fn a_chain_of_handlers_is_one_trace_over_http() {
    chain_is_one_trace(Protocol::HttpProtobuf);
}

#[test]
fn missing_or_malformed_traceparent_starts_a_new_trace() {
    with_collector(Protocol::HttpProtobuf, async |receiver, pipeline| {
        let server = nats();
        let dir = HandlerDir::new();
        dir.add("echo", "echo", "echo", "[[trigger]]\nsubject = \"t.*\"");
        let host = start_traced_host(&server, &dir, Some(pipeline.tracer())).await;
        let client = client(&server).await;

        let cases: [(&str, Option<&str>); 5] = [
            ("t.none", None),
            ("t.garbage", Some("not a traceparent")),
            ("t.zeros", Some("00-00000000000000000000000000000000-0000000000000000-01")),
            ("t.short", Some("00-4bf92f3577b34da6-00f067aa0ba902b7-01")),
            ("t.badhex", Some("00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01")),
        ];
        for (subject, traceparent) in cases {
            let mut req = async_nats::Request::new().payload("x".into()).timeout(Some(Duration::from_secs(10)));
            if let Some(tp) = traceparent {
                let mut h = async_nats::HeaderMap::new();
                h.insert("traceparent", tp);
                req = req.headers(h);
            }
            let reply = client.send_request(subject, req).await;
            assert!(reply.is_ok(), "{subject} was served: {reply:?}");
        }
        let spans = receiver.wait_for("one span per message", |s| s.len() >= cases.len()).await;
        host.shutdown().await;

        let mut traces = HashSet::new();
        for (subject, _) in cases {
            let s = spans
                .iter()
                .find(|s| s.str_attr("messaging.destination.name") == Some(subject))
                .unwrap_or_else(|| panic!("no span for {subject}"));
            assert_eq!(s.span.name, "process t.*", "named after the subscription");
            assert_eq!(s.str_attr("messaging.destination.template"), Some("t.*"));
            assert_eq!(s.str_attr("messaging.destination.subscription.name"), Some("t.*"));
            assert_eq!(s.parent_id(), "", "{subject}: a root span");
            assert_ne!(s.trace_id(), "0".repeat(32), "{subject}: a real trace id");
            assert_ne!(s.trace_id(), TRACE_ID);
            traces.insert(s.trace_id());
        }
        assert_eq!(traces.len(), cases.len(), "each message started its own trace");
    });
}

#[test]
fn outcomes_set_the_status_and_guest_output_becomes_span_events() {
    with_collector(Protocol::Grpc, async |receiver, pipeline| {
        let server = nats();
        let dir = HandlerDir::new();
        dir.add("greeter", "greeter", "greeter", "[[trigger]]\nsubject = \"greet\"")
            .add("panicker", "panicker", "panicker", "[[trigger]]\nsubject = \"p\"")
            .add(
                "slow",
                "slow",
                "slow",
                "[[trigger]]\nsubject = \"s\"\n[limits]\ntimeout_ms = 200\n[config]\ndelay_ms = 5000",
            )
            .add(
                "forbidden",
                "forbidden",
                "forbidden",
                "[[trigger]]\nsubject = \"probe\"\n[permissions]\npublish = [\"allowed.>\"]\n[config]\ntarget = \"secret.stuff\"\nallowed = \"allowed.ok\"",
            )
            // No `upstream` configured: the handler fails.
            .add("relay", "relay", "relay", "[[trigger]]\nsubject = \"f\"")
            .add("attacker", "attacker", "attacker", "[[trigger]]\nsubject = \"m\"\n[limits]\nmemory_mb = 16");
        let host = start_traced_host(&server, &dir, Some(pipeline.tracer())).await;
        let client = client(&server).await;

        assert_eq!(text(&request(&client, "greet", "Ada").await), "Hello, Ada!");
        assert_eq!(text(&request(&client, "probe", "publish").await), "permission-denied: publish to secret.stuff");
        // None of these replies; wait for all of them at once.
        let unanswered = [("p", "panic"), ("s", "wait"), ("f", "fail"), ("m", "membomb")].map(|(subject, payload)| {
            let req = async_nats::Request::new().payload(payload.into()).timeout(Some(Duration::from_secs(3)));
            let client = client.clone();
            async move { (subject, client.send_request(subject, req).await.is_err()) }
        });
        for (subject, no_reply) in futures::future::join_all(unanswered).await {
            assert!(no_reply, "{subject} sends no reply");
        }
        let spans = receiver.wait_for("the seven spans", |s| s.len() >= 7).await;
        host.shutdown().await;

        let greet = find(&spans, "process greet");
        assert_eq!(status(greet).0, StatusCode::Unset);
        let events: Vec<&str> = greet.span.events.iter().map(|e| e.name.as_str()).collect();
        for line in ["greeting Ada", "greeter stdout: Ada", "greeter stderr: Ada"] {
            assert!(events.contains(&line), "guest line {line:?} is a span event: {events:?}");
        }
        let logged = greet.span.events.iter().find(|e| e.name == "greeting Ada").unwrap();
        assert_eq!(event_attr(logged, "handler"), Some("greeter"));
        assert_eq!(event_attr(logged, "trace_id"), Some(greet.trace_id().as_str()));
        assert_eq!(event_attr(logged, "span_id"), Some(greet.span_id().as_str()));

        let trap = find(&spans, "process p");
        let (code, message) = status(trap);
        assert_eq!(code, StatusCode::Error);
        assert!(message.starts_with("handler trapped: "), "{message}");
        assert_eq!(trap.str_attr("error.type"), Some("trap"));
        assert_eq!(trap.str_attr("natsfn.outcome"), Some("trap"));
        let exception =
            trap.span.events.iter().find(|e| e.name == "exception").expect("the trap is an exception event");
        assert_eq!(event_attr(exception, "exception.type"), Some("trap"));
        assert!(event_attr(exception, "exception.message").is_some_and(|m| !m.is_empty()), "{exception:?}");

        let timeout = find(&spans, "process s");
        assert_eq!(status(timeout), (StatusCode::Error, "handler stopped at its deadline of 200 ms".into()));
        assert_eq!(timeout.str_attr("error.type"), Some("timeout"));

        let failed = find(&spans, "process f");
        assert_eq!(status(failed), (StatusCode::Error, "handler failed: config key upstream is not set".into()));
        assert_eq!(failed.str_attr("error.type"), Some("fail"));
        assert_eq!(failed.str_attr("natsfn.outcome"), Some("fail"));

        let bomb = find(&spans, "process m");
        assert_eq!(
            status(bomb),
            (StatusCode::Error, "handler trapped after reaching its memory limit of 16 MiB".into())
        );
        assert_eq!(bomb.str_attr("error.type"), Some("memory_limit"));
        let exception = bomb.span.events.iter().find(|e| e.name == "exception").expect("an exception event");
        assert_eq!(event_attr(exception, "exception.type"), Some("memory_limit"));

        let denied = find(&spans, "publish secret.stuff");
        assert_eq!(status(denied).0, StatusCode::Error);
        assert_eq!(denied.str_attr("error.type"), Some("permission_denied"));
        let probe = find(&spans, "process probe");
        assert_eq!(denied.parent_id(), probe.span_id());
        assert_eq!(status(probe).0, StatusCode::Unset, "the guest handled the denial");
    });
}

/// Requests `n` echoes, 16 at a time; every one must be answered.
async fn hammer(client: &async_nats::Client, n: usize) -> Duration {
    let started = Instant::now();
    let answered = futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move { text(&request(&client, "load", &i.to_string()).await) == i.to_string() }
        })
        .buffer_unordered(16)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    assert_eq!(answered, n, "every request answered");
    started.elapsed()
}

/// A collector that refuses connections, and one that accepts and never
/// answers: handlers keep serving every message, and the spans that cannot
/// be exported are counted as dropped instead of being waited for.
#[test]
fn a_down_or_hung_collector_never_holds_up_handlers() {
    const N: usize = 400;
    let collector = runtime();
    let hung = collector.block_on(HungCollector::start());
    for (what, protocol, endpoint) in
        [("refused", Protocol::Grpc, refused_endpoint()), ("hung", Protocol::HttpProtobuf, hung.endpoint())]
    {
        let pipeline =
            pipeline(protocol, &endpoint).max_queue_size(64).export_timeout(Duration::from_secs(2)).build().unwrap();
        let stats = traced(pipeline, async |pipeline| {
            let server = nats();
            let dir = HandlerDir::new();
            dir.add("echo", "echo", "echo", "[[trigger]]\nsubject = \"load\"");
            let host = start_traced_host(&server, &dir, Some(pipeline.tracer())).await;
            let client = client(&server).await;

            let took = hammer(&client, N).await;
            println!("{what} collector: {N} requests in {took:?}");
            assert_eq!(host.handler_stats("echo").unwrap().ok, N as u64);

            // The first batch is still being tried (refused: retried with
            // backoff; hung: until the export timeout), so the queue filled
            // and the later spans were dropped on the spot.
            let stats = pipeline.stats();
            println!("{what} collector, after the load: {stats:?}");
            assert!(stats.dropped_queue_full > 0, "{what}: spans beyond the queue are dropped and counted: {stats:?}");
            // Then the stuck export gives up and its spans count as failed.
            let deadline = Instant::now() + Duration::from_secs(15);
            while pipeline.stats().dropped_export_failed == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                pipeline.stats().dropped_export_failed > 0,
                "{what}: a failed export is counted: {:?}",
                pipeline.stats()
            );
            host.shutdown().await;
        });
        println!("{what} collector, after shutdown: {stats:?}");
        assert_eq!(stats.exported, 0, "{what}: nothing could be exported");
        assert_eq!(
            stats.dropped_queue_full + stats.dropped_export_failed,
            N as u64,
            "{what}: every span is accounted for: {stats:?}"
        );
    }
    drop(hung);
    drop(collector);
}

/// The `natsfn` binary configured only by the standard variables: it
/// traces, names the service, and flushes the last spans on SIGTERM (the
/// batch schedule is set to a minute, so only the shutdown flush can have
/// delivered them).
/// The binary: `OTEL_*` variables, or the same settings as flags, configure
/// export and sampling; spans are flushed on shutdown; and a guest's log line
/// reaches the host log with the trace and span ids of its invocation.
#[test]
fn the_binary_traces_from_otel_variables_and_flushes_on_shutdown() {
    traced_binary(|receiver| {
        (
            vec![],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.to_owned()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_owned()),
                // New traces are never sampled; those the caller sampled always are.
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".to_owned()),
                ("OTEL_TRACES_SAMPLER_ARG", "0".to_owned()),
            ],
        )
    });
}

#[test]
fn the_binary_takes_the_same_tracing_settings_as_flags() {
    traced_binary(|receiver| {
        let flags = [
            ("--otlp-endpoint", receiver),
            ("--otlp-protocol", "grpc"),
            ("--trace-sampler", "parentbased_traceidratio"),
            ("--trace-sampler-arg", "0"),
        ];
        (flags.iter().flat_map(|(flag, value)| [flag.to_string(), value.to_string()]).collect(), vec![])
    });
}

/// Runs `natsfn run` with the tracing settings `settings` returns for the
/// receiver's endpoint (flags, environment variables). The settings must
/// export over gRPC and never sample new traces.
fn traced_binary(settings: impl FnOnce(&str) -> (Vec<String>, Vec<(&'static str, String)>)) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let collector = runtime();
    let receiver = collector.block_on(OtlpReceiver::start(Protocol::Grpc));
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("echo", "echo", "echo", "[[trigger]]\nsubject = \"bin.echo\"").add(
        "greeter",
        "greeter",
        "greeter",
        "[[trigger]]\nsubject = \"bin.greet\"",
    );
    let (flags, vars) = settings(receiver.endpoint());
    let mut child = Command::new(env!("CARGO_BIN_EXE_natsfn-cli"))
        .args(["run", "--handlers", dir.path().to_str().unwrap()])
        .args(["--nats", &server.url()])
        .args(flags)
        .envs(vars)
        .env("OTEL_SERVICE_NAME", "orders")
        .env("OTEL_BSP_SCHEDULE_DELAY", "60000")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn natsfn");
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("natsfn: ready")) {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("natsfn never got ready: {seen:?}");
            }
        }
    }
    assert!(seen.iter().any(|l| l.contains("tracing on, exporting spans over OTLP grpc")), "{seen:?}");

    collector.block_on(async {
        let client = client(&server).await;
        assert_eq!(text(&request(&client, "bin.echo", "hi").await), "hi");
        let headers = incoming_trace();
        let req = async_nats::Request::new().headers(headers).payload("Ada".into());
        assert_eq!(text(&client.send_request("bin.greet", req).await.unwrap()), "Hello, Ada!");
    });
    assert!(receiver.spans().is_empty(), "nothing exported before shutdown");
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));

    let spans = receiver.spans();
    assert_eq!(spans.len(), 1, "only the caller-sampled invocation is recorded: {spans:?}");
    let greet = &spans[0];
    assert_eq!(greet.span.name, "process bin.greet");
    assert_eq!(greet.trace_id(), TRACE_ID);
    assert_eq!(greet.service_name.as_deref(), Some("orders"));

    let log = log.join().unwrap();
    let line = log.iter().find(|l| l.contains("greeting Ada")).unwrap_or_else(|| panic!("no guest line in {log:?}"));
    assert!(line.contains(&format!("trace_id={TRACE_ID}")), "{line}");
    assert!(line.contains(&format!("span_id={}", greet.span_id())), "{line}");
    assert!(line.contains("handler=greeter"), "{line}");
    drop(collector);
}

/// Bad tracing settings stop the binary before it starts, naming the flag or
/// variable at fault.
#[test]
fn bad_tracing_settings_are_reported_by_name() {
    let dir = HandlerDir::new();
    let dir = dir.path().to_str().unwrap();
    for (args, env, expected) in [
        (vec!["--otlp-endpoint", "http://127.0.0.1:1", "--otlp-protocol", "http/json"], vec![], "--otlp-protocol"),
        (
            vec![
                "--otlp-endpoint",
                "http://127.0.0.1:1",
                "--trace-sampler",
                "traceidratio",
                "--trace-sampler-arg",
                "7",
            ],
            vec![],
            "--trace-sampler-arg: `7` is not a sampling ratio between 0 and 1",
        ),
        (
            vec![],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"), ("OTEL_TRACES_SAMPLER", "sometimes")],
            "OTEL_TRACES_SAMPLER: unknown sampler `sometimes`",
        ),
        (
            vec![],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon"),
            ],
            "OTEL_EXPORTER_OTLP_PROTOCOL: unknown OTLP protocol `carrier-pigeon`",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_natsfn-cli"))
            .args(["run", "--handlers", dir])
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .expect("run natsfn");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?} {env:?}: {stderr}");
    }
}

#[test]
fn kv_and_object_calls_are_client_spans_with_bucket_and_key() {
    with_collector(Protocol::Grpc, async |receiver, pipeline| {
        let server = nats();
        let client = client(&server).await;
        let js = async_nats::jetstream::new(client.clone());
        js.create_key_value(async_nats::jetstream::kv::Config { bucket: "counters".into(), ..Default::default() })
            .await
            .unwrap();
        let dir = HandlerDir::new();
        dir.add(
            "counter",
            "counter",
            "kvcounter",
            "[[trigger]]\nsubject = \"count\"\n[permissions]\nkv = { counters = \"write\" }",
        )
        .add("forbidden", "forbidden", "forbidden", "[[trigger]]\nsubject = \"probe\"");
        let host = start_traced_host(&server, &dir, Some(pipeline.tracer())).await;

        let headers = incoming_trace();
        let req = async_nats::Request::new().headers(headers).payload("".into());
        assert_eq!(text(&client.send_request("count", req).await.unwrap()), "1");
        assert_eq!(text(&request(&client, "probe", "kv-denied").await), "permission-denied: kv read on bucket secret");
        assert_eq!(
            text(&request(&client, "probe", "object-denied").await),
            "permission-denied: object write on bucket secret"
        );
        let spans = receiver.wait_for("process, kv.get, kv.create and the denied calls", |s| s.len() >= 7).await;
        host.shutdown().await;

        let process = find(&spans, "process count");
        for name in ["kv.get counters", "kv.create counters"] {
            let call = find(&spans, name);
            assert_eq!(kind(call), SpanKind::Client, "{name}");
            assert_eq!(call.trace_id(), TRACE_ID, "{name} is in the incoming trace");
            assert_eq!(call.parent_id(), process.span_id(), "{name} is a child of the invocation");
            assert_eq!(call.str_attr("natsfn.bucket"), Some("counters"));
            assert_eq!(call.str_attr("natsfn.key"), Some("counter"));
            assert_eq!(call.str_attr("db.system.name"), Some("nats"));
            assert_eq!(status(call).0, StatusCode::Unset);
        }
        for name in ["kv.get secret", "object.put secret"] {
            let denied = find(&spans, name);
            assert_eq!(kind(denied), SpanKind::Client, "{name}");
            assert_eq!(status(denied).0, StatusCode::Error, "{name}");
            assert_eq!(denied.str_attr("error.type"), Some("permission_denied"), "{name}");
            assert_eq!(denied.str_attr("natsfn.key"), Some(if name.starts_with("kv") { "k" } else { "o" }));
        }
    });
}

/// A JetStream delivery is `process {stream}` with the durable as consumer
/// group, the stream sequence and the delivery count; a redelivery is a new
/// span in the same incoming trace, and a retry is recorded as such, not as
/// an error.
#[test]
fn jetstream_deliveries_carry_stream_sequence_and_delivery_count() {
    with_collector(Protocol::HttpProtobuf, async |receiver, pipeline| {
        let server = nats();
        let client = client(&server).await;
        let js = async_nats::jetstream::new(client.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let dir = HandlerDir::new();
        dir.add(
            "flaky",
            "flaky",
            "flaky",
            "[[trigger]]\njetstream = { stream = \"ORDERS\", durable = \"workers\" }\n\
             [permissions]\npublish = [\"flaky.attempts\"]\n[config]\nfail_times = 1\nretry_ms = 50",
        );
        let host = start_traced_host(&server, &dir, Some(pipeline.tracer())).await;

        let headers = incoming_trace();
        js.publish_with_headers("orders.new", headers, "order".into()).await.unwrap().await.unwrap();
        let spans = receiver
            .wait_for("two deliveries", |s| s.iter().filter(|s| s.span.name == "process ORDERS").count() >= 2)
            .await;
        host.shutdown().await;

        let mut deliveries: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.span.name == "process ORDERS").collect();
        deliveries.sort_by_key(|s| s.int_attr("natsfn.jetstream.delivered"));
        for (n, s) in deliveries.iter().enumerate() {
            assert_eq!(kind(s), SpanKind::Consumer);
            assert_eq!(s.trace_id(), TRACE_ID, "delivery {} is in the incoming trace", n + 1);
            assert_eq!(s.parent_id(), PARENT_ID);
            assert_eq!(s.int_attr("natsfn.jetstream.delivered"), Some(n as i64 + 1));
            assert_eq!(s.int_attr("natsfn.jetstream.stream_sequence"), Some(1));
            assert_eq!(s.str_attr("messaging.message.id"), Some("1"));
            assert_eq!(s.str_attr("natsfn.jetstream.stream"), Some("ORDERS"));
            assert_eq!(s.str_attr("messaging.consumer.group.name"), Some("workers"));
            assert_eq!(s.str_attr("messaging.destination.name"), Some("orders.new"));
            assert_eq!(s.int_attr("messaging.message.body.size"), Some(5));
            assert_eq!(status(s).0, StatusCode::Unset, "a retry is not an error");
        }
        assert_eq!(deliveries[0].str_attr("natsfn.outcome"), Some("retry"));
        assert!(!deliveries[1].has_attr("natsfn.outcome"), "the second delivery succeeded");
        // Each attempt announced itself: a producer span under its delivery.
        let announcements: Vec<&ReceivedSpan> =
            spans.iter().filter(|s| s.span.name == "publish flaky.attempts").collect();
        assert_eq!(announcements.len(), 2);
        for d in &deliveries {
            assert!(announcements.iter().any(|a| a.parent_id() == d.span_id()), "{:?} has its publish", d.span.name);
        }
    });
}

/// `jetstream-publish` is a producer span under the invocation, and the
/// message it stores carries that span's context, so whoever consumes the
/// stream later continues the trace.
#[test]
fn a_jetstream_publish_is_a_producer_span_whose_context_is_stored_with_the_message() {
    with_collector(Protocol::HttpProtobuf, async |receiver, pipeline| {
        let server = nats();
        let client = client(&server).await;
        let js = async_nats::jetstream::new(client.clone());
        for (name, subject) in [("JOBS", "jobs.>"), ("RESULTS", "results.>")] {
            let config = async_nats::jetstream::stream::Config {
                name: name.into(),
                subjects: vec![subject.into()],
                ..Default::default()
            };
            js.create_stream(config).await.unwrap();
        }
        let dir = HandlerDir::new();
        dir.add(
            "worker",
            "worker",
            "jsworker",
            "[[trigger]]\njetstream = { stream = \"JOBS\", durable = \"workers\" }\n\
             [permissions]\npublish = [\"results.done\"]\n[config]\nresults = \"results.done\"",
        );
        let host = start_traced_host(&server, &dir, Some(pipeline.tracer())).await;

        let headers = incoming_trace();
        js.publish_with_headers("jobs.new", headers, "job".into()).await.unwrap().await.unwrap();
        let spans = receiver.wait_for("the invocation and its publish", |s| s.len() >= 2).await;
        host.shutdown().await;

        let process = find(&spans, "process JOBS");
        let publish = find(&spans, "publish results.done");
        assert_eq!(kind(publish), SpanKind::Producer);
        assert_eq!(publish.trace_id(), TRACE_ID);
        assert_eq!(publish.parent_id(), process.span_id());
        assert_eq!(publish.str_attr("messaging.operation.name"), Some("jetstream.publish"));
        assert_eq!(publish.str_attr("messaging.message.id"), Some("JOBS-1"));
        assert_eq!(status(publish).0, StatusCode::Unset);

        let results = js.get_stream("RESULTS").await.unwrap();
        let stored = results.get_last_raw_message_by_subject("results.done").await.unwrap();
        let traceparent = stored.headers.get("traceparent").map(|v| v.as_str().to_owned());
        assert_eq!(traceparent, Some(format!("00-{TRACE_ID}-{}-01", publish.span_id())));
    });
}

/// A reused instance keeps its WASI streams from one message to the next;
/// its output must still land in the span of the message being handled, and
/// each span must end with its own message.
#[test]
fn a_reused_instance_writes_into_each_messages_own_span() {
    with_collector(Protocol::HttpProtobuf, async |receiver, pipeline| {
        let server = nats();
        let dir = HandlerDir::new();
        dir.add(
            "greeter",
            "greeter",
            "greeter",
            "instance = \"reuse\"\n[[trigger]]\nsubject = \"greet\"\n[limits]\nmax_concurrency = 1",
        );
        let host = start_traced_host(&server, &dir, Some(pipeline.tracer())).await;
        let client = client(&server).await;
        for name in ["Ada", "Grace", "Edsger"] {
            assert_eq!(text(&request(&client, "greet", name).await), format!("Hello, {name}!"));
        }
        // Exported while the host still runs: each span ended with its message.
        let spans = receiver.wait_for("three invocations", |s| s.len() >= 3).await;
        host.shutdown().await;

        let trace_ids: HashSet<String> = spans.iter().map(ReceivedSpan::trace_id).collect();
        assert_eq!(trace_ids.len(), 3, "each message starts its own trace");
        for name in ["Ada", "Grace", "Edsger"] {
            let span = spans
                .iter()
                .find(|s| s.span.events.iter().any(|e| e.name == format!("greeting {name}")))
                .unwrap_or_else(|| panic!("no span has the log line for {name}"));
            let events: Vec<&str> = span.span.events.iter().map(|e| e.name.as_str()).collect();
            let stdout = format!("greeter stdout: {name}");
            assert!(events.contains(&stdout.as_str()), "stdout for {name} in its own span: {events:?}");
            assert_eq!(events.len(), 3, "only {name}'s lines: {events:?}");
            let line = span.span.events.iter().find(|e| e.name == stdout).unwrap();
            assert_eq!(event_attr(line, "span_id"), Some(span.span_id().as_str()));
        }
    });
}
