//! Triggers turn NATS deliveries into invocations, one task per
//! `[[trigger]]` of a handler. They never run guest code: they wait for an
//! admission from dispatch (which is how back-pressure reaches NATS), then
//! hand the message over.
//!
//! Each kind of source has its own file. Every trigger task ends on its own
//! once the shutdown token fires and what it had already received is handed
//! over.

mod subject;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::dispatch::{Dispatcher, LoadedHandler};
use crate::manifest::Trigger;

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
}

/// Binds `trigger` for `handler` and spawns the task that feeds it. Returns
/// once the binding exists on the client (not necessarily acknowledged by the
/// server yet: flush the connection for that).
pub(crate) async fn bind(
    trigger: &Trigger,
    handler: Arc<LoadedHandler>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, TriggerError> {
    match trigger {
        Trigger::Subject { subject, queue } => {
            subject::bind(subject, queue.as_ref(), handler, dispatcher, shutdown).await
        }
    }
}
