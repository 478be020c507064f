//! Benchmarks natsfn against the only honest baseline: a native async-nats
//! handler doing the same work, on the same machine, against the same
//! nats-server, in the same run.
//!
//! [`run`] measures one [`Scenario`] both ways, natively and through
//! natsfn in-process ([`crate::Host`]), once or over several rounds, and
//! returns both sides' [`Measurement`]s and their ratio. A phase is:
//! prepare (fill the stream for JetStream, untimed), start the side under
//! test, drive the load (`load`), wait until the side has finished every
//! message, stop. Both sides are judged by the same
//! clock and the same completion signal: handled counts (natsfn's handler
//! statistics, the native task's counter), or for a handler that publishes
//! one message per input, the messages that arrive on its output subject.
//!
//! What is measured per phase (`measure`): throughput, request round-trip
//! percentiles, CPU time of the whole process (load generator included,
//! the same on both sides) per message, the nats-server's CPU time per
//! message when it runs here, and peak RSS. [`Report`] prints the
//! table and writes the JSON that `natsfn bench --json` and the
//! `scenarios` benchmark produce.

mod instantiate;
mod load;
mod measure;
mod native;
mod report;

pub use instantiate::{handlers_instance_cost, instance_cost, FreshSteps, InstanceCost};
pub use measure::{process_cpu, Percentiles, RssScope};
pub use report::{DistinctIdle, GuestCost, IdleMemory, Machine, Report};

use std::sync::Arc;
use std::time::Duration;

use crate::host::{HostBuilder, HostError};

/// How many messages the native JetStream consumer asks for per pull, and
/// so about how many it may have unacknowledged at once. A JetStream
/// handler's throughput is bounded by its own window, `max_concurrency`,
/// divided by the pull's round trip, so a like-for-like comparison gives
/// the handler this many slots (the `scenarios` benchmark does).
pub const NATIVE_JETSTREAM_WINDOW: usize = 256;

/// The nats-server a benchmark runs against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// Its client URL.
    pub url: String,
    /// Its process, when it runs on this machine: its CPU time per message
    /// is then measured too. `None` for a server elsewhere.
    pub pid: Option<u32>,
}

impl Server {
    /// A server known only by its URL.
    pub fn at(url: impl Into<String>) -> Server {
        Server { url: url.into(), pid: None }
    }

    /// A local server this process started.
    pub fn local(server: &crate::local_server::NatsServer) -> Server {
        Server { url: server.url(), pid: Some(server.pid()) }
    }
}

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
    /// CPU time of the nats-server per message, in microseconds, when it
    /// runs here ([`Server::pid`]).
    pub server_cpu_us_per_msg: Option<f64>,
    /// Peak resident memory, in MiB.
    pub peak_rss_mb: f64,
    /// What the peak covers.
    pub rss_scope: RssScope,
}

/// One scenario, both ways, over one or more rounds.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// The scenario.
    pub scenario: Scenario,
    /// Through natsfn: each figure's median over the rounds (peak RSS: the
    /// first round's).
    pub natsfn: Measurement,
    /// Through the native async-nats handler, summarised the same way.
    pub native: Measurement,
    /// natsfn msgs/s ÷ native msgs/s in each round, in the order run.
    pub round_ratios: Vec<f64>,
}

impl ScenarioResult {
    /// Summarises `rounds` (native, natsfn) of `scenario`.
    fn of_rounds(scenario: Scenario, rounds: &[(Measurement, Measurement)]) -> Self {
        let native: Vec<Measurement> = rounds.iter().map(|r| r.0).collect();
        let natsfn: Vec<Measurement> = rounds.iter().map(|r| r.1).collect();
        let round_ratios = rounds.iter().map(|(n, f)| f.msgs_per_sec / n.msgs_per_sec.max(f64::MIN_POSITIVE)).collect();
        ScenarioResult {
            scenario,
            natsfn: Measurement::median(&natsfn),
            native: Measurement::median(&native),
            round_ratios,
        }
    }

    /// natsfn msgs/s ÷ native msgs/s: the median of the rounds' ratios.
    /// Each round sets a natsfn phase beside a native one, so a machine
    /// whose speed drifts from round to round moves both sides of each
    /// ratio; a ratio of the medians would not pair them.
    pub fn ratio(&self) -> f64 {
        median(&self.round_ratios)
    }
}

impl Measurement {
    /// Each figure's median over `rounds`, and the first round's peak RSS:
    /// later phases run in a process the other side's phases have already
    /// grown (the allocator keeps what it got), so only the first round
    /// measures each side as a single run would. `rounds` is never empty.
    fn median(rounds: &[Measurement]) -> Measurement {
        let of = |f: fn(&Measurement) -> f64| median(&rounds.iter().map(f).collect::<Vec<_>>());
        let latencies: Vec<Percentiles> = rounds.iter().filter_map(|m| m.latency).collect();
        let latency = (!latencies.is_empty()).then(|| {
            let of = |f: fn(&Percentiles) -> f64| median(&latencies.iter().map(f).collect::<Vec<_>>());
            Percentiles {
                p50_us: of(|p| p.p50_us),
                p90_us: of(|p| p.p90_us),
                p99_us: of(|p| p.p99_us),
                p999_us: of(|p| p.p999_us),
            }
        });
        Measurement {
            messages: rounds.first().map_or(0, |m| m.messages),
            seconds: of(|m| m.seconds),
            msgs_per_sec: of(|m| m.msgs_per_sec),
            latency,
            cpu_us_per_msg: of(|m| m.cpu_us_per_msg),
            server_cpu_us_per_msg: {
                let known: Vec<f64> = rounds.iter().filter_map(|m| m.server_cpu_us_per_msg).collect();
                (!known.is_empty()).then(|| median(&known))
            },
            peak_rss_mb: rounds.first().map_or(0.0, |m| m.peak_rss_mb),
            rss_scope: rounds.first().map_or(RssScope::Process, |m| m.rss_scope),
        }
    }
}

/// The median of `values` (the mean of the middle two for an even count;
/// 0 for none).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
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

/// Runs `scenario` `rounds` times (at least once) against `server`: each
/// round measures a native phase and a natsfn phase with the handlers of a
/// host from `host` (its NATS URL is set to the server's here).
/// Rounds alternate which side goes first, so neither side always runs on
/// a machine the other has just warmed (or tired).
pub async fn run(
    server: &Server,
    scenario: &Scenario,
    rounds: u32,
    mut host: impl FnMut() -> HostBuilder,
) -> Result<ScenarioResult, BenchError> {
    let mut measured = Vec::new();
    for round in 0..rounds.max(1) {
        let natsfn_side = Side::Natsfn(Box::new(host().nats_url(&server.url)));
        let pair = if round % 2 == 0 {
            let native = phase(server, scenario, Side::Native).await?;
            (native, phase(server, scenario, natsfn_side).await?)
        } else {
            let natsfn = phase(server, scenario, natsfn_side).await?;
            (phase(server, scenario, Side::Native).await?, natsfn)
        };
        measured.push(pair);
    }
    Ok(ScenarioResult::of_rounds(scenario.clone(), &measured))
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

async fn phase(server: &Server, scenario: &Scenario, side: Side) -> Result<Measurement, BenchError> {
    let url = server.url.as_str();
    let payload = bytes::Bytes::from(vec![b'x'; scenario.payload_size]);
    let n = scenario.messages;
    if let Mode::JetStream { stream } = &scenario.mode {
        let client = load::connect(url).await?;
        load::fill_stream(&client, stream, &scenario.subject, &payload, n).await?;
        let _ = client.drain().await;
    }
    let ready = side.prepare().await?;
    let meter = measure::Meter::start(server.pid);
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
    let metered = meter.stop();
    drop(progress);
    running.stop().await;
    let driven = driven?;
    let seconds = driven.elapsed.as_secs_f64().max(1e-9);
    Ok(Measurement {
        messages: n,
        seconds,
        msgs_per_sec: n as f64 / seconds,
        latency: Percentiles::of(driven.latencies),
        cpu_us_per_msg: per_message(metered.cpu, n),
        server_cpu_us_per_msg: metered.server_cpu.map(|cpu| per_message(cpu, n)),
        peak_rss_mb: metered.peak_rss_mb,
        rss_scope: metered.rss_scope,
    })
}

/// `cpu` spread over `n` messages, in microseconds.
fn per_message(cpu: Duration, n: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / n.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(msgs_per_sec: f64, p50_us: Option<f64>, peak_rss_mb: f64) -> Measurement {
        Measurement {
            messages: 100,
            seconds: 100.0 / msgs_per_sec,
            msgs_per_sec,
            latency: p50_us.map(|p50_us| Percentiles { p50_us, p90_us: p50_us, p99_us: p50_us, p999_us: p50_us }),
            cpu_us_per_msg: msgs_per_sec / 100.0,
            server_cpu_us_per_msg: Some(msgs_per_sec / 50.0),
            peak_rss_mb,
            rss_scope: RssScope::Phase,
        }
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
    }

    #[test]
    fn rounds_summarise_as_medians_and_pair_their_ratios() {
        let scenario = Scenario {
            name: "s".into(),
            mode: Mode::Request,
            subject: "s".into(),
            payload_size: 1,
            messages: 100,
            concurrency: 1,
            output: None,
        };
        // The machine halves its speed in the second round and recovers in
        // the third: both sides move, the paired ratios stay near 0.5.
        let rounds = [
            (measured(1000.0, Some(100.0), 10.0), measured(500.0, Some(150.0), 20.0)),
            (measured(500.0, Some(200.0), 12.0), measured(260.0, Some(300.0), 30.0)),
            (measured(1000.0, Some(110.0), 11.0), measured(480.0, Some(160.0), 25.0)),
        ];
        let r = ScenarioResult::of_rounds(scenario, &rounds);
        assert_eq!(r.round_ratios, vec![0.5, 0.52, 0.48]);
        assert_eq!(r.ratio(), 0.5);
        assert_eq!(r.native.msgs_per_sec, 1000.0);
        assert_eq!(r.natsfn.msgs_per_sec, 480.0);
        assert_eq!(r.natsfn.latency.map(|p| p.p50_us), Some(160.0));
        assert_eq!(r.natsfn.cpu_us_per_msg, 4.8);
        assert_eq!(r.natsfn.server_cpu_us_per_msg, Some(9.6));
        assert_eq!(r.natsfn.peak_rss_mb, 20.0, "the first round's peak, not the median");
        assert_eq!(r.native.latency.map(|p| p.p99_us), Some(110.0));
    }
}
