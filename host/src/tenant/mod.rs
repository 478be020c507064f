//! Tenants: the fences between owners of handlers that share one host.
//!
//! Each tenant has its own NATS connection (so the server's accounts keep
//! tenants' subjects, streams and buckets apart), its own permits for
//! concurrent instances, a budget for the linear memory of all its live
//! instances, a rate limit on sends, a payload ceiling, and optionally its
//! own threads for running guests. Nothing a tenant can exhaust is shared
//! with another: the host-wide instance pool is sized so that every
//! tenant's share fits in it (the config is rejected otherwise).
//!
//! Without a host config there is one tenant, `default`, on the host's
//! connection and threads with no tenant-wide limits; manifests may then
//! name any tenant, and each such name gets an unlimited tenant on the
//! host's connection (tenancy as labelling only).

pub mod config;
mod connect;
mod rate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::hostcalls::Buckets;
use crate::manifest::{Manifest, TenantId};
use config::{TenantConfig, TenantLimits};
use rate::RateLimiter;

/// Why a tenant could not start. Its handlers are not loaded; the other
/// tenants are unaffected.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// A credential or certificate could not be read.
    #[error("tenant `{tenant}`: {field}: {problem}")]
    Secret {
        /// The tenant.
        tenant: TenantId,
        /// The config field naming the secret.
        field: String,
        /// What is wrong (never the secret's value).
        problem: String,
    },
    /// The server refused the tenant or could not be reached.
    #[error("tenant `{tenant}`: cannot connect to {url}: {source}")]
    Connect {
        /// The tenant.
        tenant: TenantId,
        /// The URL tried.
        url: String,
        /// The client's error.
        source: async_nats::ConnectError,
    },
    /// A bucket the tenant declares could not be created.
    #[error("tenant `{tenant}`: cannot create bucket `{bucket}`: {reason}")]
    Bucket {
        /// The tenant.
        tenant: TenantId,
        /// The bucket.
        bucket: String,
        /// The server's answer.
        reason: String,
    },
    /// The tenant's guest threads could not be started.
    #[error("tenant `{tenant}`: cannot start its threads: {source}")]
    Threads {
        /// The tenant.
        tenant: TenantId,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Linear memory of all of a tenant's live instances, against its budget.
pub(crate) struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    /// Reserves `bytes` if the budget has room.
    pub(crate) fn try_reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    /// Gives back what an instance reserved, when it is dropped.
    pub(crate) fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }

    fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Counters of one tenant, across all its handlers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantStats {
    /// Host calls refused by a handler's permissions.
    pub denied: u64,
    /// Sends refused by the tenant's publish rate.
    pub rate_limited: u64,
    /// Host calls refused for carrying more than the tenant's payload limit.
    pub too_large: u64,
    /// Memory growths refused because the tenant's budget was spent.
    pub memory_refused: u64,
    /// Linear memory its live instances hold now, in bytes.
    pub memory_in_use: u64,
    /// Guest log lines dropped for going over the tenant's log rate.
    pub logs_dropped: u64,
}

#[derive(Default)]
struct Counters {
    denied: AtomicU64,
    rate_limited: AtomicU64,
    too_large: AtomicU64,
    memory_refused: AtomicU64,
    logs_dropped: AtomicU64,
}

/// A running tenant: its connection, limits and permits.
pub struct Tenant {
    pub(crate) id: TenantId,
    pub(crate) nats: async_nats::Client,
    /// Whether the host opened (and so drains) the connection.
    owns_connection: bool,
    pub(crate) buckets: Arc<Buckets>,
    pub(crate) limits: TenantLimits,
    instances: Option<Arc<Semaphore>>,
    pub(crate) memory: Option<Arc<MemoryBudget>>,
    rate: Option<RateLimiter>,
    log_rate: Option<RateLimiter>,
    runtime: Option<GuestThreads>,
    counters: Counters,
}

/// A tenant's own runtime for guest code, so its CPU-bound guests compete
/// with each other, not with other tenants' guests or the host's NATS I/O.
struct GuestThreads(Option<tokio::runtime::Runtime>);

impl Drop for GuestThreads {
    fn drop(&mut self) {
        // The last reference may go away on an async worker, where blocking
        // on the runtime's threads is not allowed.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// How much less CPU weight guest threads get than the host's own threads
/// (a nice value; each step is about 10% less weight under Linux's fair
/// scheduler).
const GUEST_NICENESS: libc::c_int = 5;

/// Lowers the calling thread's scheduling priority. Guest threads run at a
/// lower priority than the host's NATS I/O, so a tenant's CPU-bound guests
/// delay the delivery of other tenants' messages as little as the kernel
/// can manage; among themselves, tenants' threads share the CPU fairly.
fn lower_priority() {
    // On Linux, PRIO_PROCESS with who = 0 applies to the calling thread
    // only. Failing leaves the thread at normal priority, which is safe.
    // SAFETY: setpriority has no memory-safety preconditions.
    let ok = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, GUEST_NICENESS) } == 0;
    if !ok {
        tracing::debug!("cannot lower a guest thread's priority: {}", std::io::Error::last_os_error());
    }
}

impl Tenant {
    /// A tenant on an existing connection, without its own threads.
    pub(crate) fn on_connection(id: TenantId, nats: async_nats::Client, limits: TenantLimits) -> Tenant {
        Tenant {
            id,
            buckets: Arc::new(Buckets::new(nats.clone())),
            nats,
            owns_connection: false,
            instances: limits.max_instances.map(|n| Arc::new(Semaphore::new(n as usize))),
            memory: limits.memory_bytes.map(|limit| Arc::new(MemoryBudget { limit, used: AtomicUsize::new(0) })),
            rate: limits.publish_rate.map(RateLimiter::new),
            log_rate: limits.log_rate.map(RateLimiter::new),
            limits,
            runtime: None,
            counters: Counters::default(),
        }
    }

    /// Connects `config`'s tenant (to `default_url` unless it names its
    /// own), creates its buckets and starts its threads.
    pub(crate) async fn start(config: &TenantConfig, default_url: &str) -> Result<Tenant, TenantError> {
        let nats = connect::connect(config, default_url).await?;
        let js = async_nats::jetstream::new(nats.clone());
        for spec in &config.buckets {
            spec.ensure(&js).await.map_err(|reason| TenantError::Bucket {
                tenant: config.id.clone(),
                bucket: spec.name.to_string(),
                reason,
            })?;
        }
        let mut tenant = Tenant::on_connection(config.id.clone(), nats, config.limits.clone());
        tenant.owns_connection = true;
        if let Some(threads) = config.threads {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(format!("natsfn-{}", config.id))
                .on_thread_start(lower_priority)
                .enable_all()
                .build()
                .map_err(|source| TenantError::Threads { tenant: config.id.clone(), source })?;
            tenant.runtime = Some(GuestThreads(Some(rt)));
        }
        Ok(tenant)
    }

    /// The tenant's id.
    pub fn id(&self) -> &TenantId {
        &self.id
    }

    /// The runtime of the tenant's own guest threads, when it has them.
    pub(crate) fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().and_then(|t| t.0.as_ref()).map(|rt| rt.handle().clone())
    }

    /// Waits for one of the tenant's instance permits (immediately `None`
    /// when the tenant has no instance limit).
    pub(crate) async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let sem = self.instances.as_ref()?;
        // Never closed, so acquiring cannot fail.
        sem.clone().acquire_owned().await.ok()
    }

    /// Whether one of the tenant's instance permits is free, or it has no
    /// instance limit: then [`Tenant::admit`] does not wait.
    pub(crate) fn has_instance_free(&self) -> bool {
        self.instances.as_ref().is_none_or(|sem| sem.available_permits() > 0)
    }

    /// Brings a handler's limits within the tenant's: memory, concurrency
    /// and timeout are lowered to the tenant's ceilings, and the tenant's
    /// fuel applies when the handler sets none. Returns what was lowered, as
    /// `field: from -> to`, for the load log.
    pub(crate) fn cap(&self, manifest: &mut Manifest) -> Vec<String> {
        let mut lowered = Vec::new();
        let l = &mut manifest.limits;
        if let Some(max) = self.limits.memory_bytes {
            if l.memory_bytes > max {
                lowered.push(format!("limits.memory_mb: {} -> {}", l.memory_bytes >> 20, max >> 20));
                l.memory_bytes = max;
            }
        }
        if let Some(max) = self.limits.max_instances {
            if l.max_concurrency > max {
                lowered.push(format!("limits.max_concurrency: {} -> {max}", l.max_concurrency));
                l.max_concurrency = max;
            }
        }
        if let Some(max) = self.limits.max_timeout {
            if l.timeout > max {
                lowered.push(format!("limits.timeout_ms: {} -> {}", l.timeout.as_millis(), max.as_millis()));
                l.timeout = max;
            }
        }
        l.fuel = match (l.fuel, self.limits.fuel) {
            (Some(own), Some(max)) if own > max => {
                lowered.push(format!("limits.fuel: {own} -> {max}"));
                Some(max)
            }
            (own, max) => own.or(max),
        };
        lowered
    }

    /// Takes a send from the rate budget; `false` when it is spent.
    pub(crate) fn may_send(&self) -> bool {
        let ok = self.rate.as_ref().is_none_or(RateLimiter::try_take);
        if !ok {
            self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Whether a host call may carry `len` bytes.
    pub(crate) fn payload_fits(&self, len: usize) -> Result<(), u64> {
        match self.limits.max_payload {
            Some(max) if len > max => {
                self.counters.too_large.fetch_add(1, Ordering::Relaxed);
                Err(max as u64)
            }
            _ => Ok(()),
        }
    }

    /// Takes a guest log line from the tenant's log budget. When it is
    /// spent the line is dropped and counted; the first drop and every
    /// 10,000th after it are reported, so the report cannot flood the log.
    pub(crate) fn may_log(&self) -> bool {
        if self.log_rate.as_ref().is_none_or(RateLimiter::try_take) {
            return true;
        }
        if self.counters.logs_dropped.fetch_add(1, Ordering::Relaxed).is_multiple_of(10_000) {
            tracing::warn!(tenant = %self.id, "guest log lines over the tenant's log_rate are being dropped");
        }
        false
    }

    pub(crate) fn count_denied(&self) {
        self.counters.denied.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_memory_refused(&self) {
        self.counters.memory_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of the tenant's counters.
    pub fn stats(&self) -> TenantStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TenantStats {
            denied: get(&self.counters.denied),
            rate_limited: get(&self.counters.rate_limited),
            too_large: get(&self.counters.too_large),
            memory_refused: get(&self.counters.memory_refused),
            memory_in_use: self.memory.as_ref().map_or(0, |m| m.used() as u64),
            logs_dropped: get(&self.counters.logs_dropped),
        }
    }
}

/// Every tenant of a host, and those that failed to start.
pub(crate) struct Tenants {
    running: BTreeMap<TenantId, Arc<Tenant>>,
    failed: BTreeMap<TenantId, String>,
    /// The host's own connection, when it has one: tenants invented by
    /// manifests (no host config) run on it.
    shared: Option<async_nats::Client>,
}

/// A handler names a tenant the host cannot give it.
#[derive(Debug, thiserror::Error)]
pub enum UnknownTenant {
    /// The tenant is not declared in the host config.
    #[error("tenant `{tenant}` is not declared in the host config (declared: {declared})")]
    NotDeclared {
        /// The tenant the manifest names.
        tenant: TenantId,
        /// The declared tenants, comma-separated.
        declared: String,
    },
    /// The tenant is declared but did not start.
    #[error("tenant `{tenant}` did not start: {reason}")]
    NotStarted {
        /// The tenant.
        tenant: TenantId,
        /// Why it did not start.
        reason: String,
    },
}

impl Tenants {
    /// Tenants on one shared connection, created as manifests name them.
    pub(crate) fn shared(nats: async_nats::Client) -> Tenants {
        Tenants { running: BTreeMap::new(), failed: BTreeMap::new(), shared: Some(nats) }
    }

    /// Starts every tenant of `configs` concurrently. Those that fail are
    /// kept with their error, which their handlers' load errors repeat.
    pub(crate) async fn start(configs: &[TenantConfig], default_url: &str) -> (Tenants, Vec<TenantError>) {
        let started = futures::future::join_all(configs.iter().map(|c| Tenant::start(c, default_url))).await;
        let mut tenants = Tenants { running: BTreeMap::new(), failed: BTreeMap::new(), shared: None };
        let mut errors = Vec::new();
        for (config, result) in configs.iter().zip(started) {
            match result {
                Ok(t) => {
                    tracing::info!(tenant = %config.id, "tenant connected");
                    tenants.running.insert(config.id.clone(), Arc::new(t));
                }
                Err(e) => {
                    tracing::error!("{e}");
                    tenants.failed.insert(config.id.clone(), e.to_string());
                    errors.push(e);
                }
            }
        }
        (tenants, errors)
    }

    /// The tenant `id`, made on the shared connection if there is one and
    /// the tenant is new.
    pub(crate) fn get(&mut self, id: &TenantId) -> Result<Arc<Tenant>, UnknownTenant> {
        if let Some(t) = self.running.get(id) {
            return Ok(t.clone());
        }
        if let Some(reason) = self.failed.get(id) {
            return Err(UnknownTenant::NotStarted { tenant: id.clone(), reason: reason.clone() });
        }
        match &self.shared {
            Some(nats) => {
                let t = Arc::new(Tenant::on_connection(id.clone(), nats.clone(), TenantLimits::default()));
                self.running.insert(id.clone(), t.clone());
                Ok(t)
            }
            None => Err(UnknownTenant::NotDeclared {
                tenant: id.clone(),
                declared: self
                    .running
                    .keys()
                    .chain(self.failed.keys())
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Every running tenant.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.running.values()
    }

    /// Every connection invocations send on: flushing them all puts what
    /// the invocations sent on the server.
    pub(crate) fn connections(&self) -> Vec<async_nats::Client> {
        match &self.shared {
            Some(nats) => vec![nats.clone()],
            None => self.running.values().map(|t| t.nats.clone()).collect(),
        }
    }

    /// The connections the host opened for tenants, to drain on shutdown.
    pub(crate) fn owned_connections(&self) -> Vec<async_nats::Client> {
        self.running.values().filter(|t| t.owns_connection).map(|t| t.nats.clone()).collect()
    }
}
