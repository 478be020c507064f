//! The span of one invocation: `process {destination}`, kind consumer,
//! parented on the message's W3C trace context, with attributes from the
//! OpenTelemetry messaging semantic conventions (schema 1.42.0,
//! [`crate::telemetry::SEMCONV_SCHEMA_URL`]) and natsfn's own `natsfn.*`.
//!
//! The conventions make a link to the creation context the default for a
//! process span, and allow the parent/child relation for single-message
//! processing, which is what natsfn does: one message, one invocation, so a
//! chain of handlers reads as one tree in a trace viewer.
//!
//! Every trigger kind builds its span through [`InvocationSpan`], adding what
//! it knows (a queue group, JetStream delivery data), so attributes stay
//! consistent across kinds.

use async_nats::HeaderMap;
use opentelemetry::KeyValue;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::{LoadedHandler, Outcome};
use crate::bindings::HandlerError;
use crate::telemetry::{self, SPAN_TARGET};

/// Where a trigger's messages come from, kept once per binding so each
/// invocation borrows it instead of formatting it again.
#[derive(Debug)]
pub(crate) struct Origin {
    /// The subscription's subject pattern. Low-cardinality, so it, not the
    /// concrete subject, names the span.
    pub(crate) subscription: String,
    /// Whether the pattern has wildcards: then it is also the destination
    /// template.
    pub(crate) wildcard: bool,
    /// The queue group: `messaging.consumer.group.name`.
    pub(crate) group: Option<String>,
}

impl Origin {
    pub(crate) fn subject(subscription: String, group: Option<String>) -> Origin {
        let wildcard = subscription.split('.').any(|token| token == "*" || token == ">");
        Origin { subscription, wildcard, group }
    }
}

/// JetStream delivery data of a message, for the JetStream trigger.
#[derive(Debug, Clone, Copy)]
pub(crate) struct JetStreamMeta<'a> {
    /// The stream: it names the span (`process {stream}`).
    pub(crate) stream: &'a str,
    /// The durable consumer: the consumer group.
    pub(crate) consumer: &'a str,
    /// The message's sequence in the stream: `messaging.message.id`.
    pub(crate) stream_sequence: u64,
    /// How many times it has been delivered, this time included.
    pub(crate) delivered: u64,
}

/// Builds the span of one invocation.
pub(crate) struct InvocationSpan<'a> {
    handler: &'a LoadedHandler,
    subject: &'a str,
    origin: &'a Origin,
    body_size: usize,
    headers: Option<&'a HeaderMap>,
    jetstream: Option<JetStreamMeta<'a>>,
}

impl<'a> InvocationSpan<'a> {
    /// The span of `msg`, delivered by a core subscription.
    pub(crate) fn new(handler: &'a LoadedHandler, msg: &'a async_nats::Message, origin: &'a Origin) -> Self {
        InvocationSpan {
            handler,
            subject: msg.subject.as_str(),
            origin,
            body_size: msg.payload.len(),
            headers: msg.headers.as_ref(),
            jetstream: None,
        }
    }

    /// Adds JetStream delivery data: the span is then named after the
    /// stream, and the durable is the consumer group.
    pub(crate) fn jetstream(mut self, meta: JetStreamMeta<'a>) -> Self {
        self.jetstream = Some(meta);
        self
    }

    /// Creates the span and parents it on the message's trace context. With
    /// no subscriber interested in [`SPAN_TARGET`] this is a disabled span
    /// and nothing below the first line runs.
    pub(crate) fn start(self) -> tracing::Span {
        let manifest = &self.handler.manifest;
        let js = self.jetstream;
        let destination = js.map_or(self.origin.subscription.as_str(), |j| j.stream);
        let group = js.map(|j| j.consumer).or(self.origin.group.as_deref());
        let wildcard_pattern = self.origin.wildcard.then_some(self.origin.subscription.as_str());
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "process",
            otel.name = format!("process {destination}"),
            otel.kind = "consumer",
            otel.status_description = Empty,
            error.type = Empty,
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = self.subject,
            // Every attribute is encoded and shipped per message: the
            // subscription is only worth its bytes when it differs from the
            // subject, i.e. has wildcards.
            messaging.destination.subscription.name = wildcard_pattern,
            messaging.destination.template = wildcard_pattern,
            messaging.consumer.group.name = group,
            // Integers as i64: the OTel layer records u64 as text.
            messaging.message.body.size = self.body_size as i64,
            messaging.message.id = js.map(|j| j.stream_sequence.to_string()),
            natsfn.jetstream.stream = js.map(|j| j.stream),
            natsfn.jetstream.stream_sequence = js.map(|j| j.stream_sequence as i64),
            natsfn.jetstream.delivered = js.map(|j| j.delivered as i64),
            natsfn.handler = manifest.name.as_str(),
            natsfn.handler.version = self.handler.compiled.digest.as_str(),
            natsfn.tenant = manifest.tenant.as_str(),
            natsfn.outcome = Empty,
        );
        if !span.is_disabled() {
            telemetry::adopt_parent(&span, self.headers);
        }
        span
    }
}

/// Records how the invocation ended, unless it simply succeeded (the common
/// case costs nothing more): `natsfn.outcome`; error status, `error.type`
/// and the message for a failure, trap, timeout or limit; and an
/// `exception` event carrying a trap's reason.
pub(crate) fn record_outcome(span: &tracing::Span, handler: &LoadedHandler, outcome: &Outcome) {
    if span.is_disabled() {
        return;
    }
    let limits = &handler.manifest.limits;
    let (kind, error) = match outcome {
        Outcome::Ok => return,
        // Not an error of this invocation: the handler asked to be run
        // again (JetStream naks; core NATS cannot redeliver, dispatch logs).
        Outcome::Failed(HandlerError::Retry(_)) => ("retry", None),
        Outcome::Failed(HandlerError::Fail(why)) => ("fail", Some(format!("handler failed: {why}"))),
        Outcome::Trapped(why) => {
            exception(span, "trap", why.clone());
            ("trap", Some(format!("handler trapped: {why}")))
        }
        Outcome::MemoryLimit => {
            let why = format!("handler trapped after reaching its memory limit of {} MiB", limits.memory_bytes >> 20);
            exception(span, "memory_limit", why.clone());
            ("memory_limit", Some(why))
        }
        Outcome::TimedOut => {
            ("timeout", Some(format!("handler stopped at its deadline of {} ms", limits.timeout.as_millis())))
        }
        Outcome::OutOfFuel => {
            ("out_of_fuel", Some(format!("handler ran out of its fuel of {}", limits.fuel.unwrap_or(u64::MAX))))
        }
    };
    span.record("natsfn.outcome", kind);
    if let Some(error) = error {
        span.record("error.type", kind);
        // The description alone makes the status an error.
        span.record("otel.status_description", error.as_str());
    }
}

/// Adds an `exception` event (semantic conventions for exceptions) to the
/// OpenTelemetry span behind `span`.
fn exception(span: &tracing::Span, kind: &'static str, message: String) {
    span.add_event(
        "exception",
        vec![KeyValue::new("exception.type", kind), KeyValue::new("exception.message", message)],
    );
}

/// Records that the invocation was cut off at the shutdown deadline.
pub(crate) fn record_abandoned(span: &tracing::Span) {
    if span.is_disabled() {
        return;
    }
    span.record("natsfn.outcome", "abandoned");
    span.record("error.type", "abandoned");
    span.record("otel.status_description", "invocation abandoned: still running at the shutdown deadline");
}
