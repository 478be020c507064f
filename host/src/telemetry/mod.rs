//! Telemetry: log output for the binary, and OpenTelemetry tracing for
//! everyone.
//!
//! The library only *emits* [`tracing`] spans and events; whoever owns the
//! process decides where they go. natsfn's spans all use the target
//! [`SPAN_TARGET`] at `INFO`: one `process {subject}` span per invocation
//! (kind consumer, parented on the W3C `traceparent` of the message) and one
//! child span per host call (`publish {subject}`, `request {subject}`).
//! Their fields are OpenTelemetry attributes named after the messaging
//! semantic conventions of [`SEMCONV_SCHEMA_URL`], and `tracing-opentelemetry`
//! turns them into OTel spans.
//!
//! - [`Otlp`] builds an OTLP export pipeline (gRPC or HTTP/protobuf, the
//!   standard `OTEL_*` variables honoured) whose [`OtlpPipeline::layer`] an
//!   embedder adds to their own subscriber, with the per-layer filter that
//!   keeps a global `EnvFilter` from starving it.
//! - [`init`] is what the `natsfn` binary installs: stderr logs filtered by
//!   `RUST_LOG`, plus the OTLP layer when one is configured.
//!
//! With no layer interested in [`SPAN_TARGET`], the spans are disabled at
//! their call sites (one cached interest check), and dispatch skips trace
//! context extraction and injection entirely: tracing off costs nothing.

mod otlp;
mod propagation;

pub use otlp::{ExportStats, Otlp, OtlpPipeline, Protocol, Sampler, TelemetryError};
pub(crate) use propagation::{adopt_parent, inject, log_ids, span_context, strip_trace_headers};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The `tracing` target of every span natsfn creates. Filters for an
/// OpenTelemetry layer must let it through at `INFO`; log output usually
/// leaves it out.
pub const SPAN_TARGET: &str = "natsfn::trace";

/// The OpenTelemetry semantic conventions natsfn's span attributes follow:
/// schema 1.42.0, the messaging conventions (still *development* status).
pub const SEMCONV_SCHEMA_URL: &str = opentelemetry_semantic_conventions::SCHEMA_URL;

/// Installs the global subscriber for log output only. Calling it twice is
/// harmless (the second call does nothing).
pub fn init_logging(default_filter: &str) {
    init(default_filter, None);
}

/// Installs the global subscriber: human-readable lines on stderr filtered
/// by `RUST_LOG` (default `default_filter`), and `otlp`'s layer when given.
/// Returns whether this call installed it (false when a subscriber was
/// already set).
///
/// natsfn's spans are left out of the log lines: their attributes are for
/// the trace backend, and guest lines already carry the handler, tenant and
/// trace ids as fields.
pub fn init(default_filter: &str, otlp: Option<&OtlpPipeline>) -> bool {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    if let Ok(off) = format!("{SPAN_TARGET}=off").parse() {
        filter = filter.add_directive(off);
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_filter(filter);
    tracing_subscriber::registry().with(fmt).with(otlp.map(OtlpPipeline::layer)).try_init().is_ok()
}
