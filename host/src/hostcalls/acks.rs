//! `natsfn:host/acks`: the guest's say over the JetStream message it is
//! handling.
//!
//! `ack` (confirmed by the server) and `in-progress` go out at once, because
//! a guest acks to say "done, whatever happens next" and signals progress to
//! keep a long job alive. `nak` and `term` are recorded and applied when
//! `handle` returns (see `settle`): a nak on the last allowed delivery and
//! every term must go through the dead-letter path first, which needs the
//! whole outcome.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::{Client, Subject};

use super::{CallError, Invocation};
use crate::bindings::natsfn::host::acks::Host;
use crate::bindings::WitError;

/// How long a confirmed ack waits for the server's answer (async-nats'
/// JetStream default).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// The JetStream message of an invocation and what has been decided for it.
pub(crate) struct JetStreamAck {
    /// Where acks go: the message's reply subject. `None` only for a
    /// message JetStream did not deliver, which cannot be acked.
    subject: Option<Subject>,
    pub(crate) decision: Decision,
    /// How many times the message has been delivered, this time included.
    pub(crate) delivered: u64,
}

impl JetStreamAck {
    /// An undecided message acked on `subject`.
    pub(crate) fn new(subject: Option<Subject>, delivered: u64) -> Self {
        JetStreamAck { subject, decision: Decision::Undecided, delivered }
    }

    /// Sends `kind` on `nats` without waiting for the server.
    pub(crate) async fn send(&self, nats: &Client, kind: AckKind) -> Result<(), async_nats::Error> {
        nats.publish(self.subject()?.clone(), kind.into()).await?;
        Ok(())
    }

    /// Sends `kind` on `nats` and waits until the server confirms it.
    pub(crate) async fn confirm(&self, nats: &Client, kind: AckKind) -> Result<(), async_nats::Error> {
        let request = async_nats::Request::new().payload(kind.into()).timeout(Some(CONFIRM_TIMEOUT));
        nats.send_request(self.subject()?.clone(), request).await?;
        Ok(())
    }

    fn subject(&self) -> Result<&Subject, async_nats::Error> {
        self.subject.as_ref().ok_or_else(|| "the message has no ack subject: JetStream did not deliver it".into())
    }
}

/// What the guest decided about its message, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nothing yet: the host settles by the outcome.
    Undecided,
    /// Acked (already sent).
    Acked,
    /// Deliver again, after this delay.
    Nak(Option<Duration>),
    /// Give up, for this reason.
    Term(Option<String>),
}

/// The invocation's message's ack state, if it is undecided and from
/// JetStream. A function of the field, not a method of the invocation, so
/// the tenant's connection can be borrowed beside it.
fn undecided<'a>(jetstream: &'a mut Option<JetStreamAck>, call: &str) -> Result<&'a mut JetStreamAck, WitError> {
    let js = jetstream
        .as_mut()
        .ok_or_else(|| WitError::Invalid(format!("{call}: the message being handled is not from JetStream")))?;
    match &js.decision {
        Decision::Undecided => Ok(js),
        done => Err(WitError::Invalid(format!("{call}: the message was already settled ({done:?})"))),
    }
}

fn unavailable(e: async_nats::Error) -> CallError {
    WitError::Unavailable(e.to_string()).into()
}

impl Host for Invocation {
    async fn ack(&mut self) -> Result<(), CallError> {
        let js = undecided(&mut self.jetstream, "ack")?;
        // Confirmed: a guest that acks before doing something irreversible
        // learns here if the ack did not land.
        js.confirm(&self.tenant.nats, AckKind::Ack).await.map_err(unavailable)?;
        js.decision = Decision::Acked;
        Ok(())
    }

    async fn nak(&mut self, delay_ms: Option<u32>) -> Result<(), CallError> {
        let js = undecided(&mut self.jetstream, "nak")?;
        js.decision = Decision::Nak(delay_ms.map(|ms| Duration::from_millis(ms.into())));
        Ok(())
    }

    async fn term(&mut self, reason: Option<String>) -> Result<(), CallError> {
        let js = undecided(&mut self.jetstream, "term")?;
        js.decision = Decision::Term(reason);
        Ok(())
    }

    async fn in_progress(&mut self) -> Result<(), CallError> {
        let js = undecided(&mut self.jetstream, "in-progress")?;
        js.send(&self.tenant.nats, AckKind::Progress).await.map_err(unavailable)?;
        Ok(())
    }
}
