//! W3C trace context in NATS headers: reading a message's `traceparent` /
//! `tracestate` as the parent of the span that processes it, and writing a
//! span's context into the headers of what a handler sends.
//!
//! natsfn always speaks W3C trace context (it does not consult the global
//! propagator): the header names are fixed, and there is no lock to take on
//! the message path.

use std::str::FromStr;

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// Reads trace headers from a NATS header map. NATS header names are case
/// sensitive but HTTP's are not, and messages bridged from HTTP may carry
/// `Traceparent`: the exact name is tried first, then any casing.
struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if let Some(v) = self.0.get(key) {
            return Some(v.as_str());
        }
        self.0
            .iter()
            .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(key))
            .and_then(|(_, values)| values.first())
            .map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Whether `value` has the W3C `traceparent` shape: `vv-<32 hex>-<16 hex>-ff`
/// in lowercase hex, a version other than `ff`, exactly 55 characters for
/// version `00` (later versions may append `-` fields), and ids not all
/// zero. The OpenTelemetry propagator accepts short ids (it parses them as
/// numbers), which would graft unrelated messages onto a made-up trace.
fn well_formed_traceparent(value: &str) -> bool {
    let b = value.trim().as_bytes();
    let hex = |s: &[u8]| s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    let nonzero = |s: &[u8]| s.iter().any(|c| *c != b'0');
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return false;
    }
    let (version, trace, span, flags) = (&b[..2], &b[3..35], &b[36..52], &b[53..55]);
    let length_ok = match version {
        b"00" => b.len() == 55,
        _ => b.len() == 55 || b[55] == b'-',
    };
    length_ok
        && version != b"ff"
        && hex(version)
        && hex(trace)
        && hex(span)
        && hex(flags)
        && nonzero(trace)
        && nonzero(span)
}

/// Writes trace headers, replacing any the guest supplied.
struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` is legal to omit and saves a header line.
        if value.is_empty() {
            return;
        }
        // Both come from the propagator and are always valid; checking keeps
        // the NATS client's panicking `insert` out of the picture anyway.
        if let (Ok(name), Ok(value)) = (HeaderName::from_str(key), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

/// The trace context `headers` carry, to parent an invocation's span on. A
/// missing or malformed `traceparent` gives an empty context: the span
/// starts a new trace.
pub(crate) fn parent_context(headers: Option<&HeaderMap>) -> Context {
    let Some(headers) = headers.filter(|h| !h.is_empty()) else {
        return Context::new();
    };
    let extractor = Extract(headers);
    match extractor.get(TRACEPARENT) {
        None => return Context::new(),
        Some(tp) if !well_formed_traceparent(tp) => {
            tracing::debug!("ignoring a malformed traceparent header");
            return Context::new();
        }
        Some(_) => {}
    }
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &extractor);
    if !cx.span().span_context().is_valid() {
        tracing::debug!("ignoring a malformed traceparent header");
        return Context::new();
    }
    cx
}

/// Writes `cx` into `headers` as `traceparent` (and `tracestate` when there
/// is one), replacing those names.
pub(crate) fn inject(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut Inject(headers));
}

/// Removes guest-supplied trace headers (in any casing) from outgoing
/// pairs: the host owns propagation, and a guest forwarding its incoming
/// headers must not make the next hop a sibling instead of a child.
pub(crate) fn strip_trace_headers(pairs: &mut Vec<(String, String)>) {
    pairs.retain(|(name, _)| !name.eq_ignore_ascii_case(TRACEPARENT) && !name.eq_ignore_ascii_case(TRACESTATE));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extract_finds_any_casing_and_inject_replaces() {
        let mut h = HeaderMap::new();
        h.insert("Traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let extract = Extract(&h);
        assert_eq!(extract.get(TRACEPARENT), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));

        let mut out = HeaderMap::new();
        out.insert(TRACEPARENT, "old");
        Inject(&mut out).set(TRACEPARENT, "new".into());
        Inject(&mut out).set(TRACESTATE, String::new());
        assert_eq!(out.get(TRACEPARENT).map(|v| v.as_str()), Some("new"));
        assert!(out.get(TRACESTATE).is_none());
    }

    #[test]
    fn only_well_formed_traceparents_are_trusted() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(well_formed_traceparent(good));
        assert!(well_formed_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"));
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
        ] {
            assert!(!well_formed_traceparent(bad), "{bad:?}");
        }
    }

    #[test]
    fn guest_trace_headers_are_stripped_in_any_casing() {
        let mut pairs = vec![
            ("TraceParent".to_string(), "x".to_string()),
            ("tracestate".to_string(), "y".to_string()),
            ("keep".to_string(), "z".to_string()),
        ];
        strip_trace_headers(&mut pairs);
        assert_eq!(pairs, vec![("keep".to_string(), "z".to_string())]);
    }
}
