//! Host calls: the implementation of every WIT interface a guest imports,
//! one file per interface.
//!
//! All of them work on an [`Invocation`], the slice of the store that belongs
//! to host calls: who is calling (the handler's manifest, for permissions and
//! config), the NATS connection to act with, the invocation's deadline, and
//! for JetStream deliveries the message to acknowledge.
//! They never see the rest of the store (WASI state, limits), which keeps each
//! interface testable and its reach obvious.
//!
//! Calls that reach NATS run in their own child span of the invocation's
//! span (named and attributed per call, in each interface's file), and what
//! they send carries that span's trace context in its headers.

mod acks;
mod buckets;
mod config;
mod kv;
mod log;
mod messaging;
mod object;
mod types;

pub(crate) use acks::{Decision, JetStreamAck};
pub(crate) use buckets::Buckets;
pub(crate) use log::guest_line;
pub use object::{ObjectReader, ObjectWriter};

use std::sync::Arc;

use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use tokio::time::Instant;
use wasmtime::component::{HasData, Linker};

use crate::bindings::{Handler, WitError};
use crate::dispatch::Stats;
use crate::manifest::Manifest;
use crate::telemetry::{self, key, Trace};
use crate::tenant::Tenant;
use crate::wire;

/// What host calls know about the invocation they serve.
pub struct Invocation {
    /// The manifest of the handler version being run.
    pub(crate) manifest: Arc<Manifest>,
    /// The handler's tenant: its NATS connection, buckets and limits.
    pub(crate) tenant: Arc<Tenant>,
    /// The handler's counters (denials, rate limiting).
    pub(crate) stats: Arc<Stats>,
    /// When the invocation's time is up; waits inside host calls end here.
    pub(crate) deadline: Instant,
    /// The JetStream message being handled, for the `acks` interface.
    pub(crate) jetstream: Option<JetStreamAck>,
    /// Resources the guest holds (object readers and writers); dropped with
    /// the invocation.
    pub(crate) table: wasmtime::component::ResourceTable,
    /// The invocation's span, the parent of host-call spans; `None` when
    /// the host is not traced.
    pub(crate) trace: Option<Trace>,
}

/// What one message gives its invocation. The rest of an [`Invocation`]
/// is its handler's, the same for every message of a handler version.
pub(crate) struct MessageCalls {
    pub(crate) deadline: Instant,
    pub(crate) jetstream: Option<JetStreamAck>,
    pub(crate) trace: Option<Trace>,
}

impl Invocation {
    /// The invocation of a handler (its `manifest`, `tenant` and `stats`)
    /// for `message`.
    pub(crate) fn new(manifest: Arc<Manifest>, tenant: Arc<Tenant>, stats: Arc<Stats>, message: MessageCalls) -> Self {
        let MessageCalls { deadline, jetstream, trace } = message;
        let table = wasmtime::component::ResourceTable::new();
        Invocation { manifest, tenant, stats, deadline, jetstream, table, trace }
    }

    /// Turns a kept invocation (of a store kept for reuse or made on
    /// standby, both of one handler version) to `next`'s message: the
    /// handler's parts stay, where building them again cost three
    /// reference counts taken and three given back per message.
    pub(crate) fn next_message(&mut self, next: MessageCalls) {
        let MessageCalls { deadline, jetstream, trace } = next;
        self.deadline = deadline;
        self.jetstream = jetstream;
        self.trace = trace;
        self.table = wasmtime::component::ResourceTable::new();
    }
}

/// Builds the headers of an outgoing message from the guest's pairs and the
/// trace context of `trace`. When there is a context to send, it replaces
/// any trace headers the guest supplied (a guest forwarding its incoming
/// headers would otherwise make the next hop a sibling, not a child).
pub(crate) fn outgoing_headers(
    trace: Option<&Trace>,
    mut pairs: Vec<(String, String)>,
) -> Result<Option<async_nats::HeaderMap>, WitError> {
    let Some(trace) = trace else {
        return wire::headers_from_wit(pairs);
    };
    telemetry::strip_trace_headers(&mut pairs);
    let mut headers = wire::headers_from_wit(pairs)?.unwrap_or_default();
    trace.inject(&mut headers);
    Ok(Some(headers))
}

impl Invocation {
    /// Logs and counts a refusal by the handler's permissions, and names
    /// what was refused to the guest.
    pub(crate) fn deny(&self, what: String, target: &str) -> WitError {
        self.stats.denied();
        self.tenant.count_denied();
        tracing::warn!(handler = %self.manifest.name, tenant = %self.manifest.tenant, target, "denied {what}: not in the handler's permissions");
        WitError::PermissionDenied(what)
    }

    /// Checks a payload against the tenant's ceiling before it is sent or
    /// stored.
    pub(crate) fn payload_fits(&self, len: usize) -> Result<(), WitError> {
        self.tenant.payload_fits(len).map_err(WitError::TooLarge)
    }

    /// The client span of a KV or object call, a child of the invocation:
    /// `{operation} {bucket}`, with the bucket and the key or object name.
    pub(crate) fn bucket_span(&self, operation: &'static str, bucket: &str, key: Option<&str>) -> Option<Trace> {
        let trace = self.trace.as_ref()?;
        let mut attributes = vec![
            KeyValue::new(key::DB_SYSTEM, "nats"),
            KeyValue::new(key::DB_OPERATION, operation),
            KeyValue::new(key::DB_NAMESPACE, bucket.to_owned()),
            KeyValue::new(key::BUCKET, bucket.to_owned()),
        ];
        if let Some(key) = key {
            attributes.push(KeyValue::new(key::KEY, key.to_owned()));
        }
        Some(trace.child(format!("{operation} {bucket}"), SpanKind::Client, attributes))
    }
}

/// Runs a host call in `span` (ended when it returns), and marks the span
/// failed when the guest gets an error back.
pub(crate) async fn in_span<T>(
    span: Option<&Trace>,
    call: impl std::future::Future<Output = Result<T, CallError>>,
) -> Result<T, CallError> {
    let result = call.await;
    if let Some(span) = span {
        record_call_error(span, &result);
        span.end();
    }
    result
}

/// Marks a host-call span as failed with the error the guest gets back.
fn record_call_error<T>(span: &Trace, result: &Result<T, CallError>) {
    let Err(CallError::Guest(e)) = result else {
        return;
    };
    let (kind, detail) = match e {
        WitError::PermissionDenied(s) => ("permission_denied", s.clone()),
        WitError::NotFound => ("not_found", String::new()),
        WitError::Conflict(rev) => ("conflict", format!("revision {rev}")),
        WitError::Timeout => ("timeout", String::new()),
        WitError::NoResponders => ("no_responders", String::new()),
        WitError::TooLarge(max) => ("too_large", format!("limit {max} bytes")),
        WitError::Invalid(s) => ("invalid", s.clone()),
        WitError::Unavailable(s) => ("unavailable", s.clone()),
    };
    let description = if detail.is_empty() { kind.to_owned() } else { format!("{kind}: {detail}") };
    span.fail(kind, description);
}

/// The error side of host calls that return the WIT `error` variant.
///
/// Domain problems (denied, timeout, bad subject) go back to the guest as
/// values it can handle; they never trap. This type exists so that a host
/// call can one day end the invocation instead (a breached tenant limit) by
/// adding a variant, without touching every signature.
#[derive(Debug)]
pub enum CallError {
    /// Returned to the guest.
    Guest(WitError),
}

impl From<WitError> for CallError {
    fn from(e: WitError) -> Self {
        CallError::Guest(e)
    }
}

/// `HasData` marker projecting a store's data to its [`Invocation`].
struct Calls;

impl HasData for Calls {
    type Data<'a> = &'a mut Invocation;
}

/// Adds every natsfn interface to `linker`. `get` finds the invocation in the
/// store's data.
pub(crate) fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    get: fn(&mut T) -> &mut Invocation,
) -> wasmtime::Result<()> {
    Handler::add_to_linker::<T, Calls>(linker, get)
}
