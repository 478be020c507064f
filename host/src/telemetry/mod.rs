//! Telemetry: log output for the binary, and OpenTelemetry spans for
//! everyone.
//!
//! natsfn makes its spans with the OpenTelemetry SDK (see `spans` for why
//! not through `tracing`): one `process {subject}` span per invocation (kind
//! consumer, parented on the W3C `traceparent` of the message) and one child
//! span per host call (`publish {subject}`, `request {subject}`, `kv.get
//! {bucket}`, ...). Their attributes are named after the messaging semantic
//! conventions of [`SEMCONV_SCHEMA_URL`].
//!
//! - [`Otlp`] builds an OTLP export pipeline (gRPC or HTTP/protobuf, the
//!   standard `OTEL_*` variables honoured); its [`OtlpPipeline::tracer`] goes
//!   to [`crate::HostBuilder::tracer`]. An embedder with their own
//!   OpenTelemetry provider gives the host a [`Tracer`] made from it instead.
//! - [`init`] is what the `natsfn` binary installs for log lines: stderr,
//!   filtered by `RUST_LOG`. Guest log lines go there too (with the trace
//!   and span ids when traced), and are events of the invocation's span.
//!
//! A host given no tracer makes no spans and never reads or writes trace
//! headers: tracing off costs nothing.

pub(crate) mod key;
mod otlp;
mod propagation;
mod spans;

pub use otlp::{ExportStats, Otlp, OtlpPipeline, Protocol, Sampler, TelemetryError, DEFAULT_MAX_QUEUE_SIZE};
pub(crate) use propagation::{parent_context, strip_trace_headers};
pub use spans::Tracer;
pub(crate) use spans::{current, Trace};

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The OpenTelemetry semantic conventions natsfn's span attributes follow:
/// schema 1.42.0, the messaging conventions (still *development* status).
pub const SEMCONV_SCHEMA_URL: &str = opentelemetry_semantic_conventions::SCHEMA_URL;

/// Installs the global subscriber: human-readable lines on stderr filtered
/// by `RUST_LOG` (default `default_filter`), coloured only when stderr is a
/// terminal. Returns whether this call installed it (false when a
/// subscriber was already set).
pub fn init(default_filter: &str) -> bool {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colour only for a person at a terminal: log files and collectors
    // reading a pipe would get escape codes in every field.
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_filter(filter);
    tracing_subscriber::registry().with(fmt).try_init().is_ok()
}
