//! Benchmarks natsfn against the only honest baseline: a native async-nats
//! handler doing the same work, on the same machine, against the same
//! nats-server, in the same run.
//!
//! [`run`] measures one [`Scenario`] twice, native first, then natsfn
//! in-process through [`crate::Host`], and returns both [`Measurement`]s and
//! their ratio. A phase is: prepare (fill the stream for JetStream, untimed),
//! start the side under test, drive the load (`load`), wait until the side
//! has finished every message, stop. Both sides are judged by the same
//! clock and the same completion signal: handled counts (natsfn's handler
//! statistics, the native task's counter), or for a handler that publishes
//! one message per input, the messages that arrive on its output subject.
//!
//! What is measured per phase (`measure`): throughput, request round-trip
//! percentiles, CPU time of the whole process (load generator included,
//! the same on both sides) per message, and peak RSS. [`Report`] prints the
//! table and writes the JSON that `natsfn bench --json` and the
//! `scenarios` benchmark produce.

mod instantiate;
mod load;
mod measure;
mod native;
mod report;

pub use instantiate::{instance_cost, InstanceCost};
pub use measure::{process_cpu, Percentiles, RssScope};
pub use report::{IdleMemory, Machine, Report};

use std::sync::Arc;
use std::time::Duration;

use crate::host::{HostBuilder, HostError};

/// How many messages the native JetStream consumer asks for per pull, and
/// so about how many it may have unacknowledged at once. A JetStream
/// handler's throughput is bounded by its own window, `max_concurrency`,
/// divided by the pull's round trip, so a like-for-like comparison gives
/// the handler this many slots (the `scenarios` benchmark does).
pub const NATIVE_JETSTREAM_WINDOW: usize = 256;

/// What the handler under test is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Core publish, fire-and-forget.
    Publish,
    /// Core request/reply; the reply's round trip is timed.
    Request,
    /// Messages stored in this stream first (file storage, untimed), then
    /// consumed and acknowledged.
    JetStream {
        /// The stream, created if missing and purged before each phase.
        stream: String,
    },
}

/// One benchmark scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Its name in the report.
    pub name: String,
    /// How messages reach the handler.
    pub mode: Mode,
    /// The subject messages are sent to (and the stream captures).
    pub subject: String,
    /// Payload bytes per message.
    pub payload_size: usize,
    /// Messages per phase.
    pub messages: u64,
    /// Concurrent requesters (request mode).
    pub concurrency: usize,
    /// For a handler that publishes one message per input: the subject it
    /// publishes to. Completion is then counted there, on both sides.
    pub output: Option<String>,
}

/// What one side did in one phase.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measurement {
    /// Messages handled.
    pub messages: u64,
    /// Wall time from the first message sent to the last one handled.
    pub seconds: f64,
    /// `messages / seconds`.
    pub msgs_per_sec: f64,
    /// Round-trip percentiles (request mode only).
    pub latency: Option<Percentiles>,
    /// CPU time of the process (every thread) per message, in microseconds.
    pub cpu_us_per_msg: f64,
    /// Peak resident memory, in MiB.
    pub peak_rss_mb: f64,
    /// What the peak covers.
    pub rss_scope: RssScope,
}

/// One scenario, both ways.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// The scenario.
    pub scenario: Scenario,
    /// Through natsfn.
    pub natsfn: Measurement,
    /// Through the native async-nats handler.
    pub native: Measurement,
}

impl ScenarioResult {
    /// natsfn msgs/s ÷ native msgs/s.
    pub fn ratio(&self) -> f64 {
        self.natsfn.msgs_per_sec / self.native.msgs_per_sec.max(f64::MIN_POSITIVE)
    }
}

/// Why a benchmark could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A NATS operation failed.
    #[error("{context}: {source}")]
    Nats {
        /// What was being done.
        context: String,
        /// The client's error.
        source: async_nats::Error,
    },
    /// The natsfn host could not be built or started.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A handler did not load or start: the natsfn side would measure nothing.
    #[error("handler not running: {0}")]
    Handler(String),
    /// The handled count stopped moving before every message was handled.
    #[error("stalled at {done} of {expected} messages (no progress for {waited:?})")]
    Stalled {
        /// Messages handled.
        done: u64,
        /// Messages sent.
        expected: u64,
        /// How long nothing moved.
        waited: Duration,
    },
    /// The load generator's thread or runtime could not start.
    #[error("cannot start the load generator: {0}")]
    Runtime(std::io::Error),
    /// The load generator ended without an answer (it panicked).
    #[error("the load generator stopped unexpectedly")]
    LoadThread,
    /// The JSON report could not be written.
    #[error("{}: cannot write the report: {source}", path.display())]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Runs `scenario` natively, then through natsfn with the handlers of
/// `host` (its NATS URL is set to `url` here), against the server at `url`.
pub async fn run(url: &str, scenario: &Scenario, host: HostBuilder) -> Result<ScenarioResult, BenchError> {
    let native = phase(url, scenario, Side::Native).await?;
    let natsfn = phase(url, scenario, Side::Natsfn(Box::new(host.nats_url(url)))).await?;
    Ok(ScenarioResult { scenario: scenario.clone(), natsfn, native })
}

/// Which side a phase measures.
enum Side {
    Native,
    Natsfn(Box<HostBuilder>),
}

/// A side ready to start: natsfn's handlers are compiled before the clock
/// starts, as they would be in a host that has been serving for a while.
enum Ready {
    Native,
    Natsfn(Box<crate::Host>),
}

impl Side {
    async fn prepare(self) -> Result<Ready, BenchError> {
        match self {
            Side::Native => Ok(Ready::Native),
            Side::Natsfn(builder) => {
                let host = builder.build().await?;
                if let Some(e) = host.load_errors().first() {
                    return Err(BenchError::Handler(e.to_string()));
                }
                Ok(Ready::Natsfn(Box::new(host)))
            }
        }
    }
}

/// A side, started.
enum Running {
    Native(native::Native),
    Natsfn(Arc<crate::RunningHost>),
}

impl Running {
    fn progress(&self) -> load::Progress {
        match self {
            Running::Native(n) => n.progress(),
            Running::Natsfn(host) => {
                let host = host.clone();
                Arc::new(move || host.stats().iter().map(|(_, s)| s.finished()).sum())
            }
        }
    }

    async fn stop(self) {
        match self {
            Running::Native(n) => n.stop().await,
            Running::Natsfn(host) => {
                // The load generator has dropped its progress closure, so
                // this is the last reference.
                if let Ok(host) = Arc::try_unwrap(host) {
                    host.shutdown().await;
                }
            }
        }
    }
}

async fn start(url: &str, scenario: &Scenario, side: Ready) -> Result<Running, BenchError> {
    Ok(match side {
        Ready::Native => Running::Native(native::Native::start(url, scenario).await?),
        Ready::Natsfn(host) => {
            let running = host.start().await?;
            if let Some(e) = running.load_errors().first() {
                return Err(BenchError::Handler(e.to_string()));
            }
            if running.handlers().is_empty() {
                return Err(BenchError::Handler("no handler in the handlers directory".into()));
            }
            Running::Natsfn(Arc::new(running))
        }
    })
}

async fn phase(url: &str, scenario: &Scenario, side: Side) -> Result<Measurement, BenchError> {
    let payload = bytes::Bytes::from(vec![b'x'; scenario.payload_size]);
    let n = scenario.messages;
    if let Mode::JetStream { stream } = &scenario.mode {
        let client = load::connect(url).await?;
        load::fill_stream(&client, stream, &scenario.subject, &payload, n).await?;
        let _ = client.drain().await;
    }
    let ready = side.prepare().await?;
    let meter = measure::Meter::start();
    // A stream's messages are waiting already: consuming starts with the
    // consumer, so its creation is timed, on both sides alike.
    let t0 = std::time::Instant::now();
    let running = start(url, scenario, ready).await?;
    let progress = running.progress();
    let driven = match &scenario.mode {
        Mode::JetStream { .. } => {
            load::wait_for(&progress, n).await.map(|()| load::Driven { elapsed: t0.elapsed(), latencies: Vec::new() })
        }
        Mode::Publish | Mode::Request => {
            let l = load::Load {
                url: url.to_owned(),
                subject: scenario.subject.clone(),
                payload,
                messages: n,
                concurrency: scenario.concurrency,
                request: scenario.mode == Mode::Request,
                output: scenario.output.clone(),
            };
            load::drive(l, progress.clone()).await
        }
    };
    let (cpu, peak_rss_mb, rss_scope) = meter.stop();
    drop(progress);
    running.stop().await;
    let driven = driven?;
    let seconds = driven.elapsed.as_secs_f64().max(1e-9);
    Ok(Measurement {
        messages: n,
        seconds,
        msgs_per_sec: n as f64 / seconds,
        latency: Percentiles::of(driven.latencies),
        cpu_us_per_msg: cpu.as_secs_f64() * 1e6 / n.max(1) as f64,
        peak_rss_mb,
        rss_scope,
    })
}
