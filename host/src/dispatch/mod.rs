//! Dispatch: runs one invocation of a handler for one message, from a fresh
//! instance to the applied outcome.
//!
//! The steps, in order: give the invocation a deadline, make a store with the
//! handler's memory limit, instantiate from the handler's `InstancePre`, call
//! `handle`, and apply what it returned (publish the reply, or count and log
//! the failure). The instance is dropped at the end: nothing a guest does
//! survives into the next message, unless the handler opted into instance
//! reuse (`pool`), where a cleanly finished instance serves again. In fresh
//! mode the store and instantiation usually happened already: after each
//! invocation, off the message path, the handler's next instance is made
//! and left on standby (`pool::Standby`).
//!
//! Dispatch never decides *whether* to run: triggers hold the concurrency
//! permits, so by the time a message gets here it has a slot.
//!
//! Each invocation runs inside its span (see `span`), which host calls
//! parent their own spans on and which carries the outcome.

mod lanes;
pub(crate) mod pool;
mod span;

pub(crate) use lanes::Lanes;

pub(crate) use span::Origin;

use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use opentelemetry::context::FutureExt as _;
use tokio::time::Instant;

use crate::bindings::{HandlerError, Reply};
use crate::engine::{CacheOutcome, Compiled, Engine};
use crate::hostcalls::{Invocation, JetStreamAck, MessageCalls};
use crate::limits::FLUSH_TIMEOUT;
use crate::manifest::{InstanceMode, JetStreamTrigger, Manifest};
use crate::telemetry::{Trace, Tracer};
use crate::tenant::{Tenant, Tenants};
use crate::{settle, wire};

/// A message handed from a trigger to dispatch.
pub(crate) enum Delivery {
    /// A core NATS message: at most once, replied to if it asks.
    Core(async_nats::Message),
    /// A JetStream message, settled (ack/nak/term) by the trigger's policy.
    /// Boxed: with its delivery data it is larger than a core one, and
    /// every `Delivery` would be as large.
    JetStream(Box<JetStreamDelivery>, Arc<JetStreamTrigger>),
}

/// A JetStream message with its delivery data, parsed from the reply
/// subject once, when the trigger receives it.
///
/// The client's message as it came, not async-nats'
/// `jetstream::Message`: that carries a clone of the whole JetStream
/// context for its ack methods (the client, a `String`, a semaphore and a
/// channel), made and dropped for every message. Acks go out on the
/// tenant's connection instead (`hostcalls::JetStreamAck`).
pub(crate) struct JetStreamDelivery {
    msg: async_nats::Message,
    info: Option<wire::DeliveryInfo>,
}

impl JetStreamDelivery {
    pub(crate) fn new(msg: async_nats::Message) -> Box<Self> {
        let info = msg.reply.as_ref().and_then(|ack| wire::DeliveryInfo::parse(ack.as_str()));
        Box::new(JetStreamDelivery { msg, info })
    }
}

/// A handler ready to run: its manifest, its compiled component, and the
/// counters dispatch keeps for it.
pub struct LoadedHandler {
    /// The validated manifest.
    pub manifest: Arc<Manifest>,
    /// The compiled component and its version digest.
    pub compiled: Compiled,
    /// Whether the compiled code came from the cache.
    pub cache: CacheOutcome,
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    /// Shared by every version of the handler, so counters survive reloads.
    pub(crate) stats: Arc<Stats>,
    /// The tenant it belongs to: its connection, limits and threads.
    pub(crate) tenant: Arc<Tenant>,
    /// Where this version's instances come from: its standby instance in
    /// fresh mode, its idle ones in reuse mode.
    instances: pool::Instances,
    /// What every invocation span of this version says about it.
    span_values: span::HandlerValues,
}

impl LoadedHandler {
    pub(crate) fn new(manifest: Manifest, compiled: Compiled, cache: CacheOutcome, tenant: Arc<Tenant>) -> Self {
        let permits = Arc::new(tokio::sync::Semaphore::new(manifest.limits.max_concurrency as usize));
        let instances = match manifest.instance {
            InstanceMode::Reuse => pool::Instances::Reuse(pool::InstancePool::new()),
            InstanceMode::Fresh => pool::Instances::Fresh(pool::Standby::default()),
        };
        let span_values = span::HandlerValues::new(&manifest, &compiled.digest);
        LoadedHandler {
            manifest: Arc::new(manifest),
            compiled,
            cache,
            permits,
            stats: Arc::default(),
            tenant,
            instances,
            span_values,
        }
    }

    /// Called when a newer version takes over: drops the idle or standby
    /// instances of this one, and any its in-flight invocations return or
    /// make later.
    pub(crate) fn retire(&self) {
        self.instances.retire();
    }

    /// The host calls' view of one invocation of this handler.
    fn calls(&self, message: MessageCalls) -> Invocation {
        Invocation::new(self.manifest.clone(), self.tenant.clone(), self.stats.clone(), message)
    }

    /// The next version of `self`'s handler. It shares the counters, and the
    /// concurrency permits unless `max_concurrency` changed, so the limit
    /// holds across old and new versions while both have work in flight.
    pub(crate) fn successor(&self, manifest: Manifest, compiled: Compiled, cache: CacheOutcome) -> Self {
        let mut next = LoadedHandler::new(manifest, compiled, cache, self.tenant.clone());
        next.stats = self.stats.clone();
        if next.manifest.limits.max_concurrency == self.manifest.limits.max_concurrency {
            next.permits = self.permits.clone();
        }
        next
    }
}

/// How an invocation ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// `handle` returned `Ok`.
    Ok,
    /// `handle` returned a `handler-error`.
    Failed(HandlerError),
    /// The guest trapped (a panic, an out-of-bounds access, ...).
    Trapped(String),
    /// The guest ran out of memory under its limit and then trapped.
    MemoryLimit,
    /// The invocation's wall-clock budget ran out.
    TimedOut,
    /// The invocation burned all its fuel.
    OutOfFuel,
}

/// Live counters of one handler. Updated with relaxed atomics: they are
/// statistics, not synchronisation.
#[derive(Default)]
pub(crate) struct Stats {
    invocations: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    trapped: AtomicU64,
    timed_out: AtomicU64,
    memory_limit: AtomicU64,
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    acked: AtomicU64,
    naked: AtomicU64,
    termed: AtomicU64,
    dead_lettered: AtomicU64,
    peak_memory: AtomicU64,
    out_of_fuel: AtomicU64,
    denied: AtomicU64,
    rate_limited: AtomicU64,
    from_standby: AtomicU64,
}

/// A snapshot of a handler's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandlerStats {
    /// Invocations started.
    pub invocations: u64,
    /// Invocations where `handle` returned `Ok`.
    pub ok: u64,
    /// Invocations where `handle` returned a `handler-error`.
    pub failed: u64,
    /// Invocations that trapped.
    pub trapped: u64,
    /// Invocations stopped at their deadline.
    pub timed_out: u64,
    /// Invocations that trapped after hitting their memory limit.
    pub memory_limit: u64,
    /// Invocations running right now.
    pub in_flight: u64,
    /// The most invocations that ever ran at once.
    pub peak_in_flight: u64,
    /// JetStream messages the host acked after success (guest acks not
    /// included).
    pub acked: u64,
    /// JetStream messages nak'ed for redelivery.
    pub naked: u64,
    /// JetStream messages terminated without a dead-letter subject.
    pub termed: u64,
    /// JetStream messages published to the dead-letter subject, then termed.
    pub dead_lettered: u64,
    /// The most linear memory any one instance of the handler held, in bytes.
    pub peak_memory: u64,
    /// Invocations stopped when their fuel ran out.
    pub out_of_fuel: u64,
    /// Host calls refused by the handler's permissions.
    pub denied: u64,
    /// Sends refused by the tenant's publish rate.
    pub rate_limited: u64,
    /// Invocations that ran on a fresh instance made ahead of their
    /// message (fresh mode), rather than instantiated on its path.
    pub from_standby: u64,
}

impl HandlerStats {
    /// Invocations that have ended, however they ended. A core message's
    /// invocation counts as ended before its reply is sent, so whoever got
    /// the reply finds it counted; a JetStream one once its message is
    /// settled.
    pub fn finished(&self) -> u64 {
        self.ok + self.failed + self.trapped + self.timed_out + self.memory_limit + self.out_of_fuel
    }
}

/// Raises the peak `max` to `value`. A peak rarely moves, so it is read
/// first: `fetch_max` is a locked compare-and-swap loop on a line every
/// worker thread writes, paid twice per message otherwise.
fn raise(max: &AtomicU64, value: u64) {
    if max.load(Ordering::Relaxed) < value {
        max.fetch_max(value, Ordering::Relaxed);
    }
}

impl Stats {
    pub(crate) fn snapshot(&self) -> HandlerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HandlerStats {
            invocations: get(&self.invocations),
            ok: get(&self.ok),
            failed: get(&self.failed),
            trapped: get(&self.trapped),
            timed_out: get(&self.timed_out),
            memory_limit: get(&self.memory_limit),
            in_flight: get(&self.in_flight),
            peak_in_flight: get(&self.peak_in_flight),
            acked: get(&self.acked),
            naked: get(&self.naked),
            termed: get(&self.termed),
            dead_lettered: get(&self.dead_lettered),
            peak_memory: get(&self.peak_memory),
            out_of_fuel: get(&self.out_of_fuel),
            denied: get(&self.denied),
            rate_limited: get(&self.rate_limited),
            from_standby: get(&self.from_standby),
        }
    }

    pub(crate) fn acked(&self) {
        self.acked.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn naked(&self) {
        self.naked.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn termed(&self) {
        self.termed.fetch_add(1, Ordering::Relaxed);
    }

    fn memory(&self, bytes: usize) {
        raise(&self.peak_memory, bytes as u64);
    }

    pub(crate) fn denied(&self) {
        self.denied.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
    }

    fn started(&self) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        raise(&self.peak_in_flight, now);
    }

    fn finished(&self, outcome: &Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let counter = match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Failed(_) => &self.failed,
            Outcome::Trapped(_) => &self.trapped,
            Outcome::MemoryLimit => &self.memory_limit,
            Outcome::TimedOut => &self.timed_out,
            Outcome::OutOfFuel => &self.out_of_fuel,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `handler` for one delivery (on a fresh instance, or a reused one in
/// reuse mode) and applies the outcome: a reply for core requests,
/// ack/nak/term for JetStream. `trace` is the invocation's span, when
/// traced; host calls parent their spans on it.
pub(crate) async fn invoke(
    dispatcher: &Dispatcher,
    handler: &LoadedHandler,
    delivery: Delivery,
    trace: Option<&Trace>,
    admission: &mut Admission,
) {
    let (engine, nats) = (&dispatcher.engine, &handler.tenant.nats);
    handler.stats.started();
    let manifest = &handler.manifest;
    let deadline = Instant::now() + manifest.limits.timeout;

    let (received, jetstream, trigger) = match delivery {
        Delivery::Core(msg) => (wire::Received::core(msg), None, None),
        Delivery::JetStream(received, trigger) => {
            let JetStreamDelivery { msg, info } = *received;
            // Unparseable delivery data counts as a first delivery.
            let delivered = info.as_ref().map_or(1, |i| i.delivered);
            let received = wire::Received::jetstream(msg, info, trigger.kv.as_ref());
            let ack = JetStreamAck::new(received.ack_subject().cloned(), delivered);
            (received, Some(ack), Some(trigger))
        }
    };
    let message = MessageCalls { deadline, jetstream, trace: trace.cloned() };
    let calls = |message| handler.calls(message);
    let mut lease = pool::Lease::checkout(engine, &handler.instances, message, calls, admission.claimed.take());
    if lease.was_standby() {
        handler.stats.from_standby.fetch_add(1, Ordering::Relaxed);
    }

    // The epoch callback stops guests that compute past the deadline; the
    // timeout stops those that wait past it (in a host call or a sleep).
    // Armed only once the call waits: a timer costs a handle to the
    // runtime's clock and a timer-wheel entry, and most calls finish in
    // their first poll.
    let result = {
        let mut call = std::pin::pin!(lease.call(&handler.compiled.pre, received.view()));
        match futures::poll!(call.as_mut()) {
            Poll::Ready(done) => Ok(done),
            Poll::Pending => tokio::time::timeout_at(deadline, call).await,
        }
    };
    let (outcome, reply) = match result {
        Err(_elapsed) => (Outcome::TimedOut, None),
        Ok(Err(err)) => (classify_trap(&err, lease.store.data().hit_memory_limit()), None),
        Ok(Ok(Err(handler_error))) => (Outcome::Failed(handler_error), None),
        Ok(Ok(Ok(reply))) => (Outcome::Ok, reply),
    };
    handler.stats.memory(lease.store.data().peak_memory());
    if lease.store.data().hit_tenant_memory() {
        handler.tenant.count_memory_refused();
    }
    // A core invocation is counted before its reply goes out, so whoever
    // gets the reply finds it counted; a JetStream one once its message is
    // settled.
    let settles = trigger.is_some();
    if !settles {
        handler.stats.finished(&outcome);
    }
    let mut replied = false;
    if let (Some(reply), Some(to)) = (reply, &received.reply) {
        // Boxed: async-nats' publish future is most of a kilobyte, and
        // unboxed it made every invocation's state (copied into its box per
        // message) that much larger, reply or not.
        Box::pin(send_reply(nats, manifest, to, reply)).await;
        replied = true;
    }
    let jetstream = lease.store.data_mut().calls.jetstream.take();
    // Only an instance whose call ended as the guest meant it to may serve
    // again; it keeps this invocation's instance permits while idle.
    let clean = matches!(outcome, Outcome::Ok | Outcome::Failed(_));
    let slot = match handler.instances {
        pool::Instances::Reuse(_) if clean => admission.slot.take(),
        _ => None,
    };
    if let Some(trace) = trace {
        span::record_outcome(trace, handler, &outcome);
    }
    if !matches!(outcome, Outcome::Ok) {
        report(manifest, received.subject.as_str(), &outcome);
    }
    // A fresh instance's drop (and the standby refill after it) takes tens
    // of microseconds. Before it, let the connection task, woken by the
    // reply, write the reply: it runs on this thread only once this task
    // stops. In a lane a yield does that; on the trigger's task, after a
    // reply, waiting for the reply's flush does, and the instance work may
    // then go on here; without a reply the yield leaves the instance work
    // to a lane ([`Dispatcher::start`] says why each).
    let early = matches!(handler.instances, pool::Instances::Fresh(_)) && (replied || on_trigger_task());
    if early {
        if replied && on_trigger_task() && nats.connection_state() == async_nats::connection::State::Connected {
            // The connection task wakes this task once it has written the
            // reply: see [`Dispatcher::start`] for why that, not a yield.
            // Connected, so the flush does not wait for a reconnection; an
            // error (the connection closed meanwhile) leaves nothing to
            // wait for.
            AWAITS_REPLY_WRITE.with(|a| a.set(true));
            let _ = nats.flush().await;
            AWAITS_REPLY_WRITE.with(|a| a.set(false));
        } else {
            tokio::task::yield_now().await;
        }
    }
    lease.checkin(&handler.instances, clean, slot);
    if let (Some(js), Some(trigger)) = (jetstream, trigger) {
        // Boxed: only JetStream messages settle, and the settling future
        // (a confirmed ack is a request) would otherwise enlarge every
        // invocation's state.
        Box::pin(settle::settle(js, &received, &trigger, &outcome, manifest, nats, &handler.stats)).await;
    }
    if settles {
        handler.stats.finished(&outcome);
    }
}

/// Returns once the server has read everything sent on `nats` before the
/// call. `Client::flush` only writes the client's buffer to the socket; a
/// message to the connection's own inbox comes back only after the server
/// has processed what was written before it, subscriptions included.
async fn round_trip(nats: &async_nats::Client) -> Result<(), async_nats::Error> {
    use futures::StreamExt;
    let inbox = nats.new_inbox();
    let mut echo = nats.subscribe(inbox.clone()).await?;
    nats.publish(inbox, bytes::Bytes::new()).await?;
    nats.flush().await?;
    match echo.next().await {
        Some(_) => Ok(()),
        None => Err("the connection closed before the server answered".into()),
    }
}

/// What one poll of a job on its trigger's task left it as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Polled {
    /// It finished (or panicked, which, as in a lane, is reported and ends
    /// only that invocation).
    Finished,
    /// It replied and waits for the connection task to write the reply,
    /// which wakes this task.
    AwaitsReplyWrite,
    /// It waits for something else, or yielded: it must run on elsewhere.
    Pending,
}

/// Polls `job` once on the current task.
async fn poll_once<F: Future<Output = ()> + ?Sized>(mut job: Pin<&mut F>) -> Polled {
    std::future::poll_fn(|cx| {
        ON_TRIGGER_TASK.with(|on| on.set(true));
        AWAITS_REPLY_WRITE.with(|a| a.set(false));
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.as_mut().poll(cx)));
        ON_TRIGGER_TASK.with(|on| on.set(false));
        let awaits_reply_write = AWAITS_REPLY_WRITE.with(|a| a.replace(false));
        std::task::Poll::Ready(match polled {
            Ok(std::task::Poll::Ready(())) => Polled::Finished,
            Ok(std::task::Poll::Pending) if awaits_reply_write => Polled::AwaitsReplyWrite,
            Ok(std::task::Poll::Pending) => Polled::Pending,
            Err(_) => {
                tracing::error!("an invocation panicked; the trigger goes on");
                Polled::Finished
            }
        })
    })
    .await
}

/// On the trigger's task, yields if messages have arrived since the job was
/// made, so that the rest of its instance work goes on in a lane and the
/// trigger reads them. See [`Dispatcher::start`].
async fn give_way_to_arrivals(arrivals: Option<&Arrivals>) {
    if on_trigger_task() && !arrivals.is_some_and(Arrivals::none_since) {
        tokio::task::yield_now().await;
    }
}

/// Pending on its first poll, ready on the next, and never wakes its task
/// itself: for a caller whose job is pending and so has registered the
/// task's waker with whatever it waits for.
async fn woken() {
    let mut polled = false;
    std::future::poll_fn(|_| {
        if std::mem::replace(&mut polled, true) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

/// Names what stopped a guest. An interrupt can only be the deadline; a
/// trap after a refused memory growth is the memory limit, whatever
/// instruction the guest trapped on afterwards.
fn classify_trap(err: &wasmtime::Error, hit_memory_limit: bool) -> Outcome {
    match err.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => return Outcome::TimedOut,
        Some(wasmtime::Trap::OutOfFuel) => return Outcome::OutOfFuel,
        _ => {}
    }
    if hit_memory_limit {
        return Outcome::MemoryLimit;
    }
    Outcome::Trapped(format!("{err:#}"))
}

async fn send_reply(nats: &async_nats::Client, manifest: &Manifest, to: &async_nats::Subject, reply: Reply) {
    let sent = match wire::headers_from_wit(reply.headers) {
        Ok(Some(h)) => nats.publish_with_headers(to.clone(), h, reply.payload.into()).await,
        Ok(None) => nats.publish(to.clone(), reply.payload.into()).await,
        Err(e) => {
            tracing::warn!(handler = %manifest.name, tenant = %manifest.tenant, "reply not sent: {e:?}");
            return;
        }
    };
    if let Err(e) = sent {
        tracing::warn!(handler = %manifest.name, tenant = %manifest.tenant, "reply not sent: {e}");
    }
}

fn report(manifest: &Manifest, subject: &str, outcome: &Outcome) {
    let handler = manifest.name.as_str();
    let tenant = manifest.tenant.as_str();
    match outcome {
        Outcome::Ok => {}
        Outcome::Failed(HandlerError::Fail(why)) => {
            tracing::warn!(handler, tenant, subject, "handler failed: {why}")
        }
        Outcome::Failed(HandlerError::Retry(delay)) => {
            tracing::warn!(
                handler,
                tenant,
                subject,
                ?delay,
                "handler asked for a retry; core messages are not redelivered"
            )
        }
        Outcome::Trapped(why) => {
            tracing::error!(handler, tenant, subject, "handler trapped: {why}")
        }
        Outcome::MemoryLimit => tracing::error!(
            handler,
            tenant,
            subject,
            limit_bytes = manifest.limits.memory_bytes,
            "handler trapped after reaching its memory limit"
        ),
        Outcome::TimedOut => tracing::error!(
            handler,
            tenant,
            subject,
            timeout_ms = manifest.limits.timeout.as_millis() as u64,
            "handler stopped at its deadline"
        ),
        Outcome::OutOfFuel => {
            tracing::error!(handler, tenant, subject, fuel = manifest.limits.fuel, "handler ran out of fuel")
        }
    }
}

/// What every trigger needs to start invocations: the engine, the tenants,
/// the host-wide instance permits and the task tracker that shutdown waits
/// on. A trigger finds its tenant's connection on the handler.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    pub(crate) engine: Engine,
    /// Every tenant, for flushing and for handlers loaded by a reload.
    pub(crate) tenants: Arc<std::sync::Mutex<Tenants>>,
    /// One permit per pooled instance slot, so many handlers at their own
    /// concurrency limits can never exhaust the pool.
    pub(crate) instance_permits: Arc<tokio::sync::Semaphore>,
    pub(crate) invocations: tokio_util::task::TaskTracker,
    /// Fired when the shutdown deadline passes: running invocations are
    /// abandoned (their instances dropped mid-call).
    pub(crate) abandon: tokio_util::sync::CancellationToken,
    /// Where invocation spans go; `None` makes none.
    pub(crate) tracer: Option<Tracer>,
    /// One permit per standby instance ([`crate::limits::STANDBY_INSTANCES`]).
    pub(crate) standby_permits: Arc<tokio::sync::Semaphore>,
    /// The reuse-mode pools whose idle instances may give their permits up.
    pub(crate) idle_pools: Arc<pool::IdlePools>,
}

/// One admitted message's invocation, not yet started: see
/// [`Dispatcher::job`] and [`Dispatcher::start`].
pub(crate) struct ReadyJob<M> {
    /// Makes the job's future, in the box it will run in
    /// ([`SpareJob::fill`]).
    make: M,
    first_poll: FirstPoll,
    /// The job's [`Arrivals`], for a job that may reply on its trigger's
    /// task: the trigger looks before it polls the job on.
    arrivals: Option<Arrivals>,
}

/// What makes an admitted message's job: [`Dispatcher::job`]'s closure.
/// A trait of its own only so that the future it makes can be named.
pub(crate) trait MakeJob {
    /// The job's future.
    type Job: Future<Output = ()> + Send + 'static;
    /// Makes it.
    fn make(self) -> Self::Job;
}

impl<M, F> MakeJob for M
where
    M: FnOnce() -> F,
    F: Future<Output = ()> + Send + 'static,
{
    type Job = F;

    fn make(self) -> F {
        self()
    }
}

/// A connection's count of messages received, and its value when a job
/// that may reply on its trigger's task was made.
#[derive(Clone)]
struct Arrivals {
    stats: Arc<async_nats::Statistics>,
    seen: u64,
}

impl Arrivals {
    fn now(nats: &async_nats::Client) -> Arrivals {
        let stats = nats.statistics();
        let seen = stats.in_messages.load(Ordering::Relaxed);
        Arrivals { stats, seen }
    }

    /// Whether the connection has received no message since. It counts a
    /// message before it hands it to its subscription, so none is waiting
    /// for any trigger of the connection.
    fn none_since(&self) -> bool {
        self.stats.in_messages.load(Ordering::Relaxed) == self.seen
    }
}

/// Where a job is first polled ([`Dispatcher::start`] says why).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FirstPoll {
    /// On the trigger's task when the lanes are idle: reuse mode.
    Trigger,
    /// On the trigger's task when the lanes are idle, but only up to the
    /// instance work, which goes on in a lane: fresh mode, with the standby
    /// instance claimed at admission.
    TriggerThenLane,
    /// In a lane: fresh mode with no standby instance claimed (the job
    /// would instantiate first).
    Lane,
}

thread_local! {
    /// Whether the job being polled on this thread is polled by its
    /// trigger's task ([`poll_once`]), not by a lane.
    static ON_TRIGGER_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set by such a job while it waits for its reply to be written
    /// ([`Polled::AwaitsReplyWrite`]).
    static AWAITS_REPLY_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the invocation polling this is on its trigger's task: there, a
/// fresh-mode invocation stops after its call, so that the instance work
/// goes on in a lane and the trigger reads on.
fn on_trigger_task() -> bool {
    ON_TRIGGER_TASK.with(std::cell::Cell::get)
}

/// The box of a trigger's last job that finished on the trigger's task,
/// kept for its next one (a job that finished in a lane has its box handed
/// back by the lanes instead). A job's state is kilobytes (wasmtime's call
/// futures included), boxed so that handing it to a lane moves a pointer;
/// that size is past the allocator's per-thread cache, and allocating and
/// freeing it for every message was 3-4 % of the host's CPU in reuse mode.
///
/// Kept empty (its last job dropped), so that the next job is made
/// straight into it rather than made and then moved in: each move of a
/// job is a copy of all of it, and the three there were per message came
/// to about 1 000 instructions per message and 3 % of the workers' time in
/// core-sub-reuse (BENCHMARKS.md, "Counted instructions").
pub(crate) struct SpareJob<F>(Option<Box<MaybeUninit<F>>>);

impl<F> Default for SpareJob<F> {
    fn default() -> Self {
        SpareJob(None)
    }
}

impl<F: Future<Output = ()>> SpareJob<F> {
    /// The job `make` makes, made in the spare box, else in the box
    /// `returned` gives back, else in a new one.
    fn fill(&mut self, make: impl FnOnce() -> F, returned: impl FnOnce() -> Option<Pin<Box<F>>>) -> Pin<Box<F>> {
        let mut slot = match self.0.take() {
            Some(slot) => slot,
            None => returned().map_or_else(Box::new_uninit, emptied),
        };
        slot.write(make());
        // SAFETY: written just above.
        Box::into_pin(unsafe { slot.assume_init() })
    }

    /// Keeps the box of a job that finished.
    fn keep(&mut self, done: Pin<Box<F>>) {
        self.0 = Some(emptied(done));
    }
}

/// The box of `job`, its future dropped.
fn emptied<F>(job: Pin<Box<F>>) -> Box<MaybeUninit<F>> {
    // SAFETY: the future is dropped where it is before its memory can be
    // used again, as `Pin` requires, and nothing reads it afterwards.
    // `MaybeUninit<F>` has `F`'s layout, so the box frees the allocation
    // with the layout it was made with.
    unsafe {
        let raw = Box::into_raw(Pin::into_inner_unchecked(job));
        std::ptr::drop_in_place(raw);
        Box::from_raw(raw.cast::<MaybeUninit<F>>())
    }
}

/// The permits an admitted message holds until its invocation ends.
pub(crate) struct Admission {
    _handler: tokio::sync::OwnedSemaphorePermit,
    /// The tenant's and the host's instance permits; taken over by the
    /// instance when it is kept for reuse.
    slot: Option<pool::InstanceSlot>,
    /// The instance the message runs on, when one was waiting: in reuse
    /// mode an idle one (`slot` is then the permits it held), in fresh mode
    /// the standby one (which `slot` counts from here).
    claimed: Option<pool::Claimed>,
}

impl Dispatcher {
    /// Waits until `handler` may start one more invocation. While this
    /// waits, the trigger reads no more messages: that is the back-pressure.
    pub(crate) async fn admit(&self, handler: &LoadedHandler) -> Admission {
        // A free permit is taken without making a waiter for the queue:
        // tokio's `Acquire`, made, polled and dropped for every message, was
        // about 250 instructions per message (BENCHMARKS.md, "Counted
        // instructions"). A permit is only free when nobody waits for one,
        // so this never overtakes a waiting trigger.
        let handler_permit = match handler.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            // The semaphores are never closed, so acquiring cannot fail.
            #[allow(clippy::expect_used)]
            Err(_) => handler.permits.clone().acquire_owned().await.expect("handler semaphore is never closed"),
        };
        self.admit_reserved(handler, handler_permit).await
    }

    /// Like [`Self::admit`], for a trigger that reserved the handler's
    /// permit itself (a JetStream pull asks for as many messages as it holds
    /// permits).
    ///
    /// The tenant's permit comes before the host's: a tenant at its limit
    /// waits on its own semaphore, and the host pool (sized to fit every
    /// tenant's share) is never what one tenant's load fills.
    ///
    /// In reuse mode an idle instance of the handler, when there is one,
    /// serves instead, with the permits it holds: idle instances keep their
    /// permits, so once the handler has run as many instances as its tenant
    /// or the host allows, its next messages can only run on those. That
    /// is also why a message waiting for permits stops waiting as soon as
    /// one of the handler's instances goes idle. In fresh mode the message
    /// claims the handler's standby instance, when one is ready, once it has
    /// its permits.
    pub(crate) async fn admit_reserved(
        &self,
        handler: &LoadedHandler,
        handler_permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Admission {
        let idle = match &handler.instances {
            pool::Instances::Reuse(idle) => idle,
            pool::Instances::Fresh(standby) => {
                let slot = self.instance_slot(handler).await;
                // Claimed now, so that the job knows whether its call can
                // start on the trigger's task ([`Dispatcher::start`]).
                return Admission { _handler: handler_permit, slot: Some(slot), claimed: standby.claim() };
            }
        };
        loop {
            if let Some((claimed, slot)) = idle.admit() {
                return Admission { _handler: handler_permit, slot: Some(slot), claimed: Some(claimed) };
            }
            tokio::select! {
                slot = self.instance_slot(handler) => {
                    return Admission { _handler: handler_permit, slot: Some(slot), claimed: None };
                }
                () = idle.returned() => {}
            }
        }
    }

    /// Waits for the permits of one more live instance of `handler`. When
    /// none is free, an idle instance gives its permits up first (the
    /// tenant's own for the tenant's limit, anyone's for the host's): see
    /// [`pool::IdlePools`].
    async fn instance_slot(&self, handler: &LoadedHandler) -> pool::InstanceSlot {
        if !handler.tenant.has_instance_free() {
            self.idle_pools.evict_one(Some(&handler.tenant));
        }
        let tenant = handler.tenant.admit().await;
        if self.instance_permits.available_permits() == 0 {
            self.idle_pools.evict_one(None);
        }
        #[allow(clippy::expect_used)]
        let host = self.instance_permits.clone().acquire_owned().await.expect("instance semaphore is never closed");
        pool::InstanceSlot { _tenant: tenant, _host: host }
    }

    /// Flushes every tenant's connection and waits until the server has
    /// read what was sent on it: what invocations sent, and new
    /// subscriptions (so a message published once start or a reload returns
    /// finds them). Returns whether every connection confirmed within
    /// [`FLUSH_TIMEOUT`]: a server that is gone never confirms, and must not
    /// hold up shutdown or a reload.
    pub(crate) async fn flush(&self) -> bool {
        let connections = self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner).connections();
        let flushes = futures::future::join_all(connections.iter().map(round_trip));
        let Ok(results) = tokio::time::timeout(FLUSH_TIMEOUT, flushes).await else {
            tracing::warn!(
                "NATS did not confirm a flush within {FLUSH_TIMEOUT:?}; messages sent just before may not have \
                 reached the server (JetStream messages are redelivered), and a connection whose user may not \
                 publish to and subscribe on its own inbox (_INBOX.>) can never confirm one"
            );
            return false;
        };
        let mut ok = true;
        for e in results.into_iter().filter_map(Result::err) {
            tracing::warn!("cannot flush a NATS connection: {e}");
            ok = false;
        }
        ok
    }

    /// Starts `job` (made by [`Dispatcher::job`]), boxed in the trigger's
    /// `spare` box when it has one.
    ///
    /// The invocation runs in one of the trigger's `lanes`, except that,
    /// when the lanes are idle, it is first polled here, on the trigger's
    /// task: the hand-off to a lane, on another worker thread, costs about
    /// as much as the call itself (a fifth to a quarter of the CPU per
    /// message in core-sub-reuse and jetstream-ack-reuse), and in fresh
    /// mode it came before every request's call (BENCHMARKS.md, "The call
    /// on the trigger's task in fresh mode too"). A reuse-mode invocation
    /// mostly finishes in that poll (a reused instance, no host call that
    /// waits). A fresh-mode one is polled here only when its message
    /// claimed the standby instance at admission, and stops after its
    /// call: its instance work (the drop and the next standby
    /// instantiation, ~20 µs in place) must spread over the worker threads,
    /// and run on the trigger's task it cost core-sub a sixth of its
    /// throughput.
    /// The trigger yields before it hands that on, so that the connection
    /// task writes the reply before the lane is woken.
    ///
    /// Except after a reply: there the job waits for the connection task
    /// to write it (a flush, whose completion wakes the trigger's task from
    /// the connection task's own poll), then, if no message has arrived on
    /// the connection since the job was made, does its instance work right
    /// here. A yield would do the ordering as well, but tokio wakes a yielded
    /// task only once its worker has looked for other work, and a worker
    /// that looked wakes the other worker when it then finds the yielded
    /// task: one needless wake-up of a parked thread per request. A lane
    /// woken after the reply costs the same wake-up another way (tokio runs
    /// at most three tasks in a row from its LIFO slot; the connection, the
    /// trigger, the connection again, then the lane goes to the queue and
    /// another worker is woken for it). In req-reply-128 and req-reply-16k
    /// this took the CPU per request down by about a fifth and brought p50
    /// and p99 closer to native's (BENCHMARKS.md, "Waking the other worker
    /// after each reply"). When messages are waiting, the instance work goes
    /// to a lane as before, so that the trigger reads them.
    ///
    /// One that is still pending (the instance work, a host call waits,
    /// the guest yielded at an epoch tick, or the trigger task's
    /// cooperative budget ran out) moves on to a lane, which polls it again
    /// and so takes over its wake-ups, and while it runs there the lanes
    /// are not idle, so the next messages go to lanes too and the trigger
    /// keeps reading.
    ///
    /// Always in a lane: the invocations of a tenant with threads of its own
    /// (configured tenants get them by default): its lanes run on those
    /// threads, the trigger's task runs on the host's, and the tenant's
    /// guests must not.
    ///
    /// The job is boxed when this is called, not when the returned future is
    /// first polled: its state is kilobytes, and an `async fn` would first
    /// move it into its own future, then out of that into the box, two
    /// copies of all of it per message. It is made in the box, too, not
    /// made and moved in ([`SpareJob`]).
    pub(crate) fn start<'a, M: MakeJob>(
        &'a self,
        lanes: &'a lanes::Lanes<M::Job>,
        job: ReadyJob<M>,
        spare: &'a mut SpareJob<M::Job>,
    ) -> impl Future<Output = ()> + 'a {
        let ReadyJob { make, first_poll, arrivals } = job;
        let mut boxed = spare.fill(|| make.make(), || lanes.returned_box());
        async move {
            if first_poll != FirstPoll::Lane && lanes.idle_on_host_threads() {
                let finished = match poll_once(boxed.as_mut()).await {
                    Polled::Finished => true,
                    Polled::AwaitsReplyWrite => {
                        woken().await;
                        let quiet = arrivals.as_ref().is_some_and(Arrivals::none_since);
                        quiet && lanes.idle_on_host_threads() && poll_once(boxed.as_mut()).await == Polled::Finished
                    }
                    Polled::Pending => {
                        if first_poll == FirstPoll::TriggerThenLane {
                            tokio::task::yield_now().await;
                        }
                        false
                    }
                };
                if finished {
                    spare.keep(boxed);
                    return;
                }
            }
            lanes.run(boxed, &self.invocations);
        }
    }

    /// The whole of one invocation as a future, for [`Dispatcher::start`]:
    /// `delivery` run through `handler`, holding `admission` until it ends,
    /// in its span (`origin` is what the trigger knows about the message's
    /// source), cut off at the shutdown deadline. Returns what makes that
    /// future, for [`Dispatcher::start`] to make it where it will run.
    pub(crate) fn job(
        self: &Arc<Self>,
        handler: Arc<LoadedHandler>,
        origin: Arc<Origin>,
        delivery: Delivery,
        mut admission: Admission,
    ) -> ReadyJob<impl MakeJob> {
        let first_poll = match (&handler.instances, &admission.claimed) {
            (pool::Instances::Reuse(_), _) => FirstPoll::Trigger,
            (pool::Instances::Fresh(_), Some(_)) => FirstPoll::TriggerThenLane,
            (pool::Instances::Fresh(_), None) => FirstPoll::Lane,
        };
        let arrivals = match (&delivery, first_poll) {
            (Delivery::Core(msg), FirstPoll::TriggerThenLane) if msg.reply.is_some() => {
                Some(Arrivals::now(&handler.tenant.nats))
            }
            _ => None,
        };
        let trigger_arrivals = arrivals.clone();
        // One reference count, not a clone of every field: cloning the
        // cancellation token takes a lock, and the engine's cache path
        // would be copied, for every message.
        let this = Arc::clone(self);
        // Counts as a task of the tracker, so shutdown waits for (and
        // counts) invocations, wherever they run.
        let tracked = self.invocations.token();
        let make = move || async move {
            let trace = this.tracer.as_ref().map(|tracer| match &delivery {
                Delivery::Core(msg) => span::InvocationSpan::new(&handler, msg, &origin).start(tracer),
                Delivery::JetStream(received, _) => {
                    let mut s = span::InvocationSpan::new(&handler, &received.msg, &origin);
                    if let Some(info) = &received.info {
                        s = s.jetstream(span::JetStreamMeta {
                            stream_sequence: info.stream_sequence,
                            delivered: info.delivered,
                        });
                    }
                    s.start(tracer)
                }
            });
            {
                // Pinned where it is made and from then on used by reference:
                // the invocation's state is kilobytes, and each move of it by
                // value (into a wrapper, into `select!`) would copy all of it.
                let mut invocation = std::pin::pin!(invoke(&this, &handler, delivery, trace.as_ref(), &mut admission));
                // Current while the invocation is polled, so guest stdout and
                // stderr lines find their span.
                let run = async {
                    match &trace {
                        Some(trace) => invocation.as_mut().with_context(trace.context().clone()).await,
                        None => invocation.as_mut().await,
                    }
                };
                tokio::select! {
                    // The invocation first: most finish in their first poll,
                    // without ever registering with the cancellation token.
                    biased;
                    () = run => {}
                    () = this.abandon.cancelled() => {
                        if let Some(trace) = &trace {
                            span::record_abandoned(trace);
                        }
                        tracing::error!(handler = %handler.manifest.name, tenant = %handler.manifest.tenant,
                            "invocation abandoned: still running at the shutdown deadline");
                    }
                }
            }
            if let Some(trace) = &trace {
                trace.end();
            }
            drop(admission);
            this.idle_pools.list(&handler);
            // The next message of this handler will find its instance made.
            // Still a tracked task, so shutdown does not drop the engine
            // from under it.
            if let pool::Instances::Fresh(standby) = &handler.instances {
                give_way_to_arrivals(arrivals.as_ref()).await;
                let calls = || {
                    let deadline = Instant::now() + handler.manifest.limits.timeout;
                    let message = MessageCalls { deadline, jetstream: None, trace: None };
                    (!this.abandon.is_cancelled()).then(|| handler.calls(message))
                };
                standby.refill(&this.engine, &handler.compiled.pre, &this.standby_permits, calls).await;
            }
            drop(tracked);
        };
        ReadyJob { make, first_poll, arrivals: trigger_arrivals }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job of any type, as the tests below make several.
    type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

    #[tokio::test]
    async fn poll_once_tells_finished_from_pending_and_survives_a_panic() {
        let mut done: Job = Box::pin(async {});
        assert_eq!(poll_once(done.as_mut()).await, Polled::Finished, "a job that finishes in its first poll");

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut waiting: Job = Box::pin(async move {
            let _ = rx.await;
        });
        assert_eq!(poll_once(waiting.as_mut()).await, Polled::Pending, "a job that waits is still pending");
        // Moved on, it finishes where it is polled next.
        let _ = tx.send(());
        waiting.await;

        let mut panicking: Job = Box::pin(async { panic!("a host bug") });
        assert_eq!(poll_once(panicking.as_mut()).await, Polled::Finished, "a panic ends that job, not the caller");
    }

    #[tokio::test]
    async fn a_job_waiting_for_its_reply_write_says_so_and_wakes_its_trigger() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut job: Job = Box::pin(async move {
            AWAITS_REPLY_WRITE.with(|a| a.set(true));
            let _ = rx.await;
            AWAITS_REPLY_WRITE.with(|a| a.set(false));
        });
        assert_eq!(poll_once(job.as_mut()).await, Polled::AwaitsReplyWrite);
        assert!(!AWAITS_REPLY_WRITE.with(std::cell::Cell::get), "read once, then cleared");
        // The trigger waits in `woken` until the job's wake-up (here the
        // "write") brings it back, then polls the job on.
        let wake = tokio::spawn(async move {
            tokio::task::yield_now().await;
            let _ = tx.send(());
        });
        woken().await;
        assert_eq!(poll_once(job.as_mut()).await, Polled::Finished);
        wake.await.unwrap();
    }

    #[tokio::test]
    async fn a_job_knows_whether_its_trigger_is_polling_it() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        let mut job: Job = Box::pin(async move {
            record.lock().unwrap().push(on_trigger_task());
            tokio::task::yield_now().await;
            record.lock().unwrap().push(on_trigger_task());
        });
        assert_eq!(poll_once(job.as_mut()).await, Polled::Pending, "the job yielded");
        assert!(!on_trigger_task(), "only while the trigger polls");
        // Polled on, as a lane would.
        job.await;
        assert_eq!(*seen.lock().unwrap(), [true, false]);
    }

    #[tokio::test]
    async fn a_finished_jobs_box_carries_the_next_job() {
        let runs = Arc::new(AtomicU64::new(0));
        let job = |n: u64| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(n, Ordering::Relaxed);
            }
        };
        let mut spare = SpareJob::default();
        let mut first = spare.fill(|| job(1), || None);
        let allocation = std::ptr::from_ref(&*first).addr();
        first.as_mut().await;
        spare.keep(first);
        let mut second = spare.fill(|| job(10), || None);
        assert_eq!(std::ptr::from_ref(&*second).addr(), allocation, "no new box");
        second.as_mut().await;
        assert_eq!(runs.load(Ordering::Relaxed), 11, "both jobs ran, each once");
        // Without a spare, a new box.
        let mut third = spare.fill(|| job(100), || None);
        third.as_mut().await;
        assert_eq!(runs.load(Ordering::Relaxed), 111);
        // A box handed back by the lanes carries the next job too.
        let returned = std::ptr::from_ref(&*third).addr();
        let fourth = spare.fill(|| job(1000), || Some(third));
        assert_eq!(std::ptr::from_ref(&*fourth).addr(), returned, "the returned box");
        assert_eq!(runs.load(Ordering::Relaxed), 111, "made, not run");
        fourth.await;
        assert_eq!(runs.load(Ordering::Relaxed), 1111);
    }

    #[test]
    fn a_kept_box_drops_what_its_job_still_held() {
        let held = Arc::new(());
        let job = |held: Option<Arc<()>>| async move {
            drop(held);
        };
        let mut spare = SpareJob::default();
        let never_run = spare.fill(|| job(Some(held.clone())), || None);
        assert_eq!(Arc::strong_count(&held), 2);
        spare.keep(never_run);
        assert_eq!(Arc::strong_count(&held), 1, "dropped when kept, not leaked in the box");
        let next = spare.fill(|| job(None), || None);
        drop(next);
        assert_eq!(Arc::strong_count(&held), 1);
    }
}
