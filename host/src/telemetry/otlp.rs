//! The OTLP export pipeline: configuration ([`Otlp`]), the running pipeline
//! ([`OtlpPipeline`]) and the span accounting that makes "spans are dropped,
//! never waited for" observable.
//!
//! Spans leave through OpenTelemetry's thread-based `BatchSpanProcessor`:
//! ending a span is a bounded, non-blocking channel send, and export happens
//! on the processor's own thread. Its queue-full drops are only logged (once),
//! so natsfn puts a gate in front of it: a count of spans handed over and not
//! yet settled by the exporter, capped at the processor's queue size. A span
//! that would exceed the cap is dropped and counted here, so the processor's
//! own queue can never overflow; the exporter wrapper settles each batch and
//! counts the spans of batches that failed. [`OtlpPipeline::stats`] reads the
//! counters.
//!
//! gRPC export (tonic) needs a Tokio runtime. The pipeline brings its own
//! one-thread runtime for it, so export I/O never competes with invocations
//! for the host's worker threads, and building a pipeline works anywhere.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, InstrumentationScope};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;

use super::SEMCONV_SCHEMA_URL;

/// Spans buffered for export when neither the builder nor
/// `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise (the SDK's default).
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 2048;

/// How long [`OtlpPipeline::shutdown`] waits for the last export.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// `service.name` when neither the builder nor `OTEL_SERVICE_NAME` sets one.
const DEFAULT_SERVICE_NAME: &str = "natsfn";

const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const OTEL_EXPORTER_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
const OTEL_EXPORTER_OTLP_TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
const OTEL_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
const OTEL_RESOURCE_ATTRIBUTES: &str = "OTEL_RESOURCE_ATTRIBUTES";
const OTEL_TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
const OTEL_TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
const OTEL_TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
const OTEL_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
const OTEL_BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";

/// Why an OTLP pipeline could not be set up. Each variant names the setting
/// (environment variable or flag) at fault.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An OTLP protocol natsfn does not speak.
    #[error("{setting}: unknown OTLP protocol `{value}`; use `grpc` or `http/protobuf`")]
    Protocol {
        /// The variable or flag.
        setting: &'static str,
        /// What it said.
        value: String,
    },
    /// A sampler name that is not one of the standard ones.
    #[error(
        "{setting}: unknown sampler `{value}`; use always_on, always_off, traceidratio, \
         parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
    )]
    Sampler {
        /// The variable or flag.
        setting: &'static str,
        /// What it said.
        value: String,
    },
    /// A number that does not parse or is out of range.
    #[error("{setting}: `{value}` is not {expected}")]
    Number {
        /// The variable or flag.
        setting: &'static str,
        /// What it said.
        value: String,
        /// What was expected instead.
        expected: &'static str,
    },
    /// The OTLP exporter refused its configuration (a malformed endpoint,
    /// header or timeout in the `OTEL_EXPORTER_OTLP_*` variables).
    #[error("cannot build the OTLP {protocol} span exporter: {source}")]
    Exporter {
        /// The protocol being set up.
        protocol: Protocol,
        /// What the exporter said; it names the setting.
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// The gRPC exporter's runtime thread could not start.
    #[error("cannot start the OTLP export runtime: {0}")]
    Runtime(std::io::Error),
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (usually port 4317).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (usually port 4318, path
    /// `/v1/traces`). The specification's default.
    HttpProtobuf,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;

    /// `grpc`, `http/protobuf`, or `http` for short.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" | "http" => Ok(Protocol::HttpProtobuf),
            other => Err(format!("unknown OTLP protocol `{other}`; use `grpc` or `http/protobuf`")),
        }
    }
}

/// Which traces are recorded: the standard `OTEL_TRACES_SAMPLER` choices.
/// Parent-based samplers follow the sampled flag of an incoming
/// `traceparent` and apply the inner choice to new traces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    /// Record everything.
    AlwaysOn,
    /// Record nothing.
    AlwaysOff,
    /// Record this fraction of traces, ignoring the parent.
    TraceIdRatio(f64),
    /// Follow the parent; record every new trace (the default).
    ParentBasedAlwaysOn,
    /// Follow the parent; record no new trace.
    ParentBasedAlwaysOff,
    /// Follow the parent; record this fraction of new traces.
    ParentBasedTraceIdRatio(f64),
}

impl Sampler {
    /// Parses a standard sampler name and its argument (the ratio, default
    /// 1.0). Errors name `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`.
    pub fn from_names(name: &str, arg: Option<&str>) -> Result<Sampler, TelemetryError> {
        Sampler::from_settings(name, arg, (OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG))
    }

    /// [`Sampler::from_names`], with errors naming `settings` (the name's
    /// and the argument's variable or flag).
    pub fn from_settings(
        name: &str,
        arg: Option<&str>,
        settings: (&'static str, &'static str),
    ) -> Result<Sampler, TelemetryError> {
        let ratio = || -> Result<f64, TelemetryError> {
            let Some(arg) = arg.map(str::trim).filter(|a| !a.is_empty()) else {
                return Ok(1.0);
            };
            arg.parse::<f64>().ok().filter(|r| (0.0..=1.0).contains(r)).ok_or_else(|| TelemetryError::Number {
                setting: settings.1,
                value: arg.to_owned(),
                expected: "a sampling ratio between 0 and 1",
            })
        };
        Ok(match name.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatio(ratio()?),
            "parentbased_always_on" => Sampler::ParentBasedAlwaysOn,
            "parentbased_always_off" => Sampler::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => Sampler::ParentBasedTraceIdRatio(ratio()?),
            other => return Err(TelemetryError::Sampler { setting: settings.0, value: other.to_owned() }),
        })
    }

    fn to_sdk(self) -> opentelemetry_sdk::trace::Sampler {
        use opentelemetry_sdk::trace::Sampler as S;
        match self {
            Sampler::AlwaysOn => S::AlwaysOn,
            Sampler::AlwaysOff => S::AlwaysOff,
            Sampler::TraceIdRatio(r) => S::TraceIdRatioBased(r),
            Sampler::ParentBasedAlwaysOn => S::ParentBased(Box::new(S::AlwaysOn)),
            Sampler::ParentBasedAlwaysOff => S::ParentBased(Box::new(S::AlwaysOff)),
            Sampler::ParentBasedTraceIdRatio(r) => S::ParentBased(Box::new(S::TraceIdRatioBased(r))),
        }
    }
}

/// Configures an OTLP trace pipeline. Unset settings fall back to the
/// standard variables, which the OTLP exporter reads itself:
/// `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `..._HEADERS`, `..._TIMEOUT`,
/// `..._COMPRESSION`, and `OTEL_BSP_*` for batching.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let otlp = natsfn::telemetry::Otlp::from_env()?
///     .endpoint("http://collector:4318")
///     .build()?;
/// let host = natsfn::Host::builder().handlers_dir("handlers").tracer(otlp.tracer()).build().await?;
/// // ... run the host ...
/// # drop(host);
/// otlp.shutdown(); // flushes the last spans (blocks: call it outside async code)
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct Otlp {
    endpoint: Option<String>,
    protocol: Option<Protocol>,
    service_name: Option<String>,
    sampler: Option<Sampler>,
    export_timeout: Option<Duration>,
    max_queue_size: Option<usize>,
    scheduled_delay: Option<Duration>,
    /// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
    disabled_by_env: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

impl Otlp {
    /// A configuration with nothing set: every choice falls to the
    /// exporter's own reading of the environment, or to the defaults.
    pub fn new() -> Otlp {
        Otlp::default()
    }

    /// A configuration from the standard variables: protocol
    /// (`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, then
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`), sampler (`OTEL_TRACES_SAMPLER`,
    /// `OTEL_TRACES_SAMPLER_ARG`), `OTEL_SERVICE_NAME`,
    /// `OTEL_BSP_MAX_QUEUE_SIZE`, and whether tracing is switched off
    /// (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`). Setters
    /// called afterwards override them.
    pub fn from_env() -> Result<Otlp, TelemetryError> {
        let mut otlp = Otlp::new();
        for var in [OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL] {
            if let Some(value) = env(var) {
                otlp.protocol = Some(value.parse().map_err(|_| TelemetryError::Protocol { setting: var, value })?);
                break;
            }
        }
        if let Some(name) = env(OTEL_TRACES_SAMPLER) {
            let arg = env(OTEL_TRACES_SAMPLER_ARG);
            otlp.sampler = Some(Sampler::from_names(&name, arg.as_deref())?);
        }
        otlp.service_name = env(OTEL_SERVICE_NAME);
        if let Some(value) = env(OTEL_BSP_MAX_QUEUE_SIZE) {
            let size = value.parse::<usize>().ok().filter(|n| *n > 0);
            otlp.max_queue_size = Some(size.ok_or(TelemetryError::Number {
                setting: OTEL_BSP_MAX_QUEUE_SIZE,
                value,
                expected: "a positive number of spans",
            })?);
        }
        otlp.disabled_by_env = env(OTEL_SDK_DISABLED).is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || env(OTEL_TRACES_EXPORTER).is_some_and(|v| v.split(',').any(|e| e.trim().eq_ignore_ascii_case("none")));
        Ok(otlp)
    }

    /// Whether a pipeline should run: an endpoint was given here or in
    /// `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, and the environment does not
    /// switch tracing off. The `natsfn` binary traces only then.
    pub fn is_configured(&self) -> bool {
        !self.disabled_by_env
            && (self.endpoint.is_some()
                || env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).is_some()
                || env(OTEL_EXPORTER_OTLP_ENDPOINT).is_some())
    }

    /// The collector's base URL, like `OTEL_EXPORTER_OTLP_ENDPOINT`: for
    /// HTTP, `/v1/traces` is appended unless already there; for gRPC it is
    /// used as is.
    pub fn endpoint(mut self, url: impl Into<String>) -> Self {
        self.endpoint = Some(url.into());
        self
    }

    /// gRPC or HTTP/protobuf. Default: the environment, else HTTP/protobuf
    /// (the specification's default).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// The `service.name` resource attribute. Default: `OTEL_SERVICE_NAME`,
    /// else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else `natsfn`.
    pub fn service_name(mut self, name: impl Into<String>) -> Self {
        self.service_name = Some(name.into());
        self
    }

    /// Which traces to record. Default: parent-based, always on.
    pub fn sampler(mut self, sampler: Sampler) -> Self {
        self.sampler = Some(sampler);
        self
    }

    /// How long one export may take before it counts as failed. Default:
    /// `OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT`, else 10 s.
    pub fn export_timeout(mut self, timeout: Duration) -> Self {
        self.export_timeout = Some(timeout);
        self
    }

    /// Spans that may wait for export; past this they are dropped and
    /// counted. Default [`DEFAULT_MAX_QUEUE_SIZE`].
    pub fn max_queue_size(mut self, spans: usize) -> Self {
        self.max_queue_size = Some(spans.max(1));
        self
    }

    /// How often buffered spans are sent when the batch is not full.
    /// Default: `OTEL_BSP_SCHEDULE_DELAY`, else 5 s.
    pub fn scheduled_delay(mut self, delay: Duration) -> Self {
        self.scheduled_delay = Some(delay);
        self
    }

    /// Builds the exporter, the batch processor and the tracer. Nothing is
    /// installed globally: give [`OtlpPipeline::tracer`] to the host.
    pub fn build(self) -> Result<OtlpPipeline, TelemetryError> {
        let protocol = self.protocol.unwrap_or(Protocol::HttpProtobuf);
        let counters = Arc::new(Counters::default());

        let (exporter, runtime) = match protocol {
            Protocol::Grpc => {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("natsfn-otlp")
                    .enable_all()
                    .build()
                    .map_err(TelemetryError::Runtime)?;
                // tonic spawns its connection worker on the current runtime.
                let _in_runtime = runtime.enter();
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_protocol(opentelemetry_otlp::Protocol::Grpc);
                if let Some(endpoint) = &self.endpoint {
                    builder = builder.with_endpoint(endpoint.clone());
                }
                if let Some(timeout) = self.export_timeout {
                    builder = builder.with_timeout(timeout);
                }
                let exporter = builder.build().map_err(|source| TelemetryError::Exporter { protocol, source })?;
                (exporter, Some(runtime))
            }
            Protocol::HttpProtobuf => {
                let mut builder = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                if let Some(endpoint) = &self.endpoint {
                    builder = builder.with_endpoint(http_traces_url(endpoint));
                }
                if let Some(timeout) = self.export_timeout {
                    builder = builder.with_timeout(timeout);
                }
                let exporter = builder.build().map_err(|source| TelemetryError::Exporter { protocol, source })?;
                (exporter, None)
            }
        };

        let capacity = self.max_queue_size.unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
        // The SDK's builder reads OTEL_BSP_*; the queue size is always set
        // explicitly so the gate and the processor agree on it.
        let mut batch = BatchConfigBuilder::default().with_max_queue_size(capacity);
        if let Some(delay) = self.scheduled_delay {
            batch = batch.with_scheduled_delay(delay);
        }
        let processor = BatchSpanProcessor::builder(CountingExporter { inner: exporter, counters: counters.clone() })
            .with_batch_config(batch.build())
            .build();

        // OTEL_RESOURCE_ATTRIBUTES may name the service too (the resource
        // builder reads it); natsfn's default must not override that.
        let named_by_env = env(OTEL_RESOURCE_ATTRIBUTES)
            .is_some_and(|attrs| attrs.split(',').any(|kv| kv.trim().starts_with("service.name=")));
        let service_name = self.service_name.or_else(|| (!named_by_env).then(|| DEFAULT_SERVICE_NAME.to_owned()));
        let mut resource = Resource::builder();
        if let Some(name) = service_name {
            resource = resource.with_service_name(name);
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(GatedProcessor {
                inner: processor,
                counters: counters.clone(),
                capacity: capacity as u64,
                closed: AtomicBool::new(false),
            })
            .with_sampler(self.sampler.unwrap_or(Sampler::ParentBasedAlwaysOn).to_sdk())
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer_with_scope(
            InstrumentationScope::builder("natsfn")
                .with_version(env!("CARGO_PKG_VERSION"))
                .with_schema_url(SEMCONV_SCHEMA_URL)
                .build(),
        );
        Ok(OtlpPipeline { provider, tracer, counters, protocol, runtime })
    }
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT` semantics for an explicit HTTP endpoint:
/// a base URL that gets the signal path.
fn http_traces_url(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// A running export pipeline. Keep it for the life of the process and call
/// [`shutdown`](OtlpPipeline::shutdown) at the end so the last spans leave.
pub struct OtlpPipeline {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    counters: Arc<Counters>,
    protocol: Protocol,
    /// The gRPC exporter's own runtime; `None` for HTTP.
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for OtlpPipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtlpPipeline")
            .field("protocol", &self.protocol)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// What happened to the spans handed to a pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Spans the collector accepted.
    pub exported: u64,
    /// Spans dropped because the export queue was full (collector slow or
    /// down): the message path never waits for export.
    pub dropped_queue_full: u64,
    /// Spans in batches whose export failed or timed out.
    pub dropped_export_failed: u64,
    /// Spans ended after the pipeline was shut down.
    pub dropped_after_shutdown: u64,
}

impl ExportStats {
    /// Every span that did not reach the collector.
    pub fn dropped(&self) -> u64 {
        self.dropped_queue_full + self.dropped_export_failed + self.dropped_after_shutdown
    }
}

impl OtlpPipeline {
    /// The tracer to give [`crate::HostBuilder::tracer`].
    pub fn tracer(&self) -> super::Tracer {
        super::Tracer::new(self.tracer.clone())
    }

    /// The transport in use.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Counters of exported and dropped spans.
    pub fn stats(&self) -> ExportStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ExportStats {
            exported: get(&self.counters.exported),
            dropped_queue_full: get(&self.counters.queue_full),
            dropped_export_failed: get(&self.counters.export_failed),
            dropped_after_shutdown: get(&self.counters.after_shutdown),
        }
    }

    /// Exports what is buffered now and waits for it (up to 5 s). Blocks the
    /// calling thread: from async code, use `spawn_blocking`. A failure is
    /// logged and returned as `false`.
    pub fn force_flush(&self) -> bool {
        match self.provider.force_flush() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("cannot flush spans to the OTLP collector: {e}");
                false
            }
        }
    }

    /// Exports what is left and stops the pipeline (waiting up to 5 s),
    /// logging rather than returning a failure: a collector that is down
    /// must not turn a clean shutdown into an error. Blocks the calling
    /// thread, like [`force_flush`](OtlpPipeline::force_flush). Returns the
    /// final counts.
    pub fn shutdown(mut self) -> ExportStats {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!("cannot flush the last spans to the OTLP collector: {e}");
        }
        let stats = self.stats();
        if stats.dropped() > 0 {
            tracing::warn!(
                exported = stats.exported,
                dropped_queue_full = stats.dropped_queue_full,
                dropped_export_failed = stats.dropped_export_failed,
                "some spans never reached the OTLP collector"
            );
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        stats
    }
}

impl Drop for OtlpPipeline {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside async code.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Span accounting shared by the gate and the exporter wrapper.
#[derive(Debug, Default)]
struct Counters {
    /// Spans handed to the batch processor and not yet settled.
    pending: AtomicU64,
    exported: AtomicU64,
    queue_full: AtomicU64,
    export_failed: AtomicU64,
    after_shutdown: AtomicU64,
}

/// Drops spans, and counts them, once `capacity` are waiting for export.
#[derive(Debug)]
struct GatedProcessor<P> {
    inner: P,
    counters: Arc<Counters>,
    capacity: u64,
    closed: AtomicBool,
}

impl<P: SpanProcessor> SpanProcessor for GatedProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.closed.load(Ordering::Relaxed) {
            self.counters.after_shutdown.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let pending = &self.counters.pending;
        if pending.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            pending.fetch_sub(1, Ordering::AcqRel);
            self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.closed.store(true, Ordering::Relaxed);
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Settles each batch in the counters: exported, or failed.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    counters: Arc<Counters>,
}

/// Settles a batch when the export finishes or is abandoned (dropped).
struct Settle {
    counters: Arc<Counters>,
    spans: u64,
    ok: bool,
}

impl Drop for Settle {
    fn drop(&mut self) {
        let c = &self.counters;
        c.pending.fetch_sub(self.spans, Ordering::AcqRel);
        let outcome = if self.ok { &c.exported } else { &c.export_failed };
        outcome.fetch_add(self.spans, Ordering::Relaxed);
    }
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let settle = Settle { counters: self.counters.clone(), spans: batch.len() as u64, ok: false };
        let export = self.inner.export(batch);
        async move {
            // Bound whole, so the future owns it and its drop settles the
            // batch even when the export is abandoned.
            let mut settle = settle;
            let result = export.await;
            settle.ok = result.is_ok();
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_and_ratios() {
        assert_eq!(
            Sampler::from_names("parentbased_traceidratio", Some("0.25")).unwrap(),
            Sampler::ParentBasedTraceIdRatio(0.25)
        );
        assert_eq!(Sampler::from_names("traceidratio", None).unwrap(), Sampler::TraceIdRatio(1.0));
        let e = Sampler::from_names("sometimes", None).unwrap_err();
        assert!(e.to_string().starts_with("OTEL_TRACES_SAMPLER: "), "{e}");
        let e = Sampler::from_names("traceidratio", Some("2")).unwrap_err();
        assert!(e.to_string().starts_with("OTEL_TRACES_SAMPLER_ARG: "), "{e}");
    }

    #[test]
    fn http_endpoint_is_a_base_url() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(http_traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    }

    #[test]
    fn protocols_parse() {
        assert_eq!("grpc".parse::<Protocol>(), Ok(Protocol::Grpc));
        assert_eq!("http".parse::<Protocol>(), Ok(Protocol::HttpProtobuf));
        assert_eq!("http/protobuf".parse::<Protocol>(), Ok(Protocol::HttpProtobuf));
        assert!("http/json".parse::<Protocol>().is_err());
    }
}
