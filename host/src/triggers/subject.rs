//! Core NATS subscriptions, plain or in a queue group.
//!
//! Delivery is at-most-once, as core NATS is: when the handler is saturated,
//! this task stops reading, the client's subscription buffer fills, and the
//! server drops messages for this slow consumer rather than the host growing
//! without bound. On shutdown the subscription is drained: the server stops
//! sending, and what was already received is still handled.

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::TriggerError;
use crate::dispatch::{Delivery, Dispatcher, Lanes, Origin, SpareJob};
use crate::manifest::QueueGroup;
use crate::registry::HandlerSlot;
use crate::subject::SubjectPattern;

/// How often, in messages, the trigger checks the shutdown tokens even
/// though a message is ready: shutdown starts within this many messages
/// however fast they arrive.
const TOKEN_CHECK_EVERY: u32 = 64;

/// What the trigger loop does next.
enum Step {
    /// Handle this message (`None`: the subscription ended).
    Message(Option<async_nats::Message>),
    /// Shutdown began: drain the subscription, handle what it still holds.
    Drain,
    /// The shutdown deadline passed: start nothing more.
    Abandon,
}

pub(super) async fn bind(
    subject: &SubjectPattern,
    queue: Option<&QueueGroup>,
    slot: Arc<HandlerSlot>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, TriggerError> {
    // The tenant's connection: the server's account boundaries decide what
    // this subscription can see.
    let nats = slot.current().tenant.nats.clone();
    let subscribed = match queue {
        Some(q) => nats.queue_subscribe(subject.to_string(), q.to_string()).await,
        None => nats.subscribe(subject.to_string()).await,
    };
    let mut sub = subscribed.map_err(|source| TriggerError::Subscribe { subject: subject.to_string(), source })?;
    let label = subject.to_string();
    let origin = Arc::new(Origin::subject(label.clone(), queue.map(|q| q.to_string())));

    Ok(tokio::spawn(async move {
        let dispatcher = Arc::new(dispatcher);
        let lanes = Lanes::for_handler(&slot.current());
        let mut draining = false;
        let mut received: u32 = 0;
        let mut spare = SpareJob::default();
        loop {
            // Messages come first, so a ready message never pays for polling
            // the tokens (each poll of a cancellation future takes its
            // token's lock). Under a flood that keeps a message always ready
            // the tokens would then never be polled, so every so many
            // messages they are checked directly.
            received = received.wrapping_add(1);
            let check = received.is_multiple_of(TOKEN_CHECK_EVERY);
            let step = if check && dispatcher.abandon.is_cancelled() {
                Step::Abandon
            } else if check && !draining && shutdown.is_cancelled() {
                Step::Drain
            } else {
                tokio::select! {
                    biased;
                    m = sub.next() => Step::Message(m),
                    () = shutdown.cancelled(), if !draining => Step::Drain,
                    () = dispatcher.abandon.cancelled() => Step::Abandon,
                }
            };
            let next = match step {
                Step::Message(next) => next,
                Step::Abandon => break,
                Step::Drain => {
                    draining = true;
                    // A drain ends when the server confirms it; with no
                    // server nothing more can arrive, and it would only
                    // hold shutdown up until the deadline.
                    if nats.connection_state() != async_nats::connection::State::Connected {
                        break;
                    }
                    if let Err(e) = sub.drain().await {
                        tracing::warn!(subject = %label, "cannot drain subscription: {e}");
                        break;
                    }
                    continue;
                }
            };
            let Some(msg) = next else { break };
            // The version current when the message arrives handles it.
            let handler = slot.current();
            let admission = tokio::select! {
                // Permits first, for the same reason: when one is free the
                // token is not polled (the periodic check above covers it).
                biased;
                a = dispatcher.admit(&handler) => a,
                // Past the deadline nothing more is started.
                () = dispatcher.abandon.cancelled() => break,
            };
            let job = dispatcher.job(handler, origin.clone(), Delivery::Core(msg), admission);
            dispatcher.start(&lanes, job, &mut spare).await;
        }
        tracing::debug!(handler = %slot.current().manifest.name, subject = %label, "trigger stopped");
    }))
}
