//! Multi-tenancy: tenants fenced by NATS accounts, credentials and TLS, and
//! by the host's own limits. The servers here run with accounts (or in
//! operator mode, or with TLS) from configs the tests write; certificates
//! and JWTs are generated per test.

use std::time::{Duration, Instant};

use natsfn::{Host, HostConfig, LoadError, RunningHost};
use natsfn_e2e::tenancy::{server_with_config, two_accounts, Operator, Pki};
use natsfn_e2e::{client, eventually, guest, header, nats, request, text, HandlerDir, NatsServer};

/// A host config file's text turned into a config, paths relative to `dir`.
fn config(dir: &HandlerDir, text: &str) -> HostConfig {
    HostConfig::from_toml(text, &dir.path().join("natsfn.toml")).expect("host config")
}

async fn connect_as(server: &NatsServer, user: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .connect(server.url())
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

fn tenant_stats(host: &RunningHost, tenant: &str) -> natsfn::TenantStats {
    host.tenant_stats().into_iter().find(|(t, _)| t.as_str() == tenant).expect("tenant is running").1
}

fn handler(dir: &HandlerDir, name: &str, tenant: &str, guest_name: &str, body: &str) {
    dir.add(name, name, guest_name, &format!("tenant = \"{tenant}\"\n{body}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_in_two_accounts_cannot_reach_each_other() {
    let b_key = nkeys::KeyPair::new_user();
    let conf_dir = tempfile::tempdir().unwrap();
    let server = server_with_config(conf_dir.path(), &two_accounts(&b_key.public_key()));

    let dir = HandlerDir::new();
    // Both tenants serve the same subject; each must see only its own
    // account's messages.
    handler(
        &dir,
        "a-greeter",
        "a",
        "greeter",
        "[[trigger]]\nsubject = \"shared.hello\"\n[config]\ngreeting = \"from-a\"",
    );
    handler(
        &dir,
        "b-greeter",
        "b",
        "greeter",
        "[[trigger]]\nsubject = \"shared.hello\"\n[config]\ngreeting = \"from-b\"",
    );
    // A's manifest asks for B's subjects and buckets; the host grants what
    // the manifest says, the server's accounts must still say no.
    handler(
        &dir,
        "a-prober",
        "a",
        "forbidden",
        "[[trigger]]\nsubject = \"a.probe\"\n[permissions]\npublish = [\"b.>\"]\n\
         kv = { secret = \"read\", readonly = \"write\" }\n[config]\ntarget = \"b.inbox\"",
    );
    std::fs::write(dir.path().join("b.nk"), b_key.seed().unwrap()).unwrap();
    std::env::set_var("NATSFN_TEST_TENANT_A_PASSWORD", "apass");
    let cfg = config(
        &dir,
        r#"
        [tenants.a]
        user = "a"
        password = { env = "NATSFN_TEST_TENANT_A_PASSWORD" }
        [tenants.b]
        nkey = { file = "b.nk" }
        buckets = ["kv:secret", "kv:readonly"]
        "#,
    );
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    let host = host.start().await.unwrap();

    let a = connect_as(&server, "a", "apass").await;
    let b = connect_as(&server, "b", "bpass").await;
    assert_eq!(text(&request(&a, "shared.hello", "x").await), "from-a, x!");
    assert_eq!(text(&request(&b, "shared.hello", "x").await), "from-b, x!");
    for _ in 0..50 {
        b.publish("shared.hello", "from b".into()).await.unwrap();
    }
    b.flush().await.unwrap();
    eventually(Duration::from_secs(10), "B's handler ran B's 50 messages", || async {
        host.handler_stats("b-greeter").unwrap().invocations == 51
    })
    .await;
    assert_eq!(host.handler_stats("a-greeter").unwrap().invocations, 1, "A's handler saw B's messages");

    // Publishing "into B" lands in A's own account: B never sees it.
    let mut b_inbox = b.subscribe("b.inbox").await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(text(&request(&a, "a.probe", "publish").await), "ok");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), futures::StreamExt::next(&mut b_inbox)).await.is_err(),
        "B received A's publish"
    );

    // B's buckets do not exist in A's account, whatever A's manifest says.
    let b_kv = async_nats::jetstream::new(b.clone());
    b_kv.get_key_value("secret").await.unwrap().put("k", "b's secret".into()).await.unwrap();
    let read = text(&request(&a, "a.probe", "kv-denied").await);
    assert!(read.starts_with("unavailable") || read == "not-found", "A read B's bucket: {read}");
    let write = text(&request(&a, "a.probe", "kv-read-only").await);
    assert!(write.starts_with("unavailable"), "A wrote B's bucket: {write}");
    assert!(b_kv.get_key_value("readonly").await.unwrap().get("k").await.unwrap().is_none());

    // A request outside A's grant is refused by the host, counted and
    // logged for the handler and the tenant.
    let denied = text(&request(&a, "a.probe", "request").await);
    assert_eq!(denied, "permission-denied: request to b.inbox");
    assert_eq!(host.handler_stats("a-prober").unwrap().denied, 1);
    let a_stats = tenant_stats(&host, "a");
    assert_eq!(a_stats.denied, 1, "{a_stats:?}");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_a_wrong_secret_fails_alone() {
    let conf_dir = tempfile::tempdir().unwrap();
    let server = server_with_config(conf_dir.path(), &two_accounts(&nkeys::KeyPair::new_user().public_key()));
    let dir = HandlerDir::new();
    handler(&dir, "a-greeter", "a", "greeter", "[[trigger]]\nsubject = \"hello\"\n[config]\ngreeting = \"from-a\"");
    handler(&dir, "b-greeter", "b", "greeter", "[[trigger]]\nsubject = \"hello\"");
    handler(&dir, "c-greeter", "c", "greeter", "[[trigger]]\nsubject = \"hello\"");
    handler(&dir, "d-greeter", "d", "greeter", "[[trigger]]\nsubject = \"hello\"");
    let cfg = config(
        &dir,
        r#"
        [tenants.a]
        user = "a"
        password = "apass"
        [tenants.b]
        user = "b"
        password = "not-bpass-at-all"
        [tenants.c]
        token = { env = "NATSFN_TEST_SURELY_UNSET_TOKEN" }
        "#,
    );
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    let errors: Vec<String> = host.load_errors().iter().map(ToString::to_string).collect();
    let all = errors.join("\n");
    assert!(!all.contains("not-bpass-at-all"), "a secret was printed: {all}");
    let has = |needle: &str| errors.iter().any(|e| e.contains(needle));
    assert!(has("tenant `b`: cannot connect to"), "{all}");
    assert!(all.to_lowercase().contains("authorization"), "{all}");
    assert!(has("tenant `c`: token: environment variable NATSFN_TEST_SURELY_UNSET_TOKEN is not set"), "{all}");
    assert!(has("b-greeter.toml: tenant: tenant `b` did not start"), "{all}");
    assert!(has("d-greeter.toml: tenant: tenant `d` is not declared in the host config"), "{all}");
    assert!(host.load_errors().iter().any(|e| matches!(e, LoadError::TenantStart(_))));
    assert_eq!(host.handlers().len(), 1);

    let host = host.start().await.unwrap();
    let a = connect_as(&server, "a", "apass").await;
    assert_eq!(text(&request(&a, "hello", "x").await), "from-a, x!");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_connects_with_a_creds_file() {
    let mut operator = Operator::new();
    let acme = operator.account("ACME");
    let conf_dir = tempfile::tempdir().unwrap();
    let server = server_with_config(conf_dir.path(), &operator.server_config());

    let dir = HandlerDir::new();
    dir.write("acme.creds", &operator.user_creds(acme, "acme-host"));
    // A user signed by an account the server does not know.
    let mut stranger = Operator::new();
    let other = stranger.account("OTHER");
    dir.write("other.creds", &stranger.user_creds(other, "intruder"));
    handler(&dir, "acme-greeter", "acme", "greeter", "[[trigger]]\nsubject = \"hello\"\n[config]\ngreeting = \"acme\"");
    handler(&dir, "other-greeter", "other", "greeter", "[[trigger]]\nsubject = \"hello\"");
    let cfg = config(&dir, "[tenants.acme]\ncreds = \"acme.creds\"\n[tenants.other]\ncreds = \"other.creds\"\n");
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    let errors: Vec<String> = host.load_errors().iter().map(ToString::to_string).collect();
    assert!(errors.iter().any(|e| e.starts_with("tenant `other`: cannot connect")), "{errors:?}");
    assert_eq!(host.handlers().len(), 1, "{errors:?}");
    let host = host.start().await.unwrap();

    let client = async_nats::ConnectOptions::with_credentials(&operator.user_creds(acme, "tester"))
        .unwrap()
        .connect(server.url())
        .await
        .unwrap();
    assert_eq!(text(&request(&client, "hello", "x").await), "acme, x!");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_connects_with_tls_client_certificates() {
    let pki = Pki::new();
    let conf_dir = tempfile::tempdir().unwrap();
    let server_conf =
        format!("{}accounts {{ A: {{ users: [ {{ user: a, password: apass }} ] }} }}\n", pki.server_tls());
    let server = server_with_config(conf_dir.path(), &server_conf);

    let dir = HandlerDir::new();
    handler(&dir, "a-greeter", "a", "greeter", "[[trigger]]\nsubject = \"hello\"\n[config]\ngreeting = \"tls\"");
    handler(&dir, "rogue-greeter", "rogue", "greeter", "[[trigger]]\nsubject = \"hello\"");
    let cfg = config(
        &dir,
        &format!(
            r#"
            [tenants.a]
            user = "a"
            password = "apass"
            tls = {{ ca = {:?}, cert = {:?}, key = {:?}, required = true }}
            [tenants.rogue]
            user = "a"
            password = "apass"
            tls = {{ ca = {:?}, cert = {:?}, key = {:?}, required = true }}
            "#,
            pki.path("ca.pem"),
            pki.path("client.pem"),
            pki.path("client-key.pem"),
            pki.path("ca.pem"),
            pki.path("rogue.pem"),
            pki.path("rogue-key.pem"),
        ),
    );
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    let errors: Vec<String> = host.load_errors().iter().map(ToString::to_string).collect();
    assert!(errors.iter().any(|e| e.starts_with("tenant `rogue`: cannot connect")), "{errors:?}");
    assert_eq!(host.handlers().len(), 1, "{errors:?}");
    let host = host.start().await.unwrap();

    let client = async_nats::ConnectOptions::with_user_and_password("a".into(), "apass".into())
        .add_root_certificates(pki.path("ca.pem"))
        .add_client_certificate(pki.path("client.pem"), pki.path("client-key.pem"))
        .require_tls(true)
        .connect(server.url())
        .await
        .unwrap();
    assert_eq!(text(&request(&client, "hello", "x").await), "tls, x!");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_limits_cap_handlers_payloads_and_sends() {
    let conf_dir = tempfile::tempdir().unwrap();
    let server = server_with_config(conf_dir.path(), &two_accounts(&nkeys::KeyPair::new_user().public_key()));
    let dir = HandlerDir::new();
    handler(
        &dir,
        "attacker",
        "a",
        "attacker",
        "[[trigger]]\nsubject = \"attack\"\n[limits]\nmemory_mb = 128\nmax_concurrency = 64\n[permissions]\npublish = [\"attack.out\"]",
    );
    handler(&dir, "second", "a", "echo", "[[trigger]]\nsubject = \"second\"");
    let cfg = config(
        &dir,
        r#"
        [tenants.a]
        user = "a"
        password = "apass"
        [tenants.a.limits]
        max_handlers = 1
        memory_mb = 48
        max_instances = 2
        max_payload_bytes = 65536
        publish_rate = 200
        log_rate = 100
        "#,
    );
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    let errors: Vec<String> = host.load_errors().iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("second.toml: handler second: tenant `a` already has its limit of 1 handlers"),
        "{errors:?}"
    );
    let host = host.start().await.unwrap();
    let a = connect_as(&server, "a", "apass").await;

    // The handler asked for 128 MiB; the tenant has 48 in all, so the
    // 64 MiB payload cannot even be built.
    let _ = a
        .send_request(
            "attack",
            async_nats::Request::new().payload("bigpayload".into()).timeout(Some(Duration::from_secs(3))),
        )
        .await;
    let stats = host.handler_stats("attacker").unwrap();
    assert_eq!(stats.memory_limit, 1, "{stats:?}");
    assert!(stats.peak_memory <= 48 << 20, "{stats:?}");

    // Two instances that each fit alone do not fit together: the second
    // is refused by the tenant's budget while the first holds its share.
    let holding = {
        let a = a.clone();
        tokio::spawn(async move { text(&request(&a, "attack", "hold 30 1500").await) })
    };
    eventually(Duration::from_secs(10), "the first instance holding its 30 MiB", || async {
        tenant_stats(&host, "a").memory_in_use >= 30 << 20
    })
    .await;
    let second = a
        .send_request(
            "attack",
            async_nats::Request::new().payload("hold 30 0".into()).timeout(Some(Duration::from_secs(3))),
        )
        .await;
    assert!(second.is_err(), "the second instance fitted in the budget");
    assert_eq!(holding.await.unwrap(), "held");
    let stats = host.handler_stats("attacker").unwrap();
    assert_eq!(stats.memory_limit, 2, "{stats:?}");
    // Given back when the instance is dropped, just after its reply.
    eventually(Duration::from_secs(5), "the memory budget given back", || async {
        tenant_stats(&host, "a").memory_in_use == 0
    })
    .await;
    let tenant = tenant_stats(&host, "a");
    assert_eq!(tenant.memory_refused, 1, "{tenant:?}");
    assert_eq!(tenant.memory_in_use, 0, "memory budget not given back: {tenant:?}");
    assert_eq!(text(&request(&a, "attack", "hold 30 0").await), "held", "the budget was not given back");

    let flood = text(&request(&a, "attack", "flood").await);
    assert!(flood.ends_with("publishes: unavailable: rate limited"), "{flood}");
    let sent: u64 = flood.trim_start_matches("after ").split(' ').next().unwrap().parse().unwrap();
    assert!((200..=260).contains(&sent), "burst of 200 then refused, got {sent}");
    let stats = host.handler_stats("attacker").unwrap();
    assert_eq!(stats.rate_limited, 1, "{stats:?}");

    // The handler asked for 64 concurrent invocations; the tenant allows 2.
    let holds = (0..8).map(|_| {
        let a = a.clone();
        tokio::spawn(async move { text(&request(&a, "attack", "hold 1 200").await) })
    });
    for held in futures::future::join_all(holds).await {
        assert_eq!(held.unwrap(), "held");
    }
    let stats = host.handler_stats("attacker").unwrap();
    assert_eq!(stats.peak_in_flight, 2, "max_concurrency was not lowered to the tenant's: {stats:?}");

    // 20,000 lines in a burst; the tenant's log rate lets about 100 through.
    assert_eq!(text(&request(&a, "attack", "logflood").await), "logged");
    let dropped = tenant_stats(&host, "a").logs_dropped;
    assert!((19_500..20_000).contains(&dropped), "{dropped} lines dropped");
    host.shutdown().await;
}

/// Instances made ahead of their message (standby) are charged to the
/// tenant's memory budget only when a message claims them: idle ones never
/// take budget from the tenant's running invocations, and a claim the budget
/// cannot cover is refused like a fresh instantiation would be.
/// A tenant's idle reuse-mode instances give their permits up to a message
/// of the tenant's other handlers, which would otherwise wait for good once
/// the reuse handler had run as many instances as the tenant may.
#[tokio::test]
async fn a_tenants_idle_instances_give_their_permits_to_its_other_handlers() {
    let server = nats();
    let dir = HandlerDir::new();
    let reuse = "instance = \"reuse\"\n[[trigger]]\nsubject = \"t.hog\"\n[limits]\nmax_concurrency = 8";
    handler(&dir, "hog", "t", "slow", reuse);
    handler(&dir, "other", "t", "echo", "[[trigger]]\nsubject = \"t.echo\"");
    let cfg = config(&dir, "[tenants.t.limits]\nmax_instances = 2\n");
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    let host = host.start().await.unwrap();
    let client = client(&server).await;
    let hog = || {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("delay-ms", "200");
        let req = async_nats::Request::new().headers(headers).payload("x".into()).timeout(Some(Duration::from_secs(5)));
        client.send_request("t.hog", req)
    };
    for reply in futures::future::join_all([hog(), hog()]).await {
        reply.expect("answered");
    }
    assert_eq!(host.handler_stats("hog").unwrap().peak_in_flight, 2, "both instances ran, and are idle now");
    assert_eq!(text(&request(&client, "t.echo", "hi").await), "hi", "the other handler gets the tenant's permit");
    hog().await.expect("the reuse handler still serves");
    assert!(host.shutdown().await.clean);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_instances_hold_no_tenant_memory_until_a_message_claims_one() {
    let server = nats();
    let dir = HandlerDir::new();
    handler(&dir, "one", "roomy", "echo", "[[trigger]]\nsubject = \"roomy.one\"");
    handler(&dir, "two", "roomy", "echo", "[[trigger]]\nsubject = \"roomy.two\"");
    // Room for one instance of either guest (each starts with ~1.1 MiB),
    // not for two.
    handler(&dir, "tight", "cramped", "echo", "[[trigger]]\nsubject = \"cramped.echo\"");
    handler(&dir, "holder", "cramped", "attacker", "[[trigger]]\nsubject = \"cramped.hold\"");
    let cfg = config(
        &dir,
        r#"
        [tenants.roomy.limits]
        memory_mb = 8
        [tenants.cramped.limits]
        memory_mb = 2
        "#,
    );
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    let host = host.start().await.unwrap();
    let client = client(&server).await;
    let settle = || tokio::time::sleep(Duration::from_millis(100));

    for subject in ["roomy.one", "roomy.two"] {
        assert_eq!(header(&request(&client, subject, "hi").await, "x-natsfn-calls"), Some("1"));
    }
    settle().await;
    // Both handlers now have an instance waiting, and the tenant is charged
    // for neither.
    assert_eq!(tenant_stats(&host, "roomy").memory_in_use, 0, "{:?}", tenant_stats(&host, "roomy"));
    for subject in ["roomy.one", "roomy.two"] {
        assert_eq!(header(&request(&client, subject, "hi").await, "x-natsfn-calls"), Some("1"));
    }
    settle().await;
    let (one, two) = (host.handler_stats("one").unwrap(), host.handler_stats("two").unwrap());
    assert_eq!((one.ok, one.from_standby, two.ok, two.from_standby), (2, 1, 2, 1), "{one:?} {two:?}");
    assert_eq!(tenant_stats(&host, "roomy").memory_in_use, 0, "claimed memory not given back");

    // While another instance of the tenant holds half its budget, the
    // standby instance cannot be claimed, nor a fresh one made: the message
    // fails at its memory limit, as it would have without standby.
    assert_eq!(header(&request(&client, "cramped.echo", "hi").await, "x-natsfn-calls"), Some("1"));
    // That instance is dropped just after its reply; until then it holds
    // half the budget itself.
    eventually(Duration::from_secs(5), "the echo's memory given back", || async {
        tenant_stats(&host, "cramped").memory_in_use == 0
    })
    .await;
    let holding = {
        let client = client.clone();
        tokio::spawn(async move { text(&request(&client, "cramped.hold", "hold 0 2000").await) })
    };
    eventually(Duration::from_secs(10), "the holder started", || async {
        host.handler_stats("holder").unwrap().in_flight > 0
    })
    .await;
    // Started counts before instantiation; give that a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let req = async_nats::Request::new().payload("hi".into()).timeout(Some(Duration::from_millis(500)));
    assert!(client.send_request("cramped.echo", req).await.is_err(), "two instances fitted in 2 MiB");
    assert_eq!(holding.await.unwrap(), "held");
    settle().await;
    // With the budget free again, the next standby instance serves.
    assert_eq!(header(&request(&client, "cramped.echo", "hi").await, "x-natsfn-calls"), Some("1"));
    settle().await;
    let tight = host.handler_stats("tight").unwrap();
    assert_eq!((tight.ok, tight.memory_limit, tight.from_standby), (2, 1, 1), "{tight:?}");
    let cramped = tenant_stats(&host, "cramped");
    assert_eq!((cramped.memory_refused, cramped.memory_in_use), (1, 0), "{cramped:?}");
    assert!(host.shutdown().await.clean);
}

/// Latency percentiles of `n` sequential requests.
async fn p99_of(client: &async_nats::Client, subject: &str, n: usize) -> Duration {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let reply = request(client, subject, &i.to_string()).await;
        took.push(start.elapsed());
        assert_eq!(text(&reply), i.to_string());
    }
    took.sort();
    took[(n * 99).div_ceil(100) - 1]
}

/// What an attack test measured.
struct Siege {
    host: RunningHost,
    _server: (NatsServer, tempfile::TempDir, HandlerDir),
    alone: Duration,
    under_attack: Duration,
    /// From the first attack message to the attacker's first finished
    /// invocation.
    stopped_after: Duration,
}

/// Runs tenant `b`'s echo alone and measures its p99, then starts tenant
/// `a`'s attacker with `attack`, keeping `in_flight` attack messages
/// going, and measures `b` again. `done` says when the attacker's
/// invocation has ended the expected way.
async fn siege(
    attack: &str,
    attacker_limits: &str,
    in_flight: usize,
    done: fn(&natsfn::HandlerStats) -> bool,
) -> Siege {
    let conf_dir = tempfile::tempdir().unwrap();
    let server = server_with_config(conf_dir.path(), &two_accounts(&nkeys::KeyPair::new_user().public_key()));
    let dir = HandlerDir::new();
    handler(
        &dir,
        "attacker",
        "a",
        "attacker",
        &format!("[[trigger]]\nsubject = \"attack\"\n[limits]\n{attacker_limits}\n[permissions]\npublish = [\"attack.out\"]\nrequest = [\"attack\"]"),
    );
    handler(&dir, "neighbour", "b", "echo", "[[trigger]]\nsubject = \"echo\"");
    let cfg = config(
        &dir,
        r#"
        max_instances = 64
        [tenants.a]
        user = "a"
        password = "apass"
        threads = 1
        [tenants.a.limits]
        memory_mb = 256
        max_instances = 8
        max_payload_bytes = 1048576
        publish_rate = 5000
        [tenants.b]
        user = "b"
        password = "bpass"
        threads = 1
        "#,
    );
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    let host = host.start().await.unwrap();
    let a = connect_as(&server, "a", "apass").await;
    let b = connect_as(&server, "b", "bpass").await;

    p99_of(&b, "echo", 50).await; // warm up
    let alone = p99_of(&b, "echo", 400).await;

    let attack_payload = attack.to_owned();
    let attacking = tokio::spawn(async move {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(in_flight));
        loop {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let a = a.clone();
            let payload = attack_payload.clone();
            tokio::spawn(async move {
                let req = async_nats::Request::new().payload(payload.into()).timeout(Some(Duration::from_secs(5)));
                let _ = a.send_request("attack", req).await;
                drop(permit);
            });
        }
    });
    let started = Instant::now();
    let stopped_after = loop {
        let stats = host.handler_stats("attacker").unwrap();
        if done(&stats) {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "attack `{attack}` was never stopped: {stats:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let under_attack = p99_of(&b, "echo", 400).await;
    attacking.abort();
    eprintln!(
        "attack {attack}: stopped after {stopped_after:?}; neighbour p99 alone {alone:?}, under attack {under_attack:?} ({:.1}x)",
        under_attack.as_secs_f64() / alone.as_secs_f64()
    );
    // Generous: a loaded 2-core CI machine is noisy. The note reports the
    // measured figures against the 3x aim.
    assert!(
        under_attack <= alone * 3 + Duration::from_millis(40),
        "neighbour p99 {under_attack:?} under attack vs {alone:?} alone"
    );
    Siege { host, _server: (server, conf_dir, dir), alone, under_attack, stopped_after }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_stopped_at_the_deadline() {
    let s = siege("spin", "timeout_ms = 200", 8, |s| s.timed_out >= 1).await;
    // The deadline is 200 ms; one epoch tick (10 ms) later it must have
    // stopped, give or take scheduling on a busy machine.
    assert!(s.stopped_after < Duration::from_millis(200 + 300), "{:?}", s.stopped_after);
    let stats = s.host.handler_stats("attacker").unwrap();
    assert_eq!(stats.ok, 0);
    let _ = (s.alone, s.under_attack);
    s.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_traps_at_its_limit() {
    let s = siege("membomb", "memory_mb = 32", 4, |s| s.memory_limit >= 1).await;
    let stats = s.host.handler_stats("attacker").unwrap();
    assert!(stats.peak_memory <= 32 << 20, "{stats:?}");
    s.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_flood_is_rate_limited() {
    let s = siege("flood", "max_concurrency = 4", 4, |s| s.rate_limited >= 1).await;
    let tenant = tenant_stats(&s.host, "a");
    assert!(tenant.rate_limited >= 1, "{tenant:?}");
    s.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_payload_is_refused() {
    let s = siege("bigpayload", "memory_mb = 128\nmax_concurrency = 1", 1, |s| s.ok >= 1).await;
    let tenant = tenant_stats(&s.host, "a");
    assert!(tenant.too_large >= 1, "{tenant:?}");
    s.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_recursion_traps_on_stack_overflow() {
    let s = siege("recurse", "", 4, |s| s.trapped >= 1).await;
    s.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_requesting_itself_is_bounded() {
    let s = siege("selfrequest", "timeout_ms = 300\nmax_concurrency = 4", 1, |s| s.timed_out + s.ok >= 1).await;
    let stats = s.host.handler_stats("attacker").unwrap();
    assert!(stats.peak_in_flight <= 4, "{stats:?}");
    s.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_stops_a_loop_deterministically() {
    let conf_dir = tempfile::tempdir().unwrap();
    let server = server_with_config(conf_dir.path(), &two_accounts(&nkeys::KeyPair::new_user().public_key()));
    let dir = HandlerDir::new();
    handler(&dir, "attacker", "a", "attacker", "[[trigger]]\nsubject = \"attack\"\n[limits]\ntimeout_ms = 20000");
    handler(&dir, "echo", "a", "echo", "[[trigger]]\nsubject = \"echo\"");
    let cfg = config(&dir, "[tenants.a]\nuser = \"a\"\npassword = \"apass\"\n[tenants.a.limits]\nfuel = 50000000\n");
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    let host = host.start().await.unwrap();
    let a = connect_as(&server, "a", "apass").await;
    let started = Instant::now();
    a.publish("attack", "spin".into()).await.unwrap();
    while host.handler_stats("attacker").unwrap().out_of_fuel == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "fuel never ran out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Well before the 20 s deadline; ordinary handlers still run on fuel.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(text(&request(&a, "echo", "still here").await), "still here");
    let _ = guest("echo");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_connects_with_a_token_and_its_timeout_ceiling_applies() {
    let conf_dir = tempfile::tempdir().unwrap();
    let server = server_with_config(conf_dir.path(), "authorization { token: \"s3cret-token\" }\n");
    let dir = HandlerDir::new();
    dir.write("token", "s3cret-token\n");
    handler(&dir, "greeter", "t", "greeter", "[[trigger]]\nsubject = \"hello\"\n[config]\ngreeting = \"token\"");
    // No timeout of its own: the default (5 s) is above the tenant's ceiling.
    handler(&dir, "attacker", "t", "attacker", "[[trigger]]\nsubject = \"attack\"");
    let cfg = config(&dir, "[tenants.t]\ntoken = { file = \"token\" }\n[tenants.t.limits]\ntimeout_ms = 200\n");
    let host = Host::builder().nats_url(server.url()).config(cfg).handlers_dir(dir.path()).build().await.unwrap();
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    let host = host.start().await.unwrap();
    let client = async_nats::ConnectOptions::with_token("s3cret-token".into()).connect(server.url()).await.unwrap();
    assert_eq!(text(&request(&client, "hello", "x").await), "token, x!");

    let started = Instant::now();
    client.publish("attack", "spin".into()).await.unwrap();
    while host.handler_stats("attacker").unwrap().timed_out == 0 {
        assert!(started.elapsed() < Duration::from_secs(3), "the tenant's 200 ms ceiling did not apply");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.shutdown().await;
}
