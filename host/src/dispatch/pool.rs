//! Where an invocation's instance comes from: a fresh one per message (the
//! default), or, for handlers whose manifest says `instance = "reuse"`, an
//! idle instance the handler's previous invocations left behind.
//!
//! Reuse trades isolation between messages for speed, so the rules are
//! strict:
//! - only an instance whose call ended cleanly (`Ok` or a handler error)
//!   goes back; one that trapped, timed out, hit its memory limit or was
//!   abandoned (its future dropped mid-call) is dropped with its store;
//! - limits apply per message: the store gets the new invocation's deadline
//!   and epoch budget, and its memory limiter keeps refusing growth;
//! - a pool belongs to one handler version: a reload retires it, dropping
//!   the idle instances, and later check-ins of the old version are dropped;
//! - an idle instance keeps the tenant's and the host's instance permits of
//!   the invocation that returned it (and its tenant memory reservation), so
//!   running plus idle instances never exceed the tenant's share or the
//!   engine's instance pool (idle instances do hold those permits until a
//!   reload or shutdown: reuse is for a few hot handlers, not for all of
//!   them). A pool never holds more idle instances than the handler ever
//!   ran at once, so `max_concurrency` still bounds its live instances.
//!
//! Kept apart from dispatch so that how an instance is obtained and returned
//! is one small module.

use std::sync::{Mutex, PoisonError};

use tokio::sync::OwnedSemaphorePermit;
use wasmtime::Store;

use crate::bindings::{Handler, HandlerError, HandlerPre, Message, Reply};
use crate::engine::{Engine, StoreData};
use crate::hostcalls::Invocation;

/// The idle instances of one handler version in reuse mode.
#[derive(Default)]
pub(crate) struct InstancePool {
    /// `None` once retired. Last in, first out: the most recently used
    /// instance has the warmest caches.
    idle: Mutex<Option<Vec<Idle>>>,
}

struct Idle {
    store: Store<StoreData>,
    instance: Handler,
    _slot: InstanceSlot,
}

/// The permits that count one live instance: its tenant's (when the tenant
/// limits instances) and the host's.
pub(crate) struct InstanceSlot {
    pub(crate) _tenant: Option<OwnedSemaphorePermit>,
    pub(crate) _host: OwnedSemaphorePermit,
}

impl InstancePool {
    /// A pool that accepts instances.
    pub(crate) fn new() -> Self {
        InstancePool { idle: Mutex::new(Some(Vec::new())) }
    }

    fn take(&self) -> Option<Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).as_mut()?.pop()
    }

    fn put(&self, idle: Idle) {
        if let Some(v) = self.idle.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
            v.push(idle);
        }
    }

    /// Drops the idle instances and refuses any returned later.
    pub(crate) fn retire(&self) {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(idle);
    }
}

/// The store and instance one invocation runs on.
pub(crate) struct Lease {
    pub(crate) store: Store<StoreData>,
    /// `None` until instantiated, and while the call is running.
    instance: Option<Handler>,
}

impl Lease {
    /// An idle instance of `pool` set up for `calls`, or a fresh store
    /// (instantiated on first [`Lease::call`]).
    pub(crate) fn checkout(engine: &Engine, pool: Option<&InstancePool>, calls: Invocation) -> Lease {
        match pool.and_then(InstancePool::take) {
            // The invocation's own admission permit counts this instance
            // while it runs; the idle one's goes back.
            Some(Idle { mut store, instance, _slot }) => {
                engine.renew(&mut store, calls);
                Lease { store, instance: Some(instance) }
            }
            None => Lease { store: engine.store(calls), instance: None },
        }
    }

    /// Instantiates if needed, then calls `handle`.
    pub(crate) async fn call(
        &mut self,
        pre: &HandlerPre<StoreData>,
        msg: &Message,
    ) -> wasmtime::Result<Result<Option<Reply>, HandlerError>> {
        let instance = match self.instance.take() {
            Some(i) => i,
            None => pre.instantiate_async(&mut self.store).await?,
        };
        let result = instance.call_handle(&mut self.store, msg).await;
        // Put back only after the call returned: a call cut off mid-way
        // leaves `None`, so the lease cannot be reused.
        self.instance = Some(instance);
        result
    }

    /// Returns the instance to `pool` if the call ended `clean`ly, handing
    /// it the invocation's instance permits `slot`; otherwise drops it (and
    /// the permits go back).
    pub(crate) fn checkin(self, pool: Option<&InstancePool>, clean: bool, slot: Option<InstanceSlot>) {
        let reusable = clean && !self.store.data().hit_memory_limit();
        if let (Some(pool), true, Some(instance), Some(slot)) = (pool, reusable, self.instance, slot) {
            pool.put(Idle { store: self.store, instance, _slot: slot });
        }
    }
}
