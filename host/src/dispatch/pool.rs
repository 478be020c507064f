//! Where an invocation's instance comes from: a fresh one per message (the
//! default), or, for handlers whose manifest says `instance = "reuse"`, an
//! idle instance the handler's previous invocations left behind.
//!
//! Fresh mode keeps one instance of each handler version that has run on
//! standby: made after an invocation ends, off the message path, so the next
//! message finds its instance ready instead of waiting ~10-50 µs for a store
//! and an instantiation. Nothing has run in a standby instance (no guest
//! export was ever called), so isolation between messages is what it would
//! be without it; only the time of instantiation moves. The rules:
//! - standby instances are few: each holds one of the host's
//!   [`STANDBY_INSTANCES`](crate::limits::STANDBY_INSTANCES) permits, and the
//!   engine's pool has that many slots beyond its live instances, so a
//!   standby instance never takes a slot an admitted message needs;
//! - a standby instance's memory counts against its tenant's budget only
//!   once a message claims it (and is refused then if the budget is spent,
//!   as a fresh instantiation would be), so idle standby instances never
//!   make a tenant's running invocations run out of memory;
//! - a reload retires the old version's standby instance with the version.
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
//!   engine's instance pool. A message of the handler is admitted onto an
//!   idle instance when one is waiting, taking its permits over, so a
//!   handler whose idle instances hold every permit it may have still
//!   runs; and a message of another handler that finds no permit free has
//!   an idle instance dropped for it ([`IdlePools`]). A pool never holds
//!   more idle instances than the handler ever ran at once, so
//!   `max_concurrency` still bounds its live instances.
//!
//! Kept apart from dispatch so that how an instance is obtained and returned
//! is one small module.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::Store;

use super::LoadedHandler;
use crate::engine::{Engine, Guest, GuestPre, HandleResult, StoreData};
use crate::hostcalls::{Invocation, MessageCalls};
use crate::tenant::Tenant;
use crate::wire::MessageView;

/// Where one handler version's instances come from.
pub(crate) enum Instances {
    /// A new instance for every message (the default), one kept on standby.
    Fresh(Standby),
    /// Instances that served a message serve again (`instance = "reuse"`).
    Reuse(InstancePool),
}

impl Instances {
    /// Drops the idle or standby instances of a version a newer one
    /// replaced, and refuses any offered later.
    pub(crate) fn retire(&self) {
        match self {
            Instances::Fresh(standby) => standby.retire(),
            Instances::Reuse(pool) => pool.retire(),
        }
    }

    /// The reuse pool, when instances are reused.
    pub(crate) fn pool(&self) -> Option<&InstancePool> {
        match self {
            Instances::Reuse(pool) => Some(pool),
            Instances::Fresh(_) => None,
        }
    }
}

/// The standby instance of one handler version in fresh mode.
#[derive(Default)]
pub(crate) struct Standby {
    state: Mutex<StandbyState>,
}

#[derive(Default)]
enum StandbyState {
    /// None ready; the next invocation to end makes one.
    #[default]
    Empty,
    /// An invocation that ended is instantiating one.
    Filling,
    Ready(Ready),
    /// The version was replaced: no more standby instances.
    Retired,
}

/// A fresh instance nothing has run in yet.
struct Ready {
    store: Store<StoreData>,
    instance: Guest,
    /// One of the host's standby permits, given back when a message claims
    /// the instance (its admission permits count it from then on).
    _permit: OwnedSemaphorePermit,
}

impl Standby {
    fn lock(&self) -> std::sync::MutexGuard<'_, StandbyState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ready instance, if there is one, for a message: its standby
    /// permit goes back, and the message's admission permits count it from
    /// now on.
    pub(crate) fn claim(&self) -> Option<Claimed> {
        let mut state = self.lock();
        match std::mem::take(&mut *state) {
            StandbyState::Ready(Ready { store, instance, _permit }) => Some(Claimed { store, instance }),
            other => {
                *state = other;
                None
            }
        }
    }

    /// Makes the standby instance if there is none and the host has a
    /// standby permit free. `calls` gives a placeholder invocation for the
    /// store (the claiming message brings its own), or `None` when no
    /// instance should be made any more (shutdown); it is only called when
    /// one is needed, so a version whose instance is ready pays nothing.
    /// The placeholder's deadline bounds the instantiation, which runs a
    /// guest's start functions if it has any. A failed instantiation leaves
    /// none: the next message instantiates on its own path and reports the
    /// error as its outcome.
    pub(crate) async fn refill(
        &self,
        engine: &Engine,
        pre: &GuestPre,
        permits: &Arc<Semaphore>,
        calls: impl FnOnce() -> Option<Invocation>,
    ) {
        {
            let mut state = self.lock();
            if !matches!(*state, StandbyState::Empty) {
                return;
            }
            *state = StandbyState::Filling;
        }
        let made = match (calls(), permits.clone().try_acquire_owned()) {
            (Some(calls), Ok(permit)) => {
                let deadline = calls.deadline;
                let mut store = engine.standby_store(calls);
                match tokio::time::timeout_at(deadline, new_instance(&mut store, pre)).await {
                    Ok(Ok(instance)) => Some(Ready { store, instance, _permit: permit }),
                    Ok(Err(e)) => {
                        tracing::debug!("no standby instance: {e:#}");
                        None
                    }
                    Err(_elapsed) => None,
                }
            }
            _ => None,
        };
        let mut state = self.lock();
        if matches!(*state, StandbyState::Filling) {
            *state = made.map_or(StandbyState::Empty, StandbyState::Ready);
        }
    }

    fn retire(&self) {
        let old = std::mem::replace(&mut *self.lock(), StandbyState::Retired);
        // Dropped once the lock is released: dropping an instance takes
        // microseconds, and the version's invocations take this lock.
        drop(old);
    }
}

/// The idle instances of one handler version in reuse mode. No `Default`:
/// an empty `idle` would be a retired pool; [`InstancePool::new`] makes one.
pub(crate) struct InstancePool {
    /// `None` once retired. Last in, first out: the most recently used
    /// instance has the warmest caches.
    idle: Mutex<Option<Vec<Idle>>>,
    /// Signalled whenever an instance goes idle, for a message waiting to be
    /// admitted ([`InstancePool::returned`]).
    returned: tokio::sync::Notify,
    /// Whether the handler version is in the host's [`IdlePools`].
    listed: AtomicBool,
}

struct Idle {
    store: Store<StoreData>,
    instance: Guest,
    _slot: InstanceSlot,
}

/// The handler versions whose reuse pools may hold idle instances, host-wide:
/// where a message waiting for instance permits finds an idle instance to
/// give up its own. Idle instances keep their permits, and without this a
/// few reuse-mode handlers that had once run at their limits would leave
/// every other handler of their tenant, or of the host, waiting for good.
/// Running a message comes before keeping an instance warm.
#[derive(Default)]
pub(crate) struct IdlePools {
    handlers: Mutex<Vec<Weak<LoadedHandler>>>,
    /// Whether any pool was ever listed: a host without reuse-mode
    /// handlers, saturated, skips the look through the list on every
    /// admission that waits.
    any: AtomicBool,
}

impl IdlePools {
    /// Lists `handler`'s pool, once, when its first invocation has ended.
    pub(crate) fn list(&self, handler: &Arc<LoadedHandler>) {
        let Instances::Reuse(pool) = &handler.instances else { return };
        if pool.listed.load(Ordering::Relaxed) || pool.listed.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut handlers = self.handlers.lock().unwrap_or_else(PoisonError::into_inner);
        handlers.retain(|h| h.strong_count() > 0);
        handlers.push(Arc::downgrade(handler));
        self.any.store(true, Ordering::Relaxed);
    }

    /// Drops one idle instance, the longest idle of the first listed pool
    /// that has one (of `tenant`'s handlers only, when given), so that its
    /// permits go to a message waiting for them. Returns whether there was
    /// one.
    pub(crate) fn evict_one(&self, tenant: Option<&Arc<Tenant>>) -> bool {
        if !self.any.load(Ordering::Relaxed) {
            return false;
        }
        let handlers: Vec<Arc<LoadedHandler>> =
            self.handlers.lock().unwrap_or_else(PoisonError::into_inner).iter().filter_map(Weak::upgrade).collect();
        handlers
            .iter()
            .filter(|h| tenant.is_none_or(|t| Arc::ptr_eq(t, &h.tenant)))
            .filter_map(|h| h.instances.pool())
            .any(InstancePool::evict_oldest)
    }
}

/// An instance claimed for a message at its admission, for
/// [`Lease::checkout`]: an idle one in reuse mode ([`InstancePool::admit`]),
/// the standby one in fresh mode ([`Standby::claim`]).
pub(crate) struct Claimed {
    store: Store<StoreData>,
    instance: Guest,
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
        InstancePool {
            idle: Mutex::new(Some(Vec::new())),
            returned: tokio::sync::Notify::new(),
            listed: AtomicBool::new(false),
        }
    }

    fn take(&self) -> Option<Idle> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner).as_mut()?.pop()
    }

    /// An idle instance for a message being admitted, with the permits it
    /// held, which then count the message: admitted that way, a message
    /// in reuse mode neither acquires instance permits of its own (the
    /// host's, and its tenant's when the tenant limits instances) nor gives
    /// the idle instance's back, and each release takes its semaphore's
    /// lock.
    pub(crate) fn admit(&self) -> Option<(Claimed, InstanceSlot)> {
        let Idle { store, instance, _slot } = self.take()?;
        Some((Claimed { store, instance }, _slot))
    }

    fn put(&self, idle: Idle) {
        if let Some(v) = self.idle.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
            v.push(idle);
        }
        self.returned.notify_one();
    }

    /// Completes once an instance may have gone idle since the last call
    /// ([`InstancePool::admit`] tells): a wake-up given while nobody waits is
    /// kept for the next call, so none is lost between looking and waiting.
    pub(crate) async fn returned(&self) {
        self.returned.notified().await;
    }

    /// Drops this pool's longest-idle instance, if it has one, giving its
    /// permits back. Returns whether it had one.
    pub(crate) fn evict_oldest(&self) -> bool {
        let evicted = {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            match idle.as_mut() {
                Some(v) if !v.is_empty() => Some(v.remove(0)),
                _ => None,
            }
        };
        // Dropped once the lock is released: dropping an instance takes
        // microseconds, and the handler's invocations take this lock.
        evicted.is_some()
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
    instance: Option<Guest>,
    /// Whether the instance was waiting on standby.
    standby: bool,
}

impl Lease {
    /// An instance of `instances` set up for `message`: the one `claimed`
    /// at admission, or else an idle one in reuse mode or the standby one in
    /// fresh mode, or else a fresh store, with the invocation `calls`
    /// makes (instantiated on first [`Lease::call`]). In every case the
    /// invocation's own admission permits count the instance while it runs;
    /// an idle instance's permits (unless the admission took them over) and
    /// a standby permit go back.
    pub(crate) fn checkout(
        engine: &Engine,
        instances: &Instances,
        message: MessageCalls,
        calls: impl FnOnce(MessageCalls) -> Invocation,
        claimed: Option<Claimed>,
    ) -> Lease {
        match instances {
            Instances::Reuse(pool) => {
                if let Some(Claimed { mut store, instance }) =
                    claimed.or_else(|| pool.take().map(|Idle { store, instance, .. }| Claimed { store, instance }))
                {
                    engine.renew(&mut store, message);
                    return Lease { store, instance: Some(instance), standby: false };
                }
            }
            Instances::Fresh(standby) => {
                if let Some(Claimed { mut store, instance }) = claimed.or_else(|| standby.claim()) {
                    // When the tenant's memory budget is spent, a fresh
                    // instantiation meets the same refusal, reported as the
                    // memory limit it is.
                    if engine.charge(&mut store) {
                        engine.renew(&mut store, message);
                        return Lease { store, instance: Some(instance), standby: true };
                    }
                }
            }
        }
        Lease { store: engine.store(calls(message)), instance: None, standby: false }
    }

    /// Whether the instance was made ahead of the message, on standby.
    pub(crate) fn was_standby(&self) -> bool {
        self.standby
    }

    /// Instantiates now if there is no instance yet (otherwise
    /// [`Lease::call`] does), so a caller can time the two apart.
    pub(crate) async fn instantiate(&mut self, pre: &GuestPre) -> wasmtime::Result<()> {
        if self.instance.is_none() {
            self.instance = Some(new_instance(&mut self.store, pre).await?);
        }
        Ok(())
    }

    /// Instantiates if needed, then calls `handle`.
    pub(crate) async fn call(&mut self, pre: &GuestPre, msg: MessageView<'_>) -> wasmtime::Result<HandleResult> {
        let instance = match self.instance.take() {
            Some(i) => i,
            None => new_instance(&mut self.store, pre).await?,
        };
        let result = instance.handle(&mut self.store, msg).await;
        // Put back only after the call returned: a call cut off mid-way
        // leaves `None`, so the lease cannot be reused.
        self.instance = Some(instance);
        result
    }

    /// In reuse mode, returns the instance to the pool if the call ended
    /// `clean`ly, handing it the invocation's instance permits `slot`;
    /// otherwise (and always in fresh mode) drops it, and the permits go
    /// back.
    pub(crate) fn checkin(self, instances: &Instances, clean: bool, slot: Option<InstanceSlot>) {
        let reusable = clean && !self.store.data().hit_memory_limit();
        if let (Some(pool), true, Some(instance), Some(slot)) = (instances.pool(), reusable, self.instance, slot) {
            pool.put(Idle { store: self.store, instance, _slot: slot });
        }
    }
}

/// A new instance of `pre` in `store`. Boxed: instantiation's future is four
/// times the size of the call's, and every message would otherwise copy
/// that much around in the invocation's state, used or not (it is not, in
/// reuse mode or with a standby instance). Standby refills share it.
async fn new_instance(store: &mut Store<StoreData>, pre: &GuestPre) -> wasmtime::Result<Guest> {
    Box::pin(pre.instantiate(store)).await
}
