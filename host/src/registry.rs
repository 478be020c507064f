//! The handlers a running host serves. Each has a [`HandlerSlot`] holding
//! its current version, and a [`Binding`]: the trigger tasks feeding it.
//!
//! Triggers read the slot for every message, so swapping a version is one
//! pointer store: invocations already running keep the version they
//! started with (they hold an `Arc` to it), the next message gets the new
//! one, and the subscription never closes, so nothing is lost in between.

use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;

use crate::dispatch::{Dispatcher, LoadedHandler};
use crate::manifest::Trigger;
use crate::triggers::{self, TriggerError};

/// Where a handler's current version lives.
pub(crate) struct HandlerSlot {
    current: RwLock<Arc<LoadedHandler>>,
}

impl HandlerSlot {
    pub(crate) fn new(handler: Arc<LoadedHandler>) -> Arc<Self> {
        Arc::new(HandlerSlot { current: RwLock::new(handler) })
    }

    /// The version new messages go to.
    pub(crate) fn current(&self) -> Arc<LoadedHandler> {
        // Only `replace` writes, and it cannot panic while holding the lock.
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Makes `next` the current version, and retires the one it replaces
    /// (its idle or standby instances go; running invocations finish on it).
    pub(crate) fn replace(&self, next: Arc<LoadedHandler>) {
        let old =
            std::mem::replace(&mut *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner), next);
        old.retire();
    }
}

/// The trigger tasks of one handler, stopped together.
pub(crate) struct Binding {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Binding {
    /// Binds every trigger of `triggers` to `slot`. All or nothing: if one
    /// fails, those already bound are stopped again.
    pub(crate) async fn bind(
        slot: &Arc<HandlerSlot>,
        triggers: &[Trigger],
        create_streams: bool,
        dispatcher: &Dispatcher,
        parent: &CancellationToken,
    ) -> Result<Binding, TriggerError> {
        let binding = Binding { stop: parent.child_token(), tasks: Vec::new() };
        let mut binding = binding;
        for trigger in triggers {
            match triggers::bind(trigger, create_streams, slot.clone(), dispatcher.clone(), binding.stop.clone()).await
            {
                Ok(task) => binding.tasks.push(task),
                Err(e) => {
                    binding.unbind().await;
                    return Err(e);
                }
            }
        }
        Ok(binding)
    }

    /// Stops taking messages (core subscriptions drain; JetStream stops
    /// pulling) and waits until every trigger task has handed over what it
    /// had received. Invocations already admitted keep running.
    pub(crate) async fn unbind(self) {
        self.stop.cancel();
        futures::future::join_all(self.tasks).await;
    }

    /// How many trigger tasks are bound.
    pub(crate) fn len(&self) -> usize {
        self.tasks.len()
    }
}
