//! The pull protocol of one durable consumer: one inbox subscription for the
//! consumer's whole life, pull requests sent on it as permits free up, and
//! the server's status messages turned into accounting.
//!
//! async-nats offers two shapes, and neither fits. `batch()` subscribes a new
//! inbox for every pull and unsubscribes it after, so one pull is open at a
//! time and a pull's round trip under load (~0.4 ms) bounds throughput; and
//! it stops listening for messages after an idle heartbeat (a message
//! published then waited until the pull expired, seconds later).
//! `stream()` keeps one inbox but pulls on its own schedule, so messages
//! would sit in the client's buffer with their ack-wait running while the
//! handler has no free slot.
//! Here every message asked for is backed by a permit, taken before the pull
//! is sent, and several pulls may be open at once, so the next one is on its
//! way while the messages of the last are still being handled.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, consumer::pull::BatchRequestError};
use async_nats::{Statistics, StatusCode, Subject, Subscriber};
use futures::StreamExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

use super::super::TriggerError;
use crate::dispatch::JetStreamDelivery;

/// How long one pull stays open waiting for messages. Short enough that a
/// lost pull is replaced quickly, long enough that an idle consumer costs
/// next to nothing.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Server heartbeats while a pull is open, to notice a dead connection.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// Silence on the inbox, while pulls are open, after which they are taken
/// for lost: two missed heartbeats and a margin (judged at each check, so
/// up to [`CHECK_EVERY`] later).
const SILENCE: Duration = Duration::from_secs(5);

/// How often open pulls are checked for silence and for a reconnect. The
/// server forgets a connection's pulls when it drops, and a reconnect does
/// not bring them back, so pulling again at once saves up to [`SILENCE`].
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How the server ends pulls on a consumer that was deleted.
const CONSUMER_DELETED: &str = "Consumer Deleted";

/// What a pull request's end tells about the messages it will not deliver.
const PENDING_MESSAGES: &str = "Nats-Pending-Messages";

/// Why the pulls that were open are gone.
#[derive(Debug)]
pub(super) enum Interruption {
    /// The client reconnected: the server has forgotten the pulls. Pull
    /// again at once.
    Reconnected,
    /// Nothing, not even a heartbeat, arrived for [`SILENCE`]: the
    /// connection is in trouble or the server lost the pulls. Pull again
    /// at once.
    Silence,
    /// The consumer is not there: the server says it was deleted, or
    /// nothing answers pulls for it. Pulling again needs it made again.
    Gone(String),
    /// The server ended or refused the pulls (a request over the
    /// consumer's limits, a leader change, ...). Pulling again at once would
    /// likely be refused again.
    Refused(String),
    /// The inbox subscription ended: the client is closed.
    Closed,
}

/// What arrives on the inbox that the trigger must act on.
pub(super) enum Event {
    /// A message, with the permit reserved for it when it was asked for.
    /// `None` when the accounting had written its pull off (after an
    /// interruption a pull the server still held can deliver): the trigger
    /// must then take a permit as for any other message.
    Message(Box<JetStreamDelivery>, Option<OwnedSemaphorePermit>),
    /// A pull ended without delivering all it asked for (it expired), and
    /// the permits of what it will not deliver were released: there may
    /// be room to pull again.
    Expired,
    /// The open pulls are gone and their permits released.
    Interrupted(Interruption),
}

/// One consumer's inbox and the pulls open on it.
pub(super) struct Pulls {
    consumer: PullConsumer,
    context: jetstream::Context,
    inbox: Subject,
    subscriber: Subscriber,
    /// One permit per message asked for and not yet delivered, refused or
    /// expired. Its length is what the server still owes.
    owed: Vec<OwnedSemaphorePermit>,
    /// When the inbox was last found to have heard from the server, as of
    /// the latest check (or the first open pull).
    heard: Instant,
    /// Whether anything arrived since the latest check. A flag, not a clock
    /// read per message: silence is only judged once a check comes round.
    heard_since_check: bool,
    /// The client's counters, for its connection count.
    stats: Arc<Statistics>,
    /// The connection count when the open pulls were sent.
    connects: u64,
    /// Fires every [`CHECK_EVERY`] while pulls are open; moved only when it
    /// fires, so a busy inbox costs no timer updates.
    check: Pin<Box<Sleep>>,
}

impl Pulls {
    /// Subscribes a fresh inbox for `consumer`'s pulls.
    pub(super) async fn open(consumer: PullConsumer, context: jetstream::Context) -> Result<Self, TriggerError> {
        let client = context.client();
        let inbox = Subject::from(client.new_inbox());
        let subscriber = client
            .subscribe(inbox.clone())
            .await
            .map_err(|source| TriggerError::Subscribe { subject: inbox.to_string(), source })?;
        Ok(Pulls {
            consumer,
            context,
            inbox,
            subscriber,
            owed: Vec::new(),
            heard: Instant::now(),
            heard_since_check: false,
            stats: client.statistics(),
            connects: 0,
            check: Box::pin(tokio::time::sleep(CHECK_EVERY)),
        })
    }

    /// Subscribes a fresh inbox in place of one that closed. Pulls sent on
    /// the old one are written off.
    pub(super) async fn reopen(&mut self) -> Result<(), TriggerError> {
        let fresh = Pulls::open(self.consumer.clone(), self.context.clone()).await?;
        *self = fresh;
        Ok(())
    }

    /// How many messages the open pulls still owe.
    pub(super) fn owed(&self) -> usize {
        self.owed.len()
    }

    /// Asks for one message per permit. On failure the permits are
    /// released: nothing was asked for.
    pub(super) async fn request(&mut self, permits: Vec<OwnedSemaphorePermit>) -> Result<(), BatchRequestError> {
        let batch = BatchConfig {
            batch: permits.len(),
            expires: Some(PULL_EXPIRES),
            idle_heartbeat: PULL_HEARTBEAT,
            ..Default::default()
        };
        self.consumer.request_batch(batch, self.inbox.clone()).await?;
        if self.owed.is_empty() {
            // Silence is measured from the first open pull, not from
            // whatever the inbox heard before it, and a reconnect counts
            // only if it comes after.
            self.heard = Instant::now();
            self.heard_since_check = false;
            self.connects = self.connects_so_far();
        }
        self.owed.extend(permits);
        Ok(())
    }

    /// The next message, or the end of open pulls. Heartbeats are taken
    /// here and not returned. Cancel-safe: state changes only once something
    /// has arrived.
    pub(super) async fn next(&mut self) -> Event {
        loop {
            let listening = !self.owed.is_empty();
            let arrived = tokio::select! {
                biased;
                m = self.subscriber.next() => m,
                () = self.check.as_mut(), if listening => {
                    let now = Instant::now();
                    self.check.as_mut().reset(now + CHECK_EVERY);
                    if std::mem::take(&mut self.heard_since_check) {
                        self.heard = now;
                    }
                    let interruption = if self.connects_so_far() != self.connects {
                        Interruption::Reconnected
                    } else if now.duration_since(self.heard) >= SILENCE {
                        Interruption::Silence
                    } else {
                        continue;
                    };
                    self.owed.clear();
                    return Event::Interrupted(interruption);
                }
            };
            let Some(message) = arrived else {
                self.owed.clear();
                return Event::Interrupted(Interruption::Closed);
            };
            self.heard_since_check = true;
            match message.status {
                None | Some(StatusCode::OK) => {
                    let permit = self.owed.pop();
                    return Event::Message(JetStreamDelivery::new(message), permit);
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(status) => return self.ended(status, &message),
            }
        }
    }

    /// How many times the client has connected, the first time included.
    fn connects_so_far(&self) -> u64 {
        self.stats.connects.load(Ordering::Relaxed)
    }

    /// Accounts for a pull the server ended with `status`: only the
    /// permits of what an expired pull will not deliver are released, or
    /// every permit when which pulls the status ends is unknown.
    fn ended(&mut self, status: StatusCode, message: &async_nats::Message) -> Event {
        let undelivered = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(PENDING_MESSAGES))
            .and_then(|value| value.as_str().parse::<usize>().ok());
        match ending(status, message.description.as_deref().unwrap_or_default(), undelivered) {
            Ending::Expired(n) => {
                self.owed.truncate(self.owed.len().saturating_sub(n));
                Event::Expired
            }
            Ending::Interrupted(interruption) => {
                self.owed.clear();
                Event::Interrupted(interruption)
            }
        }
    }
}

/// What a status message on the inbox means for the open pulls.
#[derive(Debug)]
enum Ending {
    /// One pull ended normally (expired) and will not deliver this many.
    Expired(usize),
    /// The open pulls are all gone.
    Interrupted(Interruption),
}

/// Reads a status the server sent instead of a message. A pull that expires
/// (408) or ends early (409 with the pending count) says how many messages
/// it will not deliver; without that count, which pulls ended is unknown.
fn ending(status: StatusCode, description: &str, undelivered: Option<usize>) -> Ending {
    let normal_end = status == StatusCode::TIMEOUT || status == StatusCode::REQUEST_TERMINATED;
    match undelivered {
        Some(n) if normal_end && !refusal(description) => Ending::Expired(n),
        _ => {
            let why = format!("{} {description}", status.as_u16()).trim_end().to_string();
            let gone = status == StatusCode::NO_RESPONDERS || description == CONSUMER_DELETED;
            Ending::Interrupted(if gone { Interruption::Gone(why) } else { Interruption::Refused(why) })
        }
    }
}

/// Terminations that are not the normal end of a pull and would be repeated
/// for the next one.
fn refusal(description: &str) -> bool {
    description == CONSUMER_DELETED || description == "Consumer is push based" || description.starts_with("Exceeded")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(n: u16) -> StatusCode {
        StatusCode::from_u16(n).unwrap()
    }

    #[test]
    fn an_expired_pull_releases_only_what_it_will_not_deliver() {
        assert!(matches!(ending(code(408), "Request Timeout", Some(12)), Ending::Expired(12)));
        assert!(matches!(ending(code(409), "Batch Completed", Some(3)), Ending::Expired(3)));
    }

    #[test]
    fn a_deleted_or_unanswered_consumer_is_gone() {
        let deleted = ending(code(409), "Consumer Deleted", None);
        assert!(matches!(&deleted, Ending::Interrupted(Interruption::Gone(why)) if why == "409 Consumer Deleted"));
        assert!(matches!(ending(code(503), "", None), Ending::Interrupted(Interruption::Gone(why)) if why == "503"));
    }

    #[test]
    fn refusals_and_unknown_ends_interrupt_every_pull() {
        // A refusal ends the stream of pulls even if it carries a count.
        let limit = ending(code(409), "Exceeded MaxRequestBatch of 10", Some(5));
        assert!(matches!(limit, Ending::Interrupted(Interruption::Refused(why)) if why.contains("MaxRequestBatch")));
        // Without a count there is no knowing which pull ended.
        assert!(matches!(ending(code(409), "Leadership Change", None), Ending::Interrupted(Interruption::Refused(_))));
        assert!(matches!(ending(code(408), "Request Timeout", None), Ending::Interrupted(Interruption::Refused(_))));
        assert!(matches!(ending(code(400), "Bad Request", None), Ending::Interrupted(Interruption::Refused(_))));
    }
}
