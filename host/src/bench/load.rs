//! The load generator: publishes or requests the scenario's messages on its
//! own connection, and tells when the side under test has handled them.
//!
//! It runs on a thread of its own with a single-threaded runtime, as a
//! separate client process would: it competes with the side under test for
//! cores, never for its runtime's worker threads, and it is the same for
//! both sides.
//!
//! Fire-and-forget publishing is windowed: at most [`WINDOW`] messages are
//! ahead of what the handler has finished. Core NATS drops messages for a
//! slow consumer, so an unbounded publisher would measure the drops, not
//! the handler; the window is far larger than what one scheduling delay can
//! drain, so it never throttles a handler that keeps up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use super::BenchError;

/// Most messages published and not yet handled.
const WINDOW: u64 = 16_384;
/// Most messages published before looking at progress again.
const BURST: u64 = 1_024;
/// How long the handled count may stand still before the run is given up.
const STALL: Duration = Duration::from_secs(15);
/// How often progress is looked at while waiting.
const POLL: Duration = Duration::from_millis(1);

/// How many messages the side under test has finished so far.
pub(crate) type Progress = Arc<dyn Fn() -> u64 + Send + Sync>;

/// What to send.
#[derive(Clone)]
pub(crate) struct Load {
    pub(crate) url: String,
    pub(crate) subject: String,
    pub(crate) payload: Bytes,
    pub(crate) messages: u64,
    pub(crate) concurrency: usize,
    /// Request/reply (latencies recorded) rather than fire-and-forget.
    pub(crate) request: bool,
    /// Count completions as messages arriving here (a handler that
    /// publishes one message per input) instead of asking the side.
    pub(crate) output: Option<String>,
}

/// What the load generator saw.
pub(crate) struct Driven {
    pub(crate) elapsed: Duration,
    /// Request round trips, in nanoseconds.
    pub(crate) latencies: Vec<u64>,
}

/// Sends `load` from a thread of its own and returns once the side under
/// test (whose finished count is `progress`) has handled all of it.
pub(crate) async fn drive(load: Load, progress: Progress) -> Result<Driven, BenchError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("natsfn-bench-load".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(BenchError::Runtime)
                .and_then(|rt| rt.block_on(run(load, progress)));
            let _ = tx.send(result);
        })
        .map_err(BenchError::Runtime)?;
    rx.await.unwrap_or(Err(BenchError::LoadThread))
}

async fn run(load: Load, progress: Progress) -> Result<Driven, BenchError> {
    let client = connect(&load.url).await?;
    let progress = match &load.output {
        Some(out) => count_arrivals(&client, out).await?,
        None => progress,
    };
    let subject = async_nats::Subject::from(load.subject.as_str());
    let start = Instant::now();
    let latencies = if load.request {
        request_all(&client, &subject, &load).await?
    } else {
        publish_windowed(&client, &subject, &load, &progress).await?;
        Vec::new()
    };
    wait_for(&progress, load.messages).await?;
    Ok(Driven { elapsed: start.elapsed(), latencies })
}

pub(crate) async fn connect(url: &str) -> Result<async_nats::Client, BenchError> {
    async_nats::ConnectOptions::new()
        .name("natsfn-bench")
        .connect(url)
        .await
        .map_err(|e| BenchError::Nats { context: format!("connect to {url}"), source: e.into() })
}

/// Counts what arrives on `subject` from now on.
async fn count_arrivals(client: &async_nats::Client, subject: &str) -> Result<Progress, BenchError> {
    let mut sub = client
        .subscribe(subject.to_owned())
        .await
        .map_err(|e| BenchError::Nats { context: format!("subscribe to {subject}"), source: e.into() })?;
    flush(client).await?;
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while sub.next().await.is_some() {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(Arc::new(move || count.load(Ordering::Relaxed)))
}

async fn publish_windowed(
    client: &async_nats::Client,
    subject: &async_nats::Subject,
    load: &Load,
    progress: &Progress,
) -> Result<(), BenchError> {
    let mut sent = 0;
    let mut stall = Stall::new();
    while sent < load.messages {
        let done = progress();
        stall.check(done, load.messages)?;
        let ahead = sent.saturating_sub(done);
        if ahead >= WINDOW {
            tokio::time::sleep(POLL).await;
            continue;
        }
        let burst = (WINDOW - ahead).min(BURST).min(load.messages - sent);
        for _ in 0..burst {
            client
                .publish(subject.clone(), load.payload.clone())
                .await
                .map_err(|e| BenchError::Nats { context: format!("publish to {subject}"), source: e.into() })?;
        }
        sent += burst;
    }
    Ok(())
}

/// `concurrency` requesters on one connection, each waiting for its reply
/// before sending the next request.
async fn request_all(
    client: &async_nats::Client,
    subject: &async_nats::Subject,
    load: &Load,
) -> Result<Vec<u64>, BenchError> {
    let workers = load.concurrency.max(1) as u64;
    let tasks: Vec<_> = (0..workers)
        .map(|i| {
            // Spread the remainder over the first requesters.
            let share = load.messages / workers + u64::from(i < load.messages % workers);
            let (client, subject, payload) = (client.clone(), subject.clone(), load.payload.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(share as usize);
                for _ in 0..share {
                    let t = Instant::now();
                    client
                        .request(subject.clone(), payload.clone())
                        .await
                        .map_err(|e| BenchError::Nats { context: format!("request {subject}"), source: e.into() })?;
                    latencies.push(t.elapsed().as_nanos() as u64);
                }
                Ok::<_, BenchError>(latencies)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(load.messages as usize);
    for task in tasks {
        all.extend(task.await.map_err(|_| BenchError::LoadThread)??);
    }
    Ok(all)
}

/// Waits until `progress` reaches `expected`; gives up when it stands still
/// for [`STALL`] (lost messages, a handler failing to load).
pub(crate) async fn wait_for(progress: &Progress, expected: u64) -> Result<(), BenchError> {
    let mut stall = Stall::new();
    loop {
        let done = progress();
        if done >= expected {
            return Ok(());
        }
        stall.check(done, expected)?;
        tokio::time::sleep(POLL).await;
    }
}

/// Notices a count that stopped moving.
struct Stall {
    last: u64,
    since: Instant,
}

impl Stall {
    fn new() -> Stall {
        Stall { last: 0, since: Instant::now() }
    }

    fn check(&mut self, done: u64, expected: u64) -> Result<(), BenchError> {
        if done != self.last {
            self.last = done;
            self.since = Instant::now();
        } else if self.since.elapsed() > STALL {
            return Err(BenchError::Stalled { done, expected, waited: STALL });
        }
        Ok(())
    }
}

pub(crate) async fn flush(client: &async_nats::Client) -> Result<(), BenchError> {
    client.flush().await.map_err(|e| BenchError::Nats { context: "flush".into(), source: e.into() })
}

/// Empties (or creates) `stream`, capturing `subject` on file storage, and
/// stores `messages` copies of `payload` in it, untimed: the scenario times
/// only the consuming.
pub(crate) async fn fill_stream(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    payload: &Bytes,
    messages: u64,
) -> Result<(), BenchError> {
    use async_nats::jetstream::{self, stream};
    let js = jetstream::new(client.clone());
    let nats_err = |context: String| move |e: async_nats::Error| BenchError::Nats { context, source: e };
    let mut s = js
        .get_or_create_stream(stream::Config {
            name: stream.to_owned(),
            subjects: vec![subject.to_owned()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| nats_err(format!("create stream {stream}"))(e.into()))?;
    s.purge().await.map_err(|e| nats_err(format!("purge stream {stream}"))(e.into()))?;
    let stored = futures::stream::iter(0..messages)
        .map(|_| {
            let js = js.clone();
            let payload = payload.clone();
            async move { js.publish(subject.to_owned(), payload).await?.await.map(|_| ()) }
        })
        .buffer_unordered(512);
    let mut stored = std::pin::pin!(stored);
    while let Some(r) = stored.next().await {
        r.map_err(|e| nats_err(format!("store messages in {stream}"))(e.into()))?;
    }
    let info = s.info().await.map_err(|e| nats_err(format!("read stream {stream}"))(e.into()))?;
    if info.state.messages != messages {
        return Err(BenchError::Stalled { done: info.state.messages, expected: messages, waited: Duration::ZERO });
    }
    Ok(())
}
