//! Dispatch: runs one invocation of a handler for one message, from a fresh
//! instance to the applied outcome.
//!
//! The steps, in order: give the invocation a deadline, make a store with the
//! handler's memory limit, instantiate from the handler's `InstancePre`, call
//! `handle`, and apply what it returned (publish the reply, or count and log
//! the failure). The instance is dropped at the end: nothing a guest does
//! survives into the next message.
//!
//! Dispatch never decides *whether* to run: triggers hold the concurrency
//! permits, so by the time a message gets here it has a slot.
//!
//! Each invocation runs inside its span (see `span`), which host calls
//! parent their own spans on and which carries the outcome.

mod span;

pub(crate) use span::Origin;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::time::Instant;
use tracing::Instrument;

use crate::bindings::{HandlerError, Reply};
use crate::engine::{Compiled, Engine};
use crate::manifest::Manifest;
use crate::wire;

/// A handler ready to run: its manifest, its compiled component, and the
/// counters dispatch keeps for it.
pub struct LoadedHandler {
    /// The validated manifest.
    pub manifest: Arc<Manifest>,
    /// The compiled component and its version digest.
    pub compiled: Compiled,
    pub(crate) permits: Arc<tokio::sync::Semaphore>,
    pub(crate) stats: Stats,
}

impl LoadedHandler {
    pub(crate) fn new(manifest: Manifest, compiled: Compiled) -> Self {
        let permits = Arc::new(tokio::sync::Semaphore::new(
            manifest.limits.max_concurrency as usize,
        ));
        LoadedHandler {
            manifest: Arc::new(manifest),
            compiled,
            permits,
            stats: Stats::default(),
        }
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
        }
    }

    fn started(&self) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::Relaxed);
    }

    fn finished(&self, outcome: &Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let counter = match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Failed(_) => &self.failed,
            Outcome::Trapped(_) => &self.trapped,
            Outcome::MemoryLimit => &self.memory_limit,
            Outcome::TimedOut => &self.timed_out,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `handler` for `msg` on a fresh instance and applies the outcome.
/// `span` is the invocation's span (the caller runs this inside it); host
/// calls parent their spans on it.
pub(crate) async fn invoke(
    engine: &Engine,
    nats: &async_nats::Client,
    handler: &LoadedHandler,
    msg: async_nats::Message,
    span: &tracing::Span,
) {
    handler.stats.started();
    let manifest = &handler.manifest;
    let subject = msg.subject.clone();
    let reply_to = msg.reply.clone();

    let deadline = Instant::now() + manifest.limits.timeout;
    let mut store = engine.store(manifest.clone(), nats.clone(), deadline, span.clone());
    let wit_msg = wire::message_to_wit(msg);

    // The epoch callback stops guests that compute past the deadline; this
    // timeout stops those that wait past it (in a host call or a sleep).
    let run = async {
        let instance = handler.compiled.pre.instantiate_async(&mut store).await?;
        instance.call_handle(&mut store, &wit_msg).await
    };
    let result = tokio::time::timeout_at(deadline, run).await;
    let outcome = match result {
        Err(_elapsed) => Outcome::TimedOut,
        Ok(Err(err)) => classify_trap(&err, store.data().hit_memory_limit()),
        Ok(Ok(Err(handler_error))) => Outcome::Failed(handler_error),
        Ok(Ok(Ok(reply))) => {
            if let (Some(reply), Some(to)) = (reply, reply_to) {
                send_reply(nats, manifest, &to, reply).await;
            }
            Outcome::Ok
        }
    };
    drop(store);

    span::record_outcome(span, handler, &outcome);
    if !matches!(outcome, Outcome::Ok) {
        report(manifest, subject.as_str(), &outcome);
    }
    handler.stats.finished(&outcome);
}

/// Names what stopped a guest. An interrupt can only be the deadline; a
/// trap after a refused memory growth is the memory limit, whatever
/// instruction the guest trapped on afterwards.
fn classify_trap(err: &wasmtime::Error, hit_memory_limit: bool) -> Outcome {
    if let Some(wasmtime::Trap::Interrupt) = err.downcast_ref::<wasmtime::Trap>() {
        return Outcome::TimedOut;
    }
    if hit_memory_limit {
        return Outcome::MemoryLimit;
    }
    Outcome::Trapped(format!("{err:#}"))
}

async fn send_reply(
    nats: &async_nats::Client,
    manifest: &Manifest,
    to: &async_nats::Subject,
    reply: Reply,
) {
    let sent = match wire::headers_from_wit(reply.headers) {
        Ok(Some(h)) => {
            nats.publish_with_headers(to.clone(), h, reply.payload.into())
                .await
        }
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
    }
}

/// What every trigger needs to start invocations: the engine, the tenant's
/// connection, the host-wide instance permits and the task tracker that
/// shutdown waits on.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    pub(crate) engine: Engine,
    pub(crate) nats: async_nats::Client,
    /// One permit per pooled instance slot, so many handlers at their own
    /// concurrency limits can never exhaust the pool.
    pub(crate) instance_permits: Arc<tokio::sync::Semaphore>,
    pub(crate) invocations: tokio_util::task::TaskTracker,
    /// Fired when the shutdown deadline passes: running invocations are
    /// abandoned (their instances dropped mid-call).
    pub(crate) abandon: tokio_util::sync::CancellationToken,
}

/// The permits an admitted message holds until its invocation ends.
pub(crate) struct Admission {
    _handler: tokio::sync::OwnedSemaphorePermit,
    _instance: tokio::sync::OwnedSemaphorePermit,
}

impl Dispatcher {
    /// Waits until `handler` may start one more invocation. While this
    /// waits, the trigger reads no more messages: that is the back-pressure.
    pub(crate) async fn admit(&self, handler: &LoadedHandler) -> Admission {
        // The semaphores are never closed, so acquiring cannot fail.
        #[allow(clippy::expect_used)]
        let handler_permit = handler
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("handler semaphore is never closed");
        #[allow(clippy::expect_used)]
        let instance = self
            .instance_permits
            .clone()
            .acquire_owned()
            .await
            .expect("instance semaphore is never closed");
        Admission {
            _handler: handler_permit,
            _instance: instance,
        }
    }

    /// Runs `msg` through `handler` in its own task, holding `admission`
    /// until it ends. `origin` is what the trigger knows about the message's
    /// source, for the invocation's span.
    pub(crate) fn spawn(
        &self,
        handler: Arc<LoadedHandler>,
        origin: Arc<Origin>,
        msg: async_nats::Message,
        admission: Admission,
    ) {
        let this = self.clone();
        self.invocations.spawn(async move {
            let span = span::InvocationSpan::new(&handler, &msg, &origin).start();
            let run = invoke(&this.engine, &this.nats, &handler, msg, &span);
            tokio::select! {
                () = run.instrument(span.clone()) => {}
                () = this.abandon.cancelled() => {
                    span::record_abandoned(&span);
                    tracing::error!(handler = %handler.manifest.name, tenant = %handler.manifest.tenant,
                        "invocation abandoned: still running at the shutdown deadline");
                }
            }
            drop(admission);
        });
    }
}
