//! Settling a JetStream message after its invocation: the outcome policy and
//! the dead-letter path.
//!
//! The rules (also in the README's "Manifest reference"):
//! - the guest acked → nothing more; the ack stands whatever happened after;
//! - success, not acked → ack;
//! - `retry(delay)` or a guest `nak` → nak with that delay, unless this was the
//!   last allowed delivery, in which case the message is given up;
//! - `fail`, trap, timeout or memory limit → given up (`on_error = "term"`,
//!   the default) or nak'ed like a retry (`on_error = "nak"`);
//! - a guest `term` → given up.
//!
//! Giving up means: publish the message to the trigger's dead-letter subject
//! (original headers plus `Natsfn-*` headers saying where it came from and
//! why), then term it. Nothing is termed silently: without a dead-letter
//! subject the give-up is logged with stream and sequence. If the
//! dead-letter publish itself fails, the message is nak'ed instead of termed,
//! so it stays in the stream.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::HeaderMap;

use crate::bindings::HandlerError;
use crate::dispatch::{Outcome, Stats};
use crate::hostcalls::{Decision, JetStreamAck};
use crate::manifest::{JetStreamTrigger, Manifest, OnError};
use crate::wire::Received;

/// Header names added to a dead-lettered message.
pub mod headers {
    /// The stream the message was consumed from.
    pub const STREAM: &str = "Natsfn-Stream";
    /// Its sequence in that stream.
    pub const SEQUENCE: &str = "Natsfn-Stream-Sequence";
    /// The durable consumer that delivered it.
    pub const CONSUMER: &str = "Natsfn-Consumer";
    /// The subject it was stored under.
    pub const SUBJECT: &str = "Natsfn-Subject";
    /// The handler that gave up on it.
    pub const HANDLER: &str = "Natsfn-Handler";
    /// How many times it was delivered.
    pub const DELIVERED: &str = "Natsfn-Delivered";
    /// Why it was given up.
    pub const ERROR: &str = "Natsfn-Error";
}

/// When a dead-letter publish fails, the message is nak'ed with this delay
/// so the stream keeps it and the retry does not spin.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// Applies `outcome` (and whatever the guest decided) to the message.
pub(crate) async fn settle(
    js: JetStreamAck,
    received: &Received,
    trigger: &JetStreamTrigger,
    outcome: &Outcome,
    manifest: &Manifest,
    nats: &async_nats::Client,
    stats: &Stats,
) {
    let delivered = i64::try_from(js.delivered).unwrap_or(i64::MAX);
    let last_delivery = delivered >= i64::from(trigger.max_deliver);
    let retry = |delay: Option<Duration>, why: String| {
        if last_delivery {
            Action::GiveUp(format!("gave up after {delivered} deliveries: {why}"))
        } else {
            Action::Nak(delay)
        }
    };
    let action = match (&js.decision, outcome) {
        (Decision::Acked, _) => return,
        (Decision::Term(reason), _) => Action::GiveUp(reason.clone().unwrap_or_else(|| "termed by the handler".into())),
        (Decision::Nak(delay), _) => retry(*delay, "nak'ed by the handler".into()),
        (Decision::Undecided, Outcome::Ok) => Action::Ack,
        (Decision::Undecided, Outcome::Failed(HandlerError::Retry(ms))) => {
            retry(ms.map(|ms| Duration::from_millis(ms.into())), "handler asked for a retry".into())
        }
        (Decision::Undecided, failure) => {
            let why = describe_failure(failure, manifest);
            match trigger.on_error {
                OnError::Term => Action::GiveUp(why),
                OnError::Nak => retry(None, why),
            }
        }
    };

    let sent = match action {
        // A success ack is not confirmed: waiting for the server's reply to
        // every ack halved throughput (one round trip per message), and an
        // ack lost with the connection only means a redelivery, which
        // at-least-once allows. Shutdown flushes the connection, so no ack
        // is left in the client's buffer. Naks and give-ups are rare and
        // stay confirmed: a give-up must know the term happened.
        Action::Ack => js.send(nats, AckKind::Ack).await.map(|()| stats.acked()),
        Action::Nak(delay) => js.confirm(nats, AckKind::Nak(delay)).await.map(|()| stats.naked()),
        Action::GiveUp(why) => give_up(&js, received, trigger, manifest, nats, &why, stats).await,
    };
    if let Err(e) = sent {
        // The server redelivers after ack_wait: at-least-once still holds.
        tracing::warn!(handler = %manifest.name, tenant = %manifest.tenant, stream = %trigger.stream,
            "cannot settle message, it will be redelivered: {e}");
    }
}

enum Action {
    Ack,
    Nak(Option<Duration>),
    GiveUp(String),
}

fn describe_failure(outcome: &Outcome, manifest: &Manifest) -> String {
    match outcome {
        Outcome::Ok => "succeeded".into(),
        Outcome::Failed(HandlerError::Fail(why)) => format!("handler failed: {why}"),
        Outcome::Failed(HandlerError::Retry(_)) => "handler asked for a retry".into(),
        Outcome::Trapped(why) => format!("handler trapped: {}", first_line(why)),
        Outcome::MemoryLimit => format!("handler hit its memory limit of {} MiB", manifest.limits.memory_bytes >> 20),
        Outcome::TimedOut => format!("handler timed out after {} ms", manifest.limits.timeout.as_millis()),
        Outcome::OutOfFuel => format!("handler ran out of its fuel of {}", manifest.limits.fuel.unwrap_or(u64::MAX)),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Dead-letters (if configured) and terms the message; naks it instead when
/// the dead letter cannot be stored, so nothing is lost.
async fn give_up(
    js: &JetStreamAck,
    received: &Received,
    trigger: &JetStreamTrigger,
    manifest: &Manifest,
    nats: &async_nats::Client,
    why: &str,
    stats: &Stats,
) -> Result<(), async_nats::Error> {
    let delivered = js.delivered;
    let (ack, info) = received.delivery().ok_or("the ack subject carries no delivery data")?;
    let (stream, sequence) = (info.stream(ack), info.stream_sequence);
    let Some(dlq) = &trigger.dead_letter else {
        tracing::error!(handler = %manifest.name, tenant = %manifest.tenant, %stream, sequence, delivered,
            "message terminated (no dead_letter subject configured): {why}");
        js.confirm(nats, AckKind::Term).await?;
        stats.termed();
        return Ok(());
    };

    let mut headers = received.headers.clone().unwrap_or_default();
    // Header values must stay on one line.
    let why_line: String = why.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
    headers.insert(headers::STREAM, stream);
    headers.insert(headers::SEQUENCE, sequence.to_string().as_str());
    headers.insert(headers::CONSUMER, trigger.durable.as_str());
    headers.insert(headers::SUBJECT, received.subject.as_str());
    headers.insert(headers::HANDLER, manifest.name.as_str());
    headers.insert(headers::DELIVERED, delivered.to_string().as_str());
    headers.insert(headers::ERROR, why_line.as_str());

    match dead_letter(nats, dlq.as_str(), headers, received.payload.clone()).await {
        Ok(()) => {
            tracing::warn!(handler = %manifest.name, tenant = %manifest.tenant, %stream, sequence, delivered,
                dead_letter = %dlq, "message dead-lettered: {why}");
            js.confirm(nats, AckKind::Term).await?;
            stats.dead_lettered();
            Ok(())
        }
        Err(e) => {
            tracing::error!(handler = %manifest.name, tenant = %manifest.tenant, %stream, sequence,
                dead_letter = %dlq, "cannot dead-letter message, keeping it in the stream: {e}");
            js.confirm(nats, AckKind::Nak(Some(DEAD_LETTER_RETRY))).await?;
            stats.naked();
            Ok(())
        }
    }
}

/// Stores the dead letter in whatever stream captures `subject` and waits
/// for its ack. When no stream does, it is published on core NATS for any
/// subscriber, with a warning: the operator chose a subject nothing stores.
async fn dead_letter(
    nats: &async_nats::Client,
    subject: &str,
    headers: HeaderMap,
    payload: bytes::Bytes,
) -> Result<(), async_nats::Error> {
    let js = async_nats::jetstream::new(nats.clone());
    let stored = async { js.publish_with_headers(subject.to_owned(), headers.clone(), payload.clone()).await?.await };
    match stored.await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == async_nats::jetstream::context::PublishErrorKind::StreamNotFound => {
            tracing::warn!(
                dead_letter = subject,
                "no stream stores the dead-letter subject; publishing it on core NATS only"
            );
            nats.publish_with_headers(subject.to_owned(), headers, payload).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
