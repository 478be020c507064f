//! Hot reload: components swapped under load without losing or repeating a
//! message, broken files that leave the old version serving, handlers added,
//! rebound and removed, and the `dev` command's report.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use natsfn_e2e::*;

/// A handlers directory whose `tagger` handler runs `tagger.wasm`, a copy
/// of guest `taga` or `tagb` that the test overwrites.
fn tagger_dir(body: &str) -> HandlerDir {
    let dir = HandlerDir::new();
    std::fs::copy(guest("taga"), dir.path().join("tagger.wasm")).unwrap();
    dir.write("tagger.toml", &format!("name = \"tagger\"\ncomponent = \"tagger.wasm\"\n{body}\n"));
    dir
}

/// Replaces the component the way a build tool does: write beside, rename.
fn install(dir: &Path, guest_name: &str) {
    let tmp = dir.join("tagger.wasm.tmp");
    std::fs::copy(guest(guest_name), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("tagger.wasm")).unwrap();
}

async fn tag_of(client: &async_nats::Client, subject: &str) -> Option<String> {
    let req = async_nats::Request::new().payload("probe".into()).timeout(Some(Duration::from_secs(2)));
    let reply = client.send_request(subject.to_owned(), req).await.ok()?;
    Some(text(&reply).split(':').next()?.to_owned())
}

async fn wait_for_tag(client: &async_nats::Client, subject: &str, tag: &str) {
    let start = Instant::now();
    while tag_of(client, subject).await.as_deref() != Some(tag) {
        assert!(start.elapsed() < Duration::from_secs(30), "{subject} never answered as {tag}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_swaps_under_load_lose_and_repeat_nothing() {
    let server = nats();
    let client = client(&server).await;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "SWAP".into(),
        subjects: vec!["swap.js".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tagger_dir(
        "[[trigger]]\nsubject = \"swap.core\"\nqueue = \"swappers\"\n[[trigger]]\njetstream = { stream = \"SWAP\", durable = \"swapper\" }\n[permissions]\npublish = [\"tagged.out\"]",
    );
    let host = start_host(&server, &dir).await;
    host.watch(|_| {}).unwrap();
    let mut out = client.subscribe("tagged.out").await.unwrap();
    client.flush().await.unwrap();

    // Load: core requests and JetStream messages, steadily, while swapping.
    let stop = tokio_util_like_flag();
    let core_load = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tags = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req =
                    async_nats::Request::new().payload(i.to_string().into()).timeout(Some(Duration::from_secs(10)));
                let reply = client
                    .send_request("swap.core", req)
                    .await
                    .unwrap_or_else(|e| panic!("core request {i} lost: {e}"));
                let (tag, payload) = text(&reply).split_once(':').map(|(t, p)| (t.to_owned(), p.to_owned())).unwrap();
                assert_eq!(payload, i.to_string());
                tags.push(tag);
                i += 1;
            }
            tags
        })
    };
    let js_load = {
        let js = js.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                js.publish("swap.js", n.to_string().into()).await.unwrap().await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };

    for swap in 0..20 {
        let next = if swap % 2 == 0 { "tagb" } else { "taga" };
        install(dir.path(), next);
        let tag = if next == "tagb" { "B" } else { "A" };
        wait_for_tag(&client, "swap.core", tag).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let core_tags = core_load.await.unwrap();
    let published = js_load.await.unwrap();

    let stats = host.handler_stats("tagger").unwrap();
    assert_eq!(stats.failed + stats.trapped + stats.timed_out, 0, "{stats:?}");
    assert!(core_tags.iter().any(|t| t == "A") && core_tags.iter().any(|t| t == "B"), "both versions served core");

    // Every JetStream message handled exactly once, by one version or the other.
    let start = Instant::now();
    let mut seen = HashSet::new();
    let mut tags = HashSet::new();
    while (seen.len() as u64) < published {
        let m = tokio::time::timeout(Duration::from_secs(10), out.next()).await.expect("all JetStream output").unwrap();
        assert!(seen.insert(text(&m)), "message {} handled twice", text(&m));
        tags.insert(header(&m, "tag").unwrap().to_owned());
        assert!(start.elapsed() < Duration::from_secs(60));
    }
    assert!(collect_until_quiet(&mut out, Duration::from_millis(500)).await.is_empty(), "no duplicates afterwards");
    assert_eq!(tags, HashSet::from(["A".to_owned(), "B".to_owned()]));
    println!("core requests: {}, JetStream messages: {published}, all handled once", core_tags.len());
    host.shutdown().await;
}

/// A shared stop flag.
fn tokio_util_like_flag() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false))
}

#[tokio::test]
async fn a_broken_file_keeps_the_old_version_until_it_is_fixed() {
    let server = nats();
    let dir = tagger_dir("[[trigger]]\nsubject = \"t\"");
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    assert_eq!(tag_of(&client, "t").await.as_deref(), Some("A"));

    // Half a component, as a compiler still writing would leave it.
    let full = std::fs::read(guest("tagb")).unwrap();
    std::fs::write(dir.path().join("tagger.wasm"), &full[..full.len() / 2]).unwrap();
    let report = host.reload().await;
    assert!(report.changes.is_empty());
    let errors: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    assert!(
        errors.len() == 1
            && errors[0].contains("tagger.wasm")
            && errors[0].contains("not a valid WebAssembly component"),
        "{errors:?}"
    );
    assert_eq!(tag_of(&client, "t").await.as_deref(), Some("A"), "the old version keeps serving");

    // A broken manifest is no different.
    let manifest = std::fs::read_to_string(dir.path().join("tagger.toml")).unwrap();
    dir.write("tagger.toml", "name = \"tagger\"\n[[trigger]]\nsubject = \"t..\"\n");
    let report = host.reload().await;
    assert!(report.errors[0].to_string().contains("tagger.toml: trigger[0].subject"), "{:?}", report.errors);
    assert_eq!(tag_of(&client, "t").await.as_deref(), Some("A"));

    // Fixed: the new version takes over without a restart.
    dir.write("tagger.toml", &manifest);
    install(dir.path(), "tagb");
    let report = host.reload().await;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.changes.len(), 1);
    assert_eq!(report.changes[0].kind, natsfn::ChangeKind::Updated);
    assert_eq!(tag_of(&client, "t").await.as_deref(), Some("B"));
    assert!(host.reload().await.changes.is_empty(), "nothing changed, nothing reloaded");
    host.shutdown().await;
}

#[tokio::test]
async fn handlers_are_added_rebound_and_removed() {
    let server = nats();
    let dir = HandlerDir::new();
    let host = start_host(&server, &dir).await;
    let client = client(&server).await;
    host.watch(|_| {}).unwrap();

    // Dropped into the directory: served, found by the watcher.
    std::fs::copy(guest("taga"), dir.path().join("tagger.wasm")).unwrap();
    dir.write("tagger.toml", "name = \"tagger\"\ncomponent = \"tagger.wasm\"\n[[trigger]]\nsubject = \"old\"\n");
    wait_for_tag(&client, "old", "A").await;

    // A changed trigger: the old subject is unbound, the new one bound.
    dir.write("tagger.toml", "name = \"tagger\"\ncomponent = \"tagger.wasm\"\n[[trigger]]\nsubject = \"new\"\n");
    wait_for_tag(&client, "new", "A").await;
    let req = async_nats::Request::new().payload("x".into()).timeout(Some(Duration::from_secs(2)));
    let old = client.send_request("old", req).await.unwrap_err();
    assert_eq!(old.kind(), async_nats::client::RequestErrorKind::NoResponders);

    // Removed: drained and unbound; the server has no subscriber left.
    std::fs::remove_file(dir.path().join("tagger.toml")).unwrap();
    let start = Instant::now();
    loop {
        let req = async_nats::Request::new().payload("x".into()).timeout(Some(Duration::from_secs(2)));
        match client.send_request("new", req).await {
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => break,
            _ => assert!(start.elapsed() < Duration::from_secs(30), "the removed handler still answers"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(host.handlers().is_empty());
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_reports_each_reload_with_its_timings() {
    let server = nats();
    let dir = tagger_dir("[[trigger]]\nsubject = \"dev\"");
    let cache = tempfile::tempdir().unwrap();
    let mut natsfn = NatsfnProcess::spawn(
        env!("CARGO_BIN_EXE_natsfn-cli"),
        &[
            "dev",
            "--handlers",
            dir.path().to_str().unwrap(),
            "--nats",
            &server.url(),
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ],
        &[],
    );
    natsfn.wait_for(&["watching for changes"]);
    natsfn.wait_for(&["natsfn: ready"]);
    install(dir.path(), "tagb");
    let line = natsfn.wait_for(&["natsfn: Updated tagger"]);
    assert!(line.contains("compile ") && line.contains(" ms") && line.contains("swap "), "{line}");
    let client = client(&server).await;
    wait_for_tag(&client, "dev", "B").await;
    install(dir.path(), "taga");
    let line = natsfn.wait_for(&["natsfn: Updated tagger", "(cached)"]);
    assert!(line.contains("compile "), "going back to a version seen before hits the cache: {line}");
    natsfn.signal("-TERM");
    assert_eq!(natsfn.wait_exit(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_without_watching() {
    let server = nats();
    let dir = tagger_dir("[[trigger]]\nsubject = \"hup\"");
    let mut natsfn = NatsfnProcess::spawn(
        env!("CARGO_BIN_EXE_natsfn-cli"),
        &["run", "--handlers", dir.path().to_str().unwrap(), "--nats", &server.url(), "--no-cache"],
        &[],
    );
    natsfn.wait_for(&["natsfn: ready"]);
    let client = client(&server).await;
    wait_for_tag(&client, "hup", "A").await;
    install(dir.path(), "tagb");
    // Not watching: the old version serves until told.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(tag_of(&client, "hup").await.as_deref(), Some("A"));
    natsfn.signal("-HUP");
    natsfn.wait_for(&["SIGHUP received, reloading handlers"]);
    natsfn.wait_for(&["natsfn: Updated tagger"]);
    wait_for_tag(&client, "hup", "B").await;
    natsfn.signal("-TERM");
    assert_eq!(natsfn.wait_exit(), 0);
}
