//! Durable JetStream pull consumers: at-least-once delivery that survives
//! host crashes and restarts.
//!
//! The host creates or updates the durable consumer to match the manifest
//! (the stream itself only when the host may create streams), then pulls.
//! Flow control is by permits: each pull asks for exactly as many messages
//! as the handler has free concurrency slots (at most `batch`), so nothing
//! sits in a buffer with its ack-wait clock running, and the server never
//! has more than `max_concurrency` of this host's messages unacknowledged.
//! Under load a pull waits for half a batch of free slots, so the round trip
//! of one pull overlaps the work of the other half. A pull stays open until
//! it is filled or expires, so messages published to an idle consumer are
//! delivered the moment they arrive.
//!
//! Settling (ack, nak, term, dead letter) happens in `settle` once the
//! invocation ends, before the invocation gives its slot back. A success ack
//! is sent without waiting for the server; naks and give-ups wait for its
//! confirmation. Invocations never wait on each other's settlements.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::TriggerError;
use crate::dispatch::{Delivery, Dispatcher, JetStreamDelivery, Lanes, Origin};
use crate::manifest::{DeliverFrom, JetStreamTrigger};
use crate::registry::HandlerSlot;

/// How long one pull stays open waiting for messages. Short enough that a
/// shutdown or a lost connection is noticed quickly, long enough that an
/// idle consumer costs next to nothing.
const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Server heartbeats while a pull is open, to notice a dead connection.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

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
    let consumer: PullConsumer = stream.create_consumer(consumer_config(trigger)?).await.map_err(|source| {
        TriggerError::Consumer { stream: trigger.stream.to_string(), durable: trigger.durable.to_string(), source }
    })?;
    // Spans name JetStream invocations after the stream; the filter is the
    // subscription, and the durable the consumer group.
    let subscription = trigger.filters.first().map_or_else(|| trigger.stream.to_string(), ToString::to_string);
    let origin = Arc::new(Origin::jetstream(trigger.stream.as_str(), subscription, trigger.durable.as_str()));
    let trigger = Arc::new(trigger.clone());
    Ok(tokio::spawn(pull_loop(consumer, trigger, origin, slot, dispatcher, shutdown)))
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
    consumer: PullConsumer,
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
    'pull: loop {
        // Versions swapped by a reload share their permits, so the permits of
        // the version current now bound whichever version runs a message.
        let handler = slot.current();
        // Wait until half a batch of slots is free, then take whatever else
        // is free right now. Pulling as soon as one slot frees would cost a
        // round trip per message under load; waiting for half keeps the
        // other half busy while the next pull is on its way.
        let batch = (trigger.batch as usize).min(handler.manifest.limits.max_concurrency as usize).max(1);
        let want = (batch / 2).max(1) as u32;
        let first = tokio::select! {
            p = handler.permits.clone().acquire_many_owned(want) => p,
            () = shutdown.cancelled() => break,
        };
        let Ok(mut first) = first else { break };
        let mut reserved = Vec::with_capacity(batch);
        while let Some(one) = first.split(1) {
            reserved.push(one);
        }
        while reserved.len() < batch {
            match handler.permits.clone().try_acquire_owned() {
                Ok(p) => reserved.push(p),
                Err(_) => break,
            }
        }

        let pull = consumer
            .batch()
            .max_messages(reserved.len())
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await;
        let mut batch = match pull {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(consumer = %label, "cannot pull, retrying in {retry:?}: {e}");
                if pause(&mut retry, &shutdown).await {
                    break;
                }
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                // Messages first, as in the core subscription trigger, so a
                // ready message does not pay for polling the token. A batch
                // holds at most the permits reserved for it, and when it
                // ends the pull loop above polls the token again.
                biased;
                m = batch.next() => m,
                () = shutdown.cancelled() => break 'pull,
            };
            match next {
                None => break,
                Some(Ok(msg)) => {
                    retry = RETRY_FIRST;
                    let Some(permit) = reserved.pop() else {
                        // The server sent more than asked for; it will
                        // redeliver what is not acked.
                        tracing::warn!(consumer = %label, "pull returned more messages than requested");
                        break;
                    };
                    let handler = slot.current();
                    let admission = tokio::select! {
                        biased;
                        a = dispatcher.admit_reserved(&handler, permit) => a,
                        () = dispatcher.abandon.cancelled() => break 'pull,
                    };
                    dispatcher.start(
                        &lanes,
                        handler,
                        origin.clone(),
                        Delivery::JetStream(JetStreamDelivery::new(msg), trigger.clone()),
                        admission,
                    );
                }
                Some(Err(e)) => {
                    tracing::warn!(consumer = %label, "pull failed, retrying in {retry:?}: {e}");
                    if pause(&mut retry, &shutdown).await {
                        break 'pull;
                    }
                    break;
                }
            }
        }
    }
    tracing::debug!(handler = %slot.current().manifest.name, consumer = %label, "trigger stopped");
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
