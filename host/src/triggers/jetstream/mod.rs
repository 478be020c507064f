//! Durable JetStream pull consumers: at-least-once delivery that survives
//! host crashes and restarts.
//!
//! The host creates or updates the durable consumer to match the manifest
//! (the stream itself only when the host may create streams), then pulls;
//! should the consumer be deleted while the host runs, it is made again.
//! Flow control is by permits: each pull asks for exactly as many messages
//! as the handler has free concurrency slots (at most `batch`, and at most
//! the trigger's share of the slots, see `window`), so nothing sits in a
//! buffer with its ack-wait clock running, and the server never has more
//! than `max_concurrency` of this host's messages unacknowledged.
//! Under load a pull waits for a quarter of a batch of free slots, and
//! several pulls are open at once, so their round trips overlap the work on
//! the messages already delivered. A pull stays open until it is filled or
//! expires, so messages published to an idle consumer are delivered the
//! moment they arrive. The pulls' protocol (one inbox, status messages, lost
//! pulls) is in `pulls`.
//!
//! Settling (ack, nak, term, dead letter) happens in `settle` once the
//! invocation ends, before the invocation gives its slot back. A success ack
//! is sent without waiting for the server; naks and give-ups wait for its
//! confirmation. Invocations never wait on each other's settlements.

mod pulls;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, stream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use self::pulls::{Event, Interruption, Pulls};
use super::TriggerError;
use crate::dispatch::{Admission, Delivery, Dispatcher, Lanes, LoadedHandler, Origin, SpareJob};
use crate::manifest::{DeliverFrom, JetStreamTrigger};
use crate::registry::HandlerSlot;

/// Pause after a failed pull, doubling up to the maximum, so a server
/// restart is ridden out without spinning.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

pub(super) async fn bind(
    trigger: &JetStreamTrigger,
    create_streams: bool,
    slot: Arc<HandlerSlot>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, TriggerError> {
    // The tenant's connection: the stream must be in the tenant's account.
    let js = jetstream::new(slot.current().tenant.nats.clone());
    // A KV bucket's stream is the bucket: it is created as a bucket (host
    // config), never as a plain stream.
    let stream = open_stream(&js, trigger, create_streams && trigger.kv.is_none()).await?;
    let durable = Durable { stream, config: consumer_config(trigger)? };
    let consumer: PullConsumer = durable.make().await.map_err(|source| TriggerError::Consumer {
        stream: trigger.stream.to_string(),
        durable: trigger.durable.to_string(),
        source,
    })?;
    // Spans name JetStream invocations after the stream; the filter is the
    // subscription, and the durable the consumer group.
    let subscription = trigger.filters.first().map_or_else(|| trigger.stream.to_string(), ToString::to_string);
    let origin = Arc::new(Origin::jetstream(trigger.stream.as_str(), subscription, trigger.durable.as_str()));
    let pulls = Pulls::open(consumer, js).await?;
    let trigger = Arc::new(trigger.clone());
    Ok(tokio::spawn(pull_loop(pulls, durable, trigger, origin, slot, dispatcher, shutdown)))
}

/// The durable consumer as the manifest describes it, kept so that it can
/// be made again if it is deleted while the host runs.
struct Durable {
    stream: stream::Stream,
    config: pull::Config,
}

impl Durable {
    /// Creates the consumer, or updates it to match.
    async fn make(&self) -> Result<PullConsumer, stream::ConsumerError> {
        self.stream.create_consumer(self.config.clone()).await
    }
}

async fn open_stream(
    js: &jetstream::Context,
    t: &JetStreamTrigger,
    create: bool,
) -> Result<stream::Stream, TriggerError> {
    let name = t.stream.to_string();
    match js.get_stream(&name).await {
        Ok(s) => Ok(s),
        Err(source) if !create => Err(TriggerError::MissingStream { stream: name, source }),
        Err(_) => {
            if t.filters.is_empty() {
                return Err(TriggerError::CreateStream {
                    stream: name,
                    reason: "the trigger has no `filter` to take the stream's subjects from".into(),
                });
            }
            let config = stream::Config {
                name: name.clone(),
                subjects: t.filters.iter().map(ToString::to_string).collect(),
                storage: stream::StorageType::File,
                ..Default::default()
            };
            tracing::info!(stream = %name, subjects = ?config.subjects, "creating stream");
            js.get_or_create_stream(config)
                .await
                .map_err(|e| TriggerError::CreateStream { stream: name, reason: e.to_string() })
        }
    }
}

fn consumer_config(t: &JetStreamTrigger) -> Result<pull::Config, TriggerError> {
    let deliver_policy = match &t.deliver {
        DeliverFrom::All => DeliverPolicy::All,
        DeliverFrom::New => DeliverPolicy::New,
        DeliverFrom::LastPerSubject => DeliverPolicy::LastPerSubject,
        DeliverFrom::Sequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence: *start_sequence },
        DeliverFrom::Time(text) => DeliverPolicy::ByStartTime {
            // Validated with the manifest; parsed again here to keep the
            // manifest free of client types.
            start_time: async_nats::datetime::parse_rfc3339(text).map_err(|e| TriggerError::CreateStream {
                stream: t.stream.to_string(),
                reason: format!("start_time: {e}"),
            })?,
        },
    };
    let mut filters: Vec<String> = t.filters.iter().map(ToString::to_string).collect();
    let (filter_subject, filter_subjects) =
        if filters.len() == 1 { (filters.remove(0), Vec::new()) } else { (String::new(), filters) };
    Ok(pull::Config {
        durable_name: Some(t.durable.to_string()),
        deliver_policy,
        ack_policy: AckPolicy::Explicit,
        ack_wait: t.ack_wait,
        max_deliver: i64::from(t.max_deliver),
        backoff: t.backoff.clone(),
        max_ack_pending: i64::from(t.max_ack_pending),
        filter_subject,
        filter_subjects,
        ..Default::default()
    })
}

async fn pull_loop(
    mut pulls: Pulls,
    durable: Durable,
    trigger: Arc<JetStreamTrigger>,
    origin: Arc<Origin>,
    slot: Arc<HandlerSlot>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) {
    let label = format!("{}/{}", trigger.stream, trigger.durable);
    let dispatcher = Arc::new(dispatcher);
    let lanes = Lanes::for_handler(&slot.current());
    let mut retry = RETRY_FIRST;
    let mut spare = SpareJob::default();
    loop {
        // Versions swapped by a reload share their permits, so the permits of
        // the version current now bound whichever version runs a message.
        let handler = slot.current();
        // Pull once a quarter of a batch of slots is free, for whatever is
        // free then, while the pulls still open owe no more than the rest.
        // Pulling as soon as one slot frees would cost a pull per message
        // under load. A pull's round trip under load is long (~0.4 ms), and
        // the smaller share keeps fewer slots idle while it is on its way:
        // at the default 32 slots a quarter gave 15-40 % more than a half,
        // at 256 the share made no difference (BENCHMARKS.md).
        let batch = window(&trigger, &handler);
        let want = (batch / 4).max(1);
        let room = batch.saturating_sub(pulls.owed());
        let event = tokio::select! {
            // Messages first, as in the core subscription trigger, so a
            // ready message does not pay for polling the others. The inbox
            // holds no more than the pulls asked for, so it runs dry and
            // the token is polled.
            biased;
            event = pulls.next() => event,
            permits = handler.permits.clone().acquire_many_owned(want as u32), if room >= want => {
                let Ok(permits) = permits else { break };
                let permits = take_free(&handler.permits, permits, room);
                if let Err(e) = pulls.request(permits).await {
                    tracing::warn!(consumer = %label, "cannot pull, retrying in {retry:?}: {e}");
                    if pause(&mut retry, &shutdown).await {
                        break;
                    }
                }
                continue;
            }
            () = shutdown.cancelled() => break,
        };
        match event {
            Event::Message(delivery, reserved) => {
                retry = RETRY_FIRST;
                let handler = slot.current();
                let admission = tokio::select! {
                    biased;
                    a = admit(&dispatcher, &handler, reserved) => a,
                    () = dispatcher.abandon.cancelled() => break,
                };
                let job =
                    dispatcher.job(handler, origin.clone(), Delivery::JetStream(delivery, trigger.clone()), admission);
                dispatcher.start(&lanes, job, &mut spare).await;
            }
            // The loop comes round to pull again.
            Event::Expired => {}
            Event::Interrupted(Interruption::Reconnected) => {
                tracing::info!(consumer = %label, "reconnected; pulling again");
            }
            Event::Interrupted(Interruption::Silence) => {
                tracing::warn!(consumer = %label, "no message or heartbeat for a while; pulling again");
            }
            Event::Interrupted(Interruption::Gone(why)) => {
                tracing::warn!(
                    consumer = %label,
                    "the consumer is gone ({why}); making it again as the manifest describes in {retry:?}"
                );
                if pause(&mut retry, &shutdown).await {
                    break;
                }
                if let Err(e) = durable.make().await {
                    tracing::warn!(consumer = %label, "cannot make the consumer again: {e}");
                }
            }
            Event::Interrupted(Interruption::Refused(why)) => {
                tracing::warn!(consumer = %label, "the server ended the pulls ({why}), retrying in {retry:?}");
                if pause(&mut retry, &shutdown).await {
                    break;
                }
            }
            Event::Interrupted(Interruption::Closed) => {
                tracing::warn!(consumer = %label, "the pull inbox closed, subscribing again in {retry:?}");
                if pause(&mut retry, &shutdown).await {
                    break;
                }
                if let Err(e) = pulls.reopen().await {
                    tracing::warn!(consumer = %label, "{e}");
                }
            }
        }
    }
    tracing::debug!(handler = %slot.current().manifest.name, consumer = %label, "trigger stopped");
}

/// How many messages this trigger's open pulls may ask for at once: its
/// `batch`, and no more than its share of the handler's slots. An open pull
/// holds slots for the messages it asked for until it expires, so a trigger
/// holding all of them would keep the handler's other triggers from running
/// anything for seconds. (With fewer slots than triggers, each still gets
/// one.)
fn window(trigger: &JetStreamTrigger, handler: &LoadedHandler) -> usize {
    let share = handler.manifest.limits.max_concurrency as usize / handler.manifest.triggers.len().max(1);
    (trigger.batch as usize).min(share).max(1)
}

/// `first`, split into one permit per message, topped up with whatever
/// else is free right now, up to `room` in all.
fn take_free(permits: &Arc<Semaphore>, mut first: OwnedSemaphorePermit, room: usize) -> Vec<OwnedSemaphorePermit> {
    let mut taken = Vec::with_capacity(room);
    while let Some(one) = first.split(1) {
        taken.push(one);
    }
    while taken.len() < room {
        match permits.clone().try_acquire_owned() {
            Ok(p) => taken.push(p),
            Err(_) => break,
        }
    }
    taken
}

/// Admits a delivered message: with the permit its pull reserved, or, for a
/// message of a pull already written off, a permit of its own. Waiting for
/// one is safe then: the trigger holds no permits of unanswered pulls that
/// only it could release (an interruption released them all).
async fn admit(dispatcher: &Dispatcher, handler: &LoadedHandler, reserved: Option<OwnedSemaphorePermit>) -> Admission {
    match reserved {
        Some(permit) => dispatcher.admit_reserved(handler, permit).await,
        None => dispatcher.admit(handler).await,
    }
}

/// Sleeps for `retry` (then doubles it); returns whether shutdown began.
async fn pause(retry: &mut Duration, shutdown: &CancellationToken) -> bool {
    let stop = tokio::select! {
        () = tokio::time::sleep(*retry) => false,
        () = shutdown.cancelled() => true,
    };
    *retry = (*retry * 2).min(RETRY_MAX);
    stop
}
