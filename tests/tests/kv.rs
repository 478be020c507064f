//! KV and object store end to end: compare-and-set under contention, a
//! KV-watch mirror that survives a host restart, a 100 MB object through a
//! 16 MB guest, and every permission and validation error.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, object_store};
use futures::StreamExt;
use natsfn::{BucketKind, BucketSpec};
use natsfn_e2e::*;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

fn kv_bucket(name: &str) -> BucketSpec {
    BucketSpec::parse(BucketKind::Kv, name).unwrap()
}

fn object_bucket(name: &str) -> BucketSpec {
    BucketSpec::parse(BucketKind::Object, name).unwrap()
}

/// Starts a host on `dir` that first creates `buckets`.
async fn host_with(server: &NatsServer, dir: &HandlerDir, buckets: &[BucketSpec]) -> natsfn::RunningHost {
    let mut builder = natsfn::Host::builder().nats_url(server.url()).handlers_dir(dir.path());
    for b in buckets {
        builder = builder.bucket(b.clone());
    }
    let host = builder.build().await.expect("build host");
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    host.start().await.expect("start host")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_never_lose_an_update() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "counter",
        "counter",
        "kvcounter",
        "[[trigger]]\nsubject = \"count\"\n[limits]\nmax_concurrency = 20\n[permissions]\nkv = { counters = \"write\" }",
    );
    let host = host_with(&server, &dir, &[kv_bucket("counters")]).await;
    let client = client(&server).await;

    let workers = (0..20).map(|_| {
        let client = client.clone();
        tokio::spawn(async move {
            for _ in 0..50 {
                request(&client, "count", "").await;
            }
        })
    });
    futures::future::join_all(workers).await.into_iter().for_each(|r| r.unwrap());

    let store = jetstream::new(client.clone()).get_key_value("counters").await.unwrap();
    let value = store.get("counter").await.unwrap().unwrap();
    assert_eq!(std::str::from_utf8(&value).unwrap(), "1000", "20 x 50 increments, none lost");
    let stats = host.handler_stats("counter").unwrap();
    assert_eq!((stats.ok, stats.peak_in_flight > 1), (1000, true), "{stats:?}");

    // keys with a filter and bounded history, through the guest API.
    store.put("other.a", "x".into()).await.unwrap();
    store.put("other.b", "y".into()).await.unwrap();
    store.put("skip", "z".into()).await.unwrap();
    assert_eq!(text(&request(&client, "count", "keys other.*").await), "other.a,other.b");
    assert_eq!(text(&request(&client, "count", "keys >").await), "counter,other.a,other.b,skip");
    host.shutdown().await;
}

#[tokio::test]
async fn history_returns_the_latest_entries_oldest_first() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "counter",
        "counter",
        "kvcounter",
        "[[trigger]]\nsubject = \"count\"\n[permissions]\nkv = { hist = \"read\" }\n[config]\nbucket = \"hist\"",
    );
    let host = host_with(&server, &dir, &[BucketSpec::parse(BucketKind::Kv, "hist:history=10").unwrap()]).await;
    let client = client(&server).await;
    let store = jetstream::new(client.clone()).get_key_value("hist").await.unwrap();
    for v in ["a", "b", "c", "d"] {
        store.put("k", v.into()).await.unwrap();
    }
    assert_eq!(text(&request(&client, "count", "history k 2").await), "3=c,4=d");
    assert_eq!(text(&request(&client, "count", "history k 10").await), "1=a,2=b,3=c,4=d");
    host.shutdown().await;
}

/// Applies operation `i` of a deterministic mix of puts, deletes and purges
/// over 40 keys.
async fn apply_op(store: &kv::Store, i: u64) {
    let key = format!("key{}", (i * 7) % 40);
    match i % 10 {
        7 => {
            let _ = store.delete(&key).await;
        }
        9 => {
            let _ = store.purge(&key).await;
        }
        _ => {
            store.put(&key, format!("v{i}").into()).await.unwrap();
        }
    }
}

async fn snapshot(store: &kv::Store) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for k in 0..40 {
        let v = store.get(format!("key{k}")).await.unwrap();
        out.push(v.map(|b| String::from_utf8_lossy(&b).into_owned()));
    }
    out
}

async fn wait_consumer_drained(js: &jetstream::Context, stream: &str, durable: &str) {
    let start = Instant::now();
    loop {
        let mut c: jetstream::consumer::PullConsumer =
            js.get_stream(stream).await.unwrap().get_consumer(durable).await.unwrap();
        let info = c.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "watch never caught up: {info:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_mirror_stays_identical_across_a_host_restart() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "mirror",
        "mirror",
        "kvmirror",
        "[[trigger]]\nkv_watch = { bucket = \"src\" }\n[permissions]\nkv = { src = \"read\", dst = \"write\" }\n[config]\ntarget = \"dst\"",
    );
    let buckets = [kv_bucket("src:history=5"), kv_bucket("dst")];
    let client = client(&server).await;
    let js = jetstream::new(client.clone());

    let host = host_with(&server, &dir, &buckets).await;
    let src = js.get_key_value("src").await.unwrap();
    let dst = js.get_key_value("dst").await.unwrap();
    for i in 0..500 {
        apply_op(&src, i).await;
    }
    // Stop mid-stream, whatever the mirror has reached, and keep writing.
    host.shutdown().await;
    for i in 500..1000 {
        apply_op(&src, i).await;
    }
    let host = host_with(&server, &dir, &buckets).await;
    wait_consumer_drained(&js, "KV_src", "kvw-mirror").await;
    assert_eq!(snapshot(&dst).await, snapshot(&src).await, "the mirror matches the source key by key");
    let restarted = host.handler_stats("mirror").unwrap();
    assert!(restarted.invocations < 1000, "the restart resumed instead of replaying everything: {restarted:?}");
    assert_eq!(restarted.failed + restarted.trapped, 0);
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_object_streams_through_a_16_mb_guest() {
    const SIZE: usize = 100 * 1024 * 1024;
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "pipe",
        "pipe",
        "objectpipe",
        "[[trigger]]\nsubject = \"pipe\"\n[limits]\nmemory_mb = 16\ntimeout_ms = 300000\n[permissions]\nobject = { source = \"read\", target = \"write\" }",
    );
    let host = host_with(&server, &dir, &[object_bucket("source"), object_bucket("target")]).await;
    let client = client(&server).await;
    let js = jetstream::new(client.clone());

    // Mixed case so the guest's transformation shows in the checksum.
    let data: Vec<u8> = (0..SIZE).map(|i| b"abcXYZ-0\n"[i % 9]).collect();
    let expected = Sha256::digest(data.to_ascii_uppercase());
    js.get_object_store("source").await.unwrap().put("big", &mut data.as_slice()).await.unwrap();
    drop(data);

    let req = async_nats::Request::new().payload("big".into()).timeout(Some(Duration::from_secs(300)));
    let reply = text(&client.send_request("pipe", req).await.unwrap());
    assert!(reply.starts_with(&format!("{SIZE} SHA-256=")), "{reply}");

    let mut object = js.get_object_store("target").await.unwrap().get("big").await.unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    let mut total = 0;
    loop {
        let n = object.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n;
    }
    assert_eq!(total, SIZE);
    assert_eq!(hasher.finalize(), expected, "the target is the transformed source, byte for byte");
    let stats = host.handler_stats("pipe").unwrap();
    assert!(stats.peak_memory <= 16 << 20, "{stats:?}");
    println!("peak guest memory for the 100 MB object: {} KiB", stats.peak_memory / 1024);
    host.shutdown().await;
}

#[tokio::test]
async fn bucket_permission_and_validation_errors_write_nothing() {
    let server = nats();
    let dir = HandlerDir::new();
    dir.add(
        "forbidden",
        "forbidden",
        "forbidden",
        "[[trigger]]\nsubject = \"probe\"\n[permissions]\nkv = { readonly = \"read\", writable = \"write\" }\nobject = { objects-ro = \"read\", objects-rw = \"write\" }",
    );
    let buckets = [
        kv_bucket("secret"),
        kv_bucket("readonly"),
        kv_bucket("writable"),
        object_bucket("secret"),
        object_bucket("objects-ro"),
        object_bucket("objects-rw"),
    ];
    let host = host_with(&server, &dir, &buckets).await;
    let client = client(&server).await;

    for (probe, expected) in [
        ("kv-denied", "permission-denied: kv read on bucket secret"),
        ("kv-read-only", "permission-denied: kv write on bucket readonly"),
        ("kv-delete-read-only", "permission-denied: kv write on bucket readonly"),
        ("kv-bad-key", "invalid: key `bad key` is not a valid KV key"),
        ("kv-bad-bucket", "invalid: bucket name `bad.bucket` contains `.`"),
        ("kv-bad-filter", "invalid: key filter: `a..b` has an empty token"),
        ("object-denied", "permission-denied: object write on bucket secret"),
        ("object-read-only", "permission-denied: object write on bucket objects-ro"),
        ("object-writer-denied", "permission-denied: object write on bucket objects-ro"),
        ("object-bad-name", "invalid: object name `` must be 1 to 1024 printable characters"),
        ("object-missing", "not-found"),
    ] {
        let got = text(&request(&client, "probe", probe).await);
        assert!(got.starts_with(expected), "probe {probe}: got {got:?}, want {expected:?}");
    }

    let js = jetstream::new(client.clone());
    for bucket in ["secret", "readonly", "writable"] {
        let keys: Vec<String> =
            js.get_key_value(bucket).await.unwrap().keys().await.unwrap().map(|k| k.unwrap()).collect().await;
        assert!(keys.is_empty(), "kv bucket {bucket} was written: {keys:?}");
    }
    for bucket in ["secret", "objects-ro", "objects-rw"] {
        let store: object_store::ObjectStore = js.get_object_store(bucket).await.unwrap();
        let objects: Vec<_> = store.list().await.unwrap().collect().await;
        assert!(objects.is_empty(), "object bucket {bucket} was written");
    }
    host.shutdown().await;
}
