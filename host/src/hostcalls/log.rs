//! `natsfn:host/log`: guest log lines into the host's log, tagged with the
//! handler and tenant so an operator can tell whose line it is, and with the
//! trace and span ids when the invocation is traced; a traced line is also an
//! event of the invocation's span. Guest stdout and stderr lines go the same
//! way ([`guest_line`]).

use opentelemetry::trace::TraceContextExt;
use opentelemetry::{Context, KeyValue};
use tracing::field::display;

use super::Invocation;
use crate::bindings::natsfn::host::log::{Host, Level};
use crate::limits::MAX_LOG_LINE;
use crate::manifest::Manifest;
use crate::telemetry::key;

/// The tracing target of every line a guest writes, through this interface
/// or stdout/stderr, so operators can filter guest output on its own.
const GUEST_TARGET: &str = "natsfn::guest";

impl Host for Invocation {
    async fn log(&mut self, level: Level, text: String) -> wasmtime::Result<()> {
        if !self.tenant.may_log() {
            return Ok(());
        }
        let trace = self.trace.as_ref().map(|t| t.context());
        guest_line(level, truncate(&text, MAX_LOG_LINE), &self.manifest, None, trace);
        Ok(())
    }
}

/// Writes one line of guest output (from `stream`, or the log interface
/// when `None`) to the host log, and as an event of the span in `trace`.
pub(crate) fn guest_line(
    level: Level,
    text: &str,
    manifest: &Manifest,
    stream: Option<&'static str>,
    trace: Option<&Context>,
) {
    let handler = manifest.name.as_str();
    let tenant = manifest.tenant.as_str();
    let ids = trace.map(|cx| {
        let span = cx.span();
        let sc = span.span_context();
        (sc.trace_id(), sc.span_id())
    });
    let trace_id = ids.map(|(t, _)| display(t));
    let span_id = ids.map(|(_, s)| display(s));
    // tracing needs the level as a constant at each call site.
    match level {
        Level::Trace => {
            tracing::trace!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, stream, "{text}")
        }
        Level::Debug => {
            tracing::debug!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, stream, "{text}")
        }
        Level::Info => {
            tracing::info!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, stream, "{text}")
        }
        Level::Warn => {
            tracing::warn!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, stream, "{text}")
        }
        Level::Error => {
            tracing::error!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, stream, "{text}")
        }
    }
    let (Some(cx), Some((trace_id, span_id))) = (trace, ids) else {
        return;
    };
    let mut attributes = vec![
        KeyValue::new(key::LOG_HANDLER, handler.to_owned()),
        KeyValue::new(key::LOG_TENANT, tenant.to_owned()),
        KeyValue::new(key::LOG_LEVEL, level_name(level)),
        KeyValue::new(key::LOG_TRACE_ID, trace_id.to_string()),
        KeyValue::new(key::LOG_SPAN_ID, span_id.to_string()),
    ];
    if let Some(stream) = stream {
        attributes.push(KeyValue::new(key::LOG_STREAM, stream));
    }
    cx.span().add_event(text.to_owned(), attributes);
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Trace => "TRACE",
        Level::Debug => "DEBUG",
        Level::Info => "INFO",
        Level::Warn => "WARN",
        Level::Error => "ERROR",
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
