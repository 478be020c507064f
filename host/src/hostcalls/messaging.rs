//! `natsfn:host/messaging`: core NATS publish and request, each checked
//! against the handler's `[permissions]` before anything reaches NATS.
//!
//! Each call is a child span of the invocation: `publish {subject}` (kind
//! producer) and `request {subject}` (kind client), and the message sent
//! carries that span's trace context, so the handler it reaches continues
//! the same trace.

use std::time::Duration;

use async_nats::client::{PublishErrorKind, RequestErrorKind};
use async_nats::jetstream::context::PublishErrorKind as PublishAckErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::Request;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

use super::{in_span, outgoing_headers, CallError, Invocation};
use crate::bindings::natsfn::host::messaging::Host;
use crate::bindings::{Message, WitError};
use crate::subject::Subject;
use crate::telemetry::key::*;
use crate::telemetry::Trace;
use crate::wire;

/// Which grant a subject is checked against.
#[derive(Clone, Copy)]
enum Verb {
    Publish,
    Request,
}

impl Invocation {
    /// Checks a send before anything reaches NATS: the subject parses, the
    /// handler's grant for `verb` covers it, the payload is within the
    /// tenant's ceiling and the tenant's send rate has room. A denial is
    /// logged with who asked and names the subject to the guest.
    fn permitted(&self, subject: String, verb: Verb, payload_len: usize) -> Result<Subject, WitError> {
        let subject = Subject::try_from(subject).map_err(|e| WitError::Invalid(format!("{e}")))?;
        let perms = &self.manifest.permissions;
        let (allowed, what) = match verb {
            Verb::Publish => (perms.may_publish(&subject), "publish"),
            Verb::Request => (perms.may_request(&subject), "request"),
        };
        if !allowed {
            return Err(self.deny(format!("{what} to {subject}"), subject.as_str()));
        }
        self.payload_fits(payload_len)?;
        if !self.tenant.may_send() {
            self.stats.rate_limited();
            return Err(WitError::Unavailable("rate limited".into()));
        }
        Ok(subject)
    }
}

impl Invocation {
    /// The span of a send: `publish {subject}` (producer) or
    /// `request {subject}` (client), a child of the invocation.
    fn message_span(
        &self,
        operation: &'static str,
        kind: SpanKind,
        subject: &str,
        body_size: usize,
        message_id: Option<&str>,
    ) -> Option<Trace> {
        let trace = self.trace.as_ref()?;
        let verb = if kind == SpanKind::Client { "request" } else { "publish" };
        let mut attributes = vec![
            KeyValue::new(MESSAGING_SYSTEM, "nats"),
            KeyValue::new(OPERATION_TYPE, "send"),
            KeyValue::new(OPERATION_NAME, operation),
            KeyValue::new(DESTINATION_NAME, subject.to_owned()),
            KeyValue::new(BODY_SIZE, body_size as i64),
        ];
        if let Some(id) = message_id {
            attributes.push(KeyValue::new(MESSAGE_ID, id.to_owned()));
        }
        Some(trace.child(format!("{verb} {subject}"), kind, attributes))
    }
}

impl Host for Invocation {
    async fn publish(
        &mut self,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
    ) -> Result<(), CallError> {
        let span = self.message_span("publish", SpanKind::Producer, &subject, payload.len(), None);
        in_span(span.as_ref(), self.publish_in(span.as_ref(), subject, headers, payload)).await
    }

    async fn request(
        &mut self,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<Message, CallError> {
        let span = self.message_span("request", SpanKind::Client, &subject, payload.len(), None);
        in_span(span.as_ref(), self.request_in(span.as_ref(), subject, headers, payload, timeout_ms)).await
    }

    async fn jetstream_publish(
        &mut self,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
        msg_id: Option<String>,
    ) -> Result<u64, CallError> {
        let span =
            self.message_span("jetstream.publish", SpanKind::Producer, &subject, payload.len(), msg_id.as_deref());
        in_span(span.as_ref(), self.jetstream_publish_in(span.as_ref(), subject, headers, payload, msg_id)).await
    }
}

impl Invocation {
    async fn publish_in(
        &mut self,
        span: Option<&Trace>,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
    ) -> Result<(), CallError> {
        let subject = self.permitted(subject, Verb::Publish, payload.len())?;
        let headers = outgoing_headers(span, headers)?;
        let subject = subject.into_string();
        let sent = match headers {
            Some(h) => self.tenant.nats.publish_with_headers(subject, h, payload.into()).await,
            None => self.tenant.nats.publish(subject, payload.into()).await,
        };
        sent.map_err(|e| match e.kind() {
            PublishErrorKind::MaxPayloadExceeded => WitError::TooLarge(self.tenant.nats.max_payload() as u64),
            PublishErrorKind::InvalidSubject => WitError::Invalid(e.to_string()),
            PublishErrorKind::Send => WitError::Unavailable(e.to_string()),
        })?;
        Ok(())
    }

    async fn request_in(
        &mut self,
        span: Option<&Trace>,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<Message, CallError> {
        let subject = self.permitted(subject, Verb::Request, payload.len())?;
        let headers = outgoing_headers(span, headers)?;
        // The guest's own timeout, but never past the invocation's deadline:
        // a request must not keep an instance alive after its time is up.
        let left = self.deadline.saturating_duration_since(tokio::time::Instant::now());
        let timeout = Duration::from_millis(timeout_ms.into()).min(left);
        if timeout.is_zero() {
            return Err(WitError::Timeout.into());
        }
        let mut request = Request::new().payload(payload.into()).timeout(Some(timeout));
        if let Some(h) = headers {
            request = request.headers(h);
        }
        let reply =
            self.tenant.nats.send_request(subject.into_string(), request).await.map_err(|e| match e.kind() {
                RequestErrorKind::TimedOut => WitError::Timeout,
                RequestErrorKind::NoResponders => WitError::NoResponders,
                RequestErrorKind::InvalidSubject => WitError::Invalid(e.to_string()),
                RequestErrorKind::MaxPayloadExceeded => WitError::TooLarge(self.tenant.nats.max_payload() as u64),
                _ => WitError::Unavailable(e.to_string()),
            })?;
        Ok(wire::message_to_wit(reply))
    }

    async fn jetstream_publish_in(
        &mut self,
        span: Option<&Trace>,
        subject: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
        msg_id: Option<String>,
    ) -> Result<u64, CallError> {
        let subject = self.permitted(subject, Verb::Publish, payload.len())?;
        let mut publish = PublishMessage::build().payload(payload.into());
        if let Some(h) = outgoing_headers(span, headers)? {
            publish = publish.headers(h);
        }
        if let Some(id) = msg_id {
            if id.is_empty() || id.contains(['\r', '\n']) {
                return Err(WitError::Invalid("msg-id must be non-empty and on one line".into()).into());
            }
            publish = publish.message_id(id);
        }
        let js = async_nats::jetstream::new(self.tenant.nats.clone());
        let stored = async { js.send_publish(subject.into_string(), publish).await?.await };
        // The stream's acknowledgement can take a while under load; never
        // past the invocation's deadline.
        let ack = tokio::time::timeout_at(self.deadline, stored).await.map_err(|_| WitError::Timeout)?.map_err(
            |e| match e.kind() {
                PublishAckErrorKind::StreamNotFound => WitError::NoResponders,
                PublishAckErrorKind::TimedOut => WitError::Timeout,
                PublishAckErrorKind::MaxPayloadExceeded => WitError::TooLarge(self.tenant.nats.max_payload() as u64),
                _ => WitError::Unavailable(e.to_string()),
            },
        )?;
        Ok(ack.sequence)
    }
}
