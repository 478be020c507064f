//! Resource limits: the defaults a handler gets when its manifest says
//! nothing, and the host-wide ceilings a manifest cannot exceed.
//!
//! Every number here is a guard against one handler hurting the process or
//! its neighbours, so each is documented with what it protects.

use std::time::Duration;

/// Linear memory a handler instance may grow to when its manifest sets no
/// `limits.memory_mb`. Small enough that a few hundred concurrent instances fit
/// in an ordinary machine, large enough for typical JSON munging.
pub const DEFAULT_MEMORY_MB: u32 = 64;

/// The most linear memory any single instance may be given. It sizes the
/// pooling allocator's memory slots, so raising it costs address space for
/// every slot.
pub const MAX_MEMORY_MB: u32 = 1024;

/// Wall-clock budget of one invocation when the manifest sets no
/// `limits.timeout_ms`. CPU-bound guests are interrupted by epoch ticks; guests
/// waiting on host calls are cancelled by the async timeout.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;

/// Invocations of one handler that may run at once when the manifest sets no
/// `limits.max_concurrency`. Triggers stop pulling messages while all permits
/// are taken, which is what turns a slow handler into back-pressure.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 32;

/// Instances that may be alive at once across the whole host. It sizes the
/// pooling allocator; dispatch holds a host-wide permit per instance so the
/// pool can never be exhausted by many handlers at their individual limits.
pub const DEFAULT_MAX_INSTANCES: u32 = 256;

/// Fresh instances the whole host keeps made ahead of their message (one
/// per handler version that has run, while these last), so a message does
/// not wait for instantiation. The engine's pool has this many slots beyond
/// the live instances, so standby instances never take a slot an admitted
/// message needs; each costs the resident memory of a new instance (tens of
/// kilobytes for a small Rust guest) while it waits.
pub const STANDBY_INSTANCES: u32 = 64;

/// How often the epoch ticker advances the engine's epoch. An interrupted
/// guest is stopped at most one tick after its deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How long shutdown waits for in-flight invocations before abandoning them.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the host waits for NATS to confirm a flush (at start, after a
/// reload binds new subscriptions, and for the last messages at shutdown)
/// and, at shutdown, for each connection to drain. A healthy server answers
/// in milliseconds; one that is gone never does, and must not hold up a
/// reload or keep the process from exiting.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest guest log line or stdout line kept; the rest is cut off so a
/// guest cannot fill the host log with one write.
pub const MAX_LOG_LINE: usize = 16 * 1024;

/// Resolved limits of one handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory ceiling, in bytes.
    pub memory_bytes: usize,
    /// Wall-clock budget of one invocation.
    pub timeout: Duration,
    /// Concurrent invocations of the handler.
    pub max_concurrency: u32,
    /// Fuel (roughly, wasm instructions) one invocation may burn, when the
    /// host meters fuel: a deterministic CPU bound, unlike the timeout.
    pub fuel: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: DEFAULT_MEMORY_MB as usize * 1024 * 1024,
            timeout: Duration::from_millis(DEFAULT_TIMEOUT_MS),
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
            fuel: None,
        }
    }
}
