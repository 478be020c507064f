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
//! consistent across kinds. What is the same for every message of a binding
//! or a handler ([`Origin`], [`HandlerValues`]) is made once and shared.

use async_nats::HeaderMap;
use opentelemetry::trace::SpanKind;
use opentelemetry::{KeyValue, StringValue, Value};

use super::{LoadedHandler, Outcome};
use crate::bindings::HandlerError;
use crate::manifest::Manifest;
use crate::telemetry::key::*;
use crate::telemetry::{self, Trace, Tracer};

/// Where a trigger's messages come from, kept once per binding so each
/// invocation shares it instead of formatting it again.
#[derive(Debug)]
pub(crate) struct Origin {
    /// `process {subscription}`: the pattern, not the concrete subject,
    /// names the span, to keep span names low-cardinality.
    name: String,
    /// The subscription's subject pattern when it has wildcards: then it is
    /// also the destination template. Without wildcards it would only
    /// repeat the subject, and every attribute is shipped per message.
    wildcard_pattern: Option<StringValue>,
    /// The queue group or the durable: `messaging.consumer.group.name`.
    group: Option<StringValue>,
    /// The stream, for a JetStream binding.
    stream: Option<StringValue>,
}

impl Origin {
    /// A core subscription to `subscription`, in queue `group` if any.
    pub(crate) fn subject(subscription: String, group: Option<String>) -> Origin {
        Origin::named(format!("process {subscription}"), subscription, group, None)
    }

    /// A JetStream consumer `durable` on `stream`, filtered by
    /// `subscription`: the span is named after the stream.
    pub(crate) fn jetstream(stream: &str, subscription: String, durable: &str) -> Origin {
        Origin::named(format!("process {stream}"), subscription, Some(durable.to_owned()), Some(stream))
    }

    fn named(name: String, subscription: String, group: Option<String>, stream: Option<&str>) -> Origin {
        let wildcard = subscription.split('.').any(|token| token == "*" || token == ">");
        Origin {
            name,
            wildcard_pattern: wildcard.then(|| StringValue::from(subscription)),
            group: group.map(StringValue::from),
            stream: stream.map(|s| StringValue::from(s.to_owned())),
        }
    }
}

/// The attribute values every invocation span of one handler version
/// carries, made when it loads: cloning one is a reference count.
pub(crate) struct HandlerValues {
    handler: StringValue,
    version: StringValue,
    tenant: StringValue,
}

impl HandlerValues {
    pub(crate) fn new(manifest: &Manifest, digest: &str) -> Self {
        let shared = |s: &str| StringValue::from(std::sync::Arc::<str>::from(s));
        HandlerValues {
            handler: shared(manifest.name.as_str()),
            version: shared(digest),
            tenant: shared(manifest.tenant.as_str()),
        }
    }
}

/// JetStream delivery data of a message (the stream and the durable are
/// the binding's, in [`Origin`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct JetStreamMeta {
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
    jetstream: Option<JetStreamMeta>,
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

    /// Adds JetStream delivery data.
    pub(crate) fn jetstream(mut self, meta: JetStreamMeta) -> Self {
        self.jetstream = Some(meta);
        self
    }

    /// Starts the span, parented on the message's trace context.
    pub(crate) fn start(self, tracer: &Tracer) -> Trace {
        let values = &self.handler.span_values;
        let mut attributes = Vec::with_capacity(16);
        attributes.extend([
            KeyValue::new(MESSAGING_SYSTEM, "nats"),
            KeyValue::new(OPERATION_TYPE, "process"),
            KeyValue::new(OPERATION_NAME, "process"),
            KeyValue::new(DESTINATION_NAME, self.subject.to_owned()),
            // Integers as i64: OTLP has no unsigned integers.
            KeyValue::new(BODY_SIZE, self.body_size as i64),
            KeyValue::new(HANDLER, Value::String(values.handler.clone())),
            KeyValue::new(HANDLER_VERSION, Value::String(values.version.clone())),
            KeyValue::new(TENANT, Value::String(values.tenant.clone())),
        ]);
        let origin = self.origin;
        if let Some(pattern) = &origin.wildcard_pattern {
            attributes.push(KeyValue::new(SUBSCRIPTION_NAME, Value::String(pattern.clone())));
            attributes.push(KeyValue::new(DESTINATION_TEMPLATE, Value::String(pattern.clone())));
        }
        if let Some(group) = &origin.group {
            attributes.push(KeyValue::new(CONSUMER_GROUP, Value::String(group.clone())));
        }
        if let Some(stream) = &origin.stream {
            attributes.push(KeyValue::new(JS_STREAM, Value::String(stream.clone())));
        }
        if let Some(js) = self.jetstream {
            attributes.extend([
                KeyValue::new(MESSAGE_ID, js.stream_sequence.to_string()),
                KeyValue::new(JS_SEQUENCE, js.stream_sequence as i64),
                KeyValue::new(JS_DELIVERED, js.delivered as i64),
            ]);
        }
        tracer.start(origin.name.clone(), SpanKind::Consumer, attributes, &telemetry::parent_context(self.headers))
    }
}

/// Records how the invocation ended, unless it simply succeeded (the common
/// case costs nothing more): `natsfn.outcome`; error status, `error.type`
/// and the message for a failure, trap, timeout or limit; and an
/// `exception` event carrying a trap's reason.
pub(crate) fn record_outcome(trace: &Trace, handler: &LoadedHandler, outcome: &Outcome) {
    let limits = &handler.manifest.limits;
    let (kind, error) = match outcome {
        Outcome::Ok => return,
        // Not an error of this invocation: the handler asked to be run
        // again (JetStream naks; core NATS cannot redeliver, dispatch logs).
        Outcome::Failed(HandlerError::Retry(_)) => ("retry", None),
        Outcome::Failed(HandlerError::Fail(why)) => ("fail", Some(format!("handler failed: {why}"))),
        Outcome::Trapped(why) => {
            exception(trace, "trap", why.clone());
            ("trap", Some(format!("handler trapped: {why}")))
        }
        Outcome::MemoryLimit => {
            let why = format!("handler trapped after reaching its memory limit of {} MiB", limits.memory_bytes >> 20);
            exception(trace, "memory_limit", why.clone());
            ("memory_limit", Some(why))
        }
        Outcome::TimedOut => {
            ("timeout", Some(format!("handler stopped at its deadline of {} ms", limits.timeout.as_millis())))
        }
        Outcome::OutOfFuel => {
            ("out_of_fuel", Some(format!("handler ran out of its fuel of {}", limits.fuel.unwrap_or(u64::MAX))))
        }
    };
    trace.set(KeyValue::new(OUTCOME, kind));
    if let Some(error) = error {
        trace.fail(kind, error);
    }
}

/// Adds an `exception` event (semantic conventions for exceptions).
fn exception(trace: &Trace, kind: &'static str, message: String) {
    trace.event("exception", vec![KeyValue::new(EXCEPTION_TYPE, kind), KeyValue::new(EXCEPTION_MESSAGE, message)]);
}

/// Records that the invocation was cut off at the shutdown deadline.
pub(crate) fn record_abandoned(trace: &Trace) {
    trace.set(KeyValue::new(OUTCOME, "abandoned"));
    trace.fail("abandoned", "invocation abandoned: still running at the shutdown deadline");
}
