//! `natsfn:host/log`: guest log lines into the host's log, tagged with the
//! handler and tenant so an operator can tell whose line it is, and with the
//! trace and span ids when the invocation is traced. Emitted inside the
//! invocation's span, a line is also an event of that span.

use tracing::field::display;

use super::Invocation;
use crate::bindings::natsfn::host::log::{Host, Level};
use crate::limits::MAX_LOG_LINE;
use crate::telemetry;

/// The tracing target of every line a guest writes, through this interface
/// or stdout/stderr, so operators can filter guest output on its own.
pub(crate) const GUEST_TARGET: &str = "natsfn::guest";

impl Host for Invocation {
    async fn log(&mut self, level: Level, text: String) -> wasmtime::Result<()> {
        if !self.tenant.may_log() {
            return Ok(());
        }
        let text = truncate(&text, MAX_LOG_LINE);
        let handler = self.manifest.name.as_str();
        let tenant = self.manifest.tenant.as_str();
        let ids = telemetry::log_ids(&self.span);
        let trace_id = ids.map(|(t, _)| display(t));
        let span_id = ids.map(|(_, s)| display(s));
        // tracing needs the level as a constant at each call site.
        match level {
            Level::Trace => {
                tracing::trace!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, "{text}")
            }
            Level::Debug => {
                tracing::debug!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, "{text}")
            }
            Level::Info => {
                tracing::info!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, "{text}")
            }
            Level::Warn => {
                tracing::warn!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, "{text}")
            }
            Level::Error => {
                tracing::error!(target: GUEST_TARGET, handler = %handler, tenant = %tenant, trace_id, span_id, "{text}")
            }
        }
        Ok(())
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
