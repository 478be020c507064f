//! Triggers turn NATS deliveries into invocations, one task per
//! `[[trigger]]` of a handler. They wait for an admission from dispatch
//! (which is how back-pressure reaches NATS), then hand the message over.
//! The one time a trigger runs guest code is the first poll of an
//! invocation of a tenant on the host's threads while the trigger's lanes
//! are idle (in fresh mode, only with a standby instance ready, and only up
//! to the end of the call; [`crate::dispatch::Dispatcher::start`]); the
//! trigger reads nothing until that poll returns.
//!
//! Each kind of source has its own file. Every trigger task ends on its own
//! once the shutdown token fires and what it had already received is handed
//! over.

mod jetstream;
mod subject;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::manifest::Trigger;
use crate::registry::HandlerSlot;

/// A trigger that could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// The NATS server refused or the connection dropped while subscribing.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        /// The subject of the trigger.
        subject: String,
        /// The client's error.
        source: async_nats::SubscribeError,
    },
    /// The stream does not exist (or cannot be read) and the host may not
    /// create streams.
    #[error("stream `{stream}` cannot be used (natsfn creates streams only with --create-streams): {source}")]
    MissingStream {
        /// The stream.
        stream: String,
        /// The server's answer.
        source: async_nats::jetstream::context::GetStreamError,
    },
    /// The host may create the stream but could not.
    #[error("cannot create stream `{stream}`: {reason}")]
    CreateStream {
        /// The stream.
        stream: String,
        /// Why.
        reason: String,
    },
    /// The durable consumer could not be created or updated to match the
    /// manifest (for example a changed `deliver` on an existing consumer).
    #[error("cannot create or update consumer `{durable}` on stream `{stream}`: {source}")]
    Consumer {
        /// The stream.
        stream: String,
        /// The durable consumer.
        durable: String,
        /// The server's answer.
        source: async_nats::jetstream::stream::ConsumerError,
    },
}

/// Binds `trigger` for `handler` and spawns the task that feeds it. Returns
/// once the binding exists on the client (not necessarily acknowledged by the
/// server yet: flush the connection for that).
pub(crate) async fn bind(
    trigger: &Trigger,
    create_streams: bool,
    handler: Arc<HandlerSlot>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, TriggerError> {
    match trigger {
        Trigger::Subject { subject, queue } => {
            subject::bind(subject, queue.as_ref(), handler, dispatcher, shutdown).await
        }
        Trigger::JetStream(js) => jetstream::bind(js, create_streams, handler, dispatcher, shutdown).await,
    }
}
