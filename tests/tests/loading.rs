//! Loading handlers: bad manifests and broken components are reported with
//! the file and field at fault, and never keep good handlers from serving.
//! Also the embedding API and its example.

use std::time::Duration;

use natsfn_e2e::*;

/// A handlers directory with one good handler and one of every kind of
/// broken one.
fn mixed_dir() -> HandlerDir {
    let dir = HandlerDir::new();
    let echo = guest("echo");
    dir.add("a-good", "good", "echo", "[[trigger]]\nsubject = \"good\"")
        .add("b-unknown-field", "unknown", "echo", "[[trigger]]\nsubject = \"u\"\ncolour = \"red\"")
        .add("c-bad-subject", "badsubject", "echo", "[[trigger]]\nsubject = \"orders..created\"")
        .add("d-tail-not-last", "tail", "echo", "[[trigger]]\nsubject = \"orders.>.x\"")
        .add("e-space", "space", "echo", "[[trigger]]\nsubject = \"orders created\"")
        .add("f-duplicate", "good", "echo", "[[trigger]]\nsubject = \"dup\"")
        .write(
            "g-missing-component.toml",
            "name = \"missing\"\ncomponent = \"nowhere.wasm\"\n[[trigger]]\nsubject = \"m\"\n",
        )
        .write("h-not-wasm.wasm", "this is not wasm")
        .write("h-not-wasm.toml", "name = \"notwasm\"\ncomponent = \"h-not-wasm.wasm\"\n[[trigger]]\nsubject = \"n\"\n")
        .write("i-not-toml.toml", "name = [unclosed\n")
        .write("k-no-component.toml", "name = \"nocomponent\"\n[[trigger]]\nsubject = \"k\"\n");
    // A valid component of the wrong world: the WASI adapter-free echo is
    // fine, but a bare core module is not a component at all.
    dir.write("j-core-module.wasm", "");
    std::fs::write(dir.path().join("j-core-module.wasm"), b"\0asm\x01\0\0\0").unwrap();
    dir.write(
        "j-core-module.toml",
        "name = \"core\"\ncomponent = \"j-core-module.wasm\"\n[[trigger]]\nsubject = \"c\"\n",
    );
    assert!(echo.is_file());
    dir
}

#[tokio::test]
async fn broken_handlers_are_skipped_with_clear_errors_and_good_ones_serve() {
    let server = nats();
    let dir = mixed_dir();
    let host = natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path()).build().await.unwrap();

    let loaded: Vec<String> = host.handlers().iter().map(|h| h.name.to_string()).collect();
    assert_eq!(loaded, vec!["good"]);

    let errors: Vec<String> = host.load_errors().iter().map(ToString::to_string).collect();
    let expect = [
        ("b-unknown-field.toml", "unknown field `colour`"),
        ("c-bad-subject.toml", "trigger[0].subject: `orders..created` has an empty token"),
        ("d-tail-not-last.toml", "trigger[0].subject: `orders.>.x`: `>` may only be the last token"),
        ("e-space.toml", "trigger[0].subject: `orders created` contains whitespace"),
        ("f-duplicate.toml", "name: handler `good` of tenant `default` is already defined by"),
        ("g-missing-component.toml", "component: "),
        ("h-not-wasm.wasm", "not a valid WebAssembly component"),
        ("i-not-toml.toml", "TOML parse error"),
        ("j-core-module.wasm", "not a valid WebAssembly component"),
        ("k-no-component.toml", "component: missing"),
    ];
    assert_eq!(errors.len(), expect.len(), "{errors:#?}");
    for (file, needle) in expect {
        assert!(
            errors.iter().any(|e| e.contains(file) && e.contains(needle)),
            "no error naming {file} with `{needle}` in {errors:#?}"
        );
    }

    let running = host.start().await.unwrap();
    let client = client(&server).await;
    assert_eq!(text(&request(&client, "good", "still serving").await), "still serving");
    running.shutdown().await;
}

#[tokio::test]
async fn a_component_of_the_wrong_world_is_named() {
    let server = nats();
    let dir = HandlerDir::new();
    // A valid component that exports nothing natsfn can call.
    let empty_component = b"\0asm\x0d\0\x01\0";
    std::fs::write(dir.path().join("empty.wasm"), empty_component).unwrap();
    dir.write("empty.toml", "name = \"empty\"\ncomponent = \"empty.wasm\"\n[[trigger]]\nsubject = \"x\"\n");
    let host = natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path()).build().await.unwrap();
    let errors: Vec<String> = host.load_errors().iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("empty.wasm") && errors[0].contains("does not fit the natsfn:host/handler world"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn handlers_can_be_added_from_bytes() {
    let server = nats();
    let wasm = std::fs::read(guest("echo")).unwrap();
    let host = natsfn::Host::builder()
        .nats_url(server.url())
        .handler("inline-echo", "name = \"inline\"\n[[trigger]]\nsubject = \"inline\"\n", wasm.clone())
        .handler("broken", "name = \"broken\"\n[[trigger]]\nsubject = \"b..\"\n", wasm)
        .build()
        .await
        .unwrap();
    let errors: Vec<String> = host.load_errors().iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        vec!["broken: trigger[0].subject: `b..` has an empty token (a leading, trailing or doubled `.`)"]
    );
    let running = host.start().await.unwrap();
    let client = client(&server).await;
    assert_eq!(text(&request(&client, "inline", "bytes").await), "bytes");
    running.shutdown().await;
}

#[tokio::test]
async fn the_embed_example_runs_inside_its_own_runtime() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("greeter", "greeter", "greeter", "[[trigger]]\nsubject = \"embed.greet\"");
    let wasm = std::fs::read(guest("echo")).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let url = server.url();
    let dir_path = dir.path().to_owned();
    let embedded = tokio::spawn(async move {
        natsfn_embed_example::run(&url, &dir_path, wasm, async {
            let _ = stop_rx.await;
        })
        .await
    });

    let client = client(&server).await;
    // The host binds its triggers after start-up; retry until it answers.
    let mut echoed = None;
    for _ in 0..100 {
        let req = async_nats::Request::new().payload("hi".into()).timeout(Some(Duration::from_secs(2)));
        match client.send_request("embed.echo", req).await {
            Ok(m) => {
                echoed = Some(text(&m));
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(echoed.as_deref(), Some("hi"));
    assert_eq!(text(&request(&client, "embed.greet", "embedder").await), "Hello, embedder!");
    stop_tx.send(()).unwrap();
    let report = embedded.await.unwrap().unwrap();
    assert!(report.clean);
}

#[tokio::test]
async fn a_restart_with_a_warm_cache_skips_compilation() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add("echo", "echo", "echo", "[[trigger]]\nsubject = \"cached\"");
    let cache = tempfile::tempdir().unwrap();
    let build = || async {
        natsfn::Host::builder()
            .nats_url(server.url())
            .handlers_dir(dir.path())
            .cache_dir(cache.path())
            .build()
            .await
            .unwrap()
    };
    let outcome = |host: &natsfn::Host| host.handlers()[0].cache;

    let cold = build().await;
    assert_eq!(outcome(&cold), natsfn::engine::CacheOutcome::Miss);
    // Even the code just compiled runs from its entry: a mapping of the
    // file (which the kernel may share and reclaim), not a copy in the
    // process's own memory.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let cache_dir = cache.path().to_str().unwrap();
    assert!(
        maps.lines().any(|l| l.contains(cache_dir) && l.ends_with(".cwasm")),
        "no mapping of a cache entry in:\n{maps}"
    );
    let running = cold.start().await.unwrap();
    assert_eq!(text(&request(&client(&server).await, "cached", "compiled").await), "compiled");
    running.shutdown().await;

    // Loading an entry marks it used, so a full cache evicts it last.
    let entries = || std::fs::read_dir(cache.path()).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for entry in entries() {
        std::fs::File::options().write(true).open(entry).unwrap().set_modified(an_hour_ago).unwrap();
    }
    let warm = build().await;
    assert_eq!(outcome(&warm), natsfn::engine::CacheOutcome::Hit, "the second start loads compiled code");
    for entry in entries() {
        let used = std::fs::metadata(&entry).unwrap().modified().unwrap();
        assert!(used > an_hour_ago + Duration::from_secs(3000), "{} not marked used", entry.display());
    }
    let running = warm.start().await.unwrap();
    assert_eq!(text(&request(&client(&server).await, "cached", "from cache").await), "from cache");
    running.shutdown().await;

    // A damaged entry is ignored and replaced, never trusted.
    for entry in entries() {
        std::fs::write(entry, b"garbage").unwrap();
    }
    assert_eq!(outcome(&build().await), natsfn::engine::CacheOutcome::Miss);
    assert_eq!(outcome(&build().await), natsfn::engine::CacheOutcome::Hit);
}

/// What the benchmark's idle figure for distinct components relies on: a
/// copy of a component in other bytes is compiled and held apart, and
/// runs as the original does.
#[tokio::test]
async fn distinct_copies_of_a_component_are_compiled_apart_and_run() {
    let server = nats();
    let dir = HandlerDir::new();
    let wasm = std::fs::read(guest("echo")).unwrap();
    for i in 0..2 {
        dir.write_bytes(&format!("e{i}.wasm"), &distinct_copy(&wasm, i));
        dir.write(
            &format!("e{i}.toml"),
            &format!("name = \"e{i}\"\ncomponent = \"e{i}.wasm\"\n[[trigger]]\nsubject = \"copy.{i}\"\n"),
        );
    }
    let host = natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path()).build().await.unwrap();
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    let handlers = host.handlers();
    assert_eq!(handlers.len(), 2);
    assert!(handlers.iter().all(|h| h.cache == natsfn::engine::CacheOutcome::Miss), "each compiled on its own");
    assert_ne!(handlers[0].version, handlers[1].version);
    let running = host.start().await.unwrap();
    let client = client(&server).await;
    for i in 0..2 {
        assert_eq!(text(&request(&client, &format!("copy.{i}"), "copied").await), "copied");
    }
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_with_the_same_component_share_its_code() {
    let server = nats();
    let dir = HandlerDir::new();
    for tenant in ["t1", "t2", "t3"] {
        dir.add(tenant, "echo", "echo", &format!("tenant = \"{tenant}\"\n[[trigger]]\nsubject = \"{tenant}.echo\""));
    }
    let host = natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path()).build().await.unwrap();
    let mut outcomes: Vec<_> = host.handlers().iter().map(|h| h.cache).collect();
    outcomes.sort_by_key(|o| format!("{o:?}"));
    use natsfn::engine::CacheOutcome::{Miss, Shared};
    assert_eq!(outcomes, vec![Miss, Shared, Shared], "compiled once, shared twice");
    let running = host.start().await.unwrap();
    let client = client(&server).await;
    for tenant in ["t1", "t2", "t3"] {
        assert_eq!(text(&request(&client, &format!("{tenant}.echo"), tenant).await), tenant);
    }
    // Each handler still gets its own instances and counters.
    assert_eq!(running.stats().iter().map(|(_, s)| s.invocations).sum::<u64>(), 3);
    running.shutdown().await;
}
