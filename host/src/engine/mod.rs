//! The wasmtime side of natsfn: one [`Engine`] per host, tuned for a fresh
//! instance per message, and the per-invocation [`Store`] it hands out.
//!
//! Choices made here and why:
//! - The pooling allocator with copy-on-write memory images makes
//!   instantiation a few microseconds; slots are sized from the host's
//!   instance ceiling and the largest memory a manifest may ask for.
//! - Concurrency support (component-model async) is off: handlers are plain
//!   synchronous exports, and leaving it on makes every store drop build a
//!   backtrace when `RUST_BACKTRACE` is set.
//! - CPU time is bounded by epoch interruption: one ticker thread per engine
//!   advances the epoch every [`EPOCH_TICK`]; each store yields to tokio at
//!   every tick and traps once its deadline has passed.
//! - Only natsfn's interfaces and WASI are linked. The WASI context is built
//!   empty: no preopened directories (so no file can be opened), no
//!   environment or arguments, no network (TCP, UDP and name lookup denied),
//!   stdin closed, and stdout/stderr going to the host log. Rust guests import
//!   the filesystem and socket interfaces through std whether they use them
//!   or not, so those are linked, but they reach nothing.

mod address_space;
mod cache;
mod guest;
mod stdio;

use address_space::{Gib, MEMORIES_PER_COMPONENT, MEMORY_GUARD, MEMORY_RESERVATION};
pub use address_space::{Limit, Shortfall};
pub use cache::CacheOutcome;
use cache::CodeCache;
pub(crate) use guest::{Guest, GuestPre, HandleResult};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, Enabled, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::hostcalls::{self, Invocation, MessageCalls};
use crate::limits::{EPOCH_TICK, MAX_MEMORY_MB, STANDBY_INSTANCES};
use crate::tenant::MemoryBudget;

/// Why a component could not be turned into a runnable handler.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// wasmtime refused the engine configuration (a host bug or an
    /// unsupported platform).
    #[error("cannot configure the WebAssembly engine: {0:#}")]
    Config(wasmtime::Error),
    /// The instance pool could not reserve its virtual address space. The
    /// pool is sized from the host's instance ceiling, so the error says
    /// which ceiling would fit.
    #[error(
        "cannot reserve {} of virtual address space for the instance pool ({slots} instance slots: \
         max_instances {max_instances} plus {STANDBY_INSTANCES} standby, each with room for \
         {MEMORIES_PER_COMPONENT} memories of {}, of which only what guests use becomes resident), and \
         {shortfall} ({source:#})",
        Gib(*reserve),
        Gib(MEMORY_RESERVATION)
    )]
    AddressSpace {
        /// Bytes the pool needs (an estimate: nearly all is the memories').
        reserve: u64,
        /// Instance slots in the pool.
        slots: u32,
        /// The host's instance ceiling the slots came from.
        max_instances: u32,
        /// What the reservation ran into, and what would fit.
        shortfall: Shortfall,
        /// wasmtime's error.
        source: wasmtime::Error,
    },
    /// The epoch ticker thread could not start; without it CPU limits would
    /// not be enforced, so the engine is not usable.
    #[error("cannot start the epoch ticker thread: {0}")]
    Ticker(std::io::Error),
    /// The bytes are not a valid WebAssembly component.
    #[error("not a valid WebAssembly component: {0:#}")]
    Compile(wasmtime::Error),
    /// The component is valid but does not fit the `natsfn:host/handler`
    /// world: it imports something natsfn does not provide, or does not
    /// export `handle`.
    #[error("does not fit the natsfn:host/handler world: {0:#}")]
    World(wasmtime::Error),
}

/// A compiled, linked handler component, ready to instantiate many times.
#[derive(Clone)]
pub struct Compiled {
    pub(crate) pre: GuestPre,
    /// Hex SHA-256 of the component bytes: the handler's version.
    pub digest: String,
    /// Keeps the shared code registered while any handler uses it.
    _code: Arc<LoadedCode>,
}

/// Code loaded for one component digest, shared by every handler whose
/// component has those bytes: a host running the same function for many
/// tenants holds its machine code once.
struct LoadedCode {
    pre: GuestPre,
}

/// Loaded code by component digest. Weak, so code no handler uses any more
/// (an old version after a reload) is freed.
type LoadedCodeMap = std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<LoadedCode>>>;

/// Everything one invocation's store holds.
pub(crate) struct StoreData {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    pub(crate) calls: Invocation,
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl StoreData {
    /// Whether the guest asked for more memory than its limit allows during
    /// this invocation: turns a bare "unreachable" trap into a clear cause.
    pub(crate) fn hit_memory_limit(&self) -> bool {
        self.limiter.hit
    }

    /// The most linear memory the guest held during this invocation.
    pub(crate) fn peak_memory(&self) -> usize {
        self.limiter.peak
    }

    /// Whether a growth was refused because the tenant's memory budget was
    /// spent (rather than the handler's own limit).
    pub(crate) fn hit_tenant_memory(&self) -> bool {
        self.limiter.hit_tenant
    }
}

/// Refuses linear-memory growth past the handler's limit or past what is
/// left of its tenant's budget, the way the spec wants (`memory.grow`
/// returns -1, the guest decides what to do), and remembers that it did.
/// What it reserved from the tenant is given back when the store drops.
struct MemoryLimiter {
    max_bytes: usize,
    hit: bool,
    hit_tenant: bool,
    /// The largest linear memory granted, for the handler's statistics.
    peak: usize,
    /// All linear memory granted, every memory of the instance together.
    granted: usize,
    /// The tenant budget growth is charged to; `None` for a standby store
    /// until a message claims it.
    tenant: Option<Arc<MemoryBudget>>,
    reserved: usize,
}

impl MemoryLimiter {
    /// Charges what the instance already holds to `budget` from now on.
    /// Returns false, charging nothing, when the budget has no room for it.
    fn charge(&mut self, budget: Option<Arc<MemoryBudget>>) -> bool {
        if let Some(budget) = &budget {
            if !budget.try_reserve(self.granted) {
                return false;
            }
            self.reserved += self.granted;
        }
        self.tenant = budget;
        true
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        if let Some(budget) = &self.tenant {
            budget.release(self.reserved);
        }
    }
}

/// Table elements an instance may grow to; generous for real code, small
/// enough that a guest cannot use tables to get around the memory limit.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Ok(false);
        }
        // Wasmtime also asks here for a memory's initial size at
        // instantiation (current = 0), so every byte is accounted for.
        let more = desired.saturating_sub(current);
        if let Some(budget) = &self.tenant {
            if !budget.try_reserve(more) {
                self.hit = true;
                self.hit_tenant = true;
                return Ok(false);
            }
            self.reserved += more;
        }
        self.granted += more;
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The host's WebAssembly engine and the linker shared by all handlers.
#[derive(Clone)]
pub struct Engine {
    inner: wasmtime::Engine,
    linker: Arc<Linker<StoreData>>,
    cache: Option<CodeCache>,
    loaded: Arc<LoadedCodeMap>,
    fuel: bool,
    /// Whether anything was compiled since the last
    /// [`Engine::release_compiler_memory`].
    compiled: Arc<AtomicBool>,
}

impl Engine {
    /// Builds an engine whose pool holds `max_instances` live instances and
    /// [`STANDBY_INSTANCES`] made ahead of their message, caching compiled
    /// code in `cache_dir` when given. With `fuel`, compiled code counts the
    /// instructions it runs so invocations can have a fuel budget; that
    /// costs some speed in every guest, so it is opt-in.
    pub fn new(max_instances: u32, cache_dir: Option<std::path::PathBuf>, fuel: bool) -> Result<Engine, EngineError> {
        let mut pool = PoolingAllocationConfig::new();
        // A Rust guest is one main core module plus a few small shims; leave
        // room for components made of several modules.
        let per_component_core = 16;
        let slots = max_instances + STANDBY_INSTANCES;
        pool.total_component_instances(slots)
            .total_core_instances(slots * per_component_core)
            .max_core_instances_per_component(per_component_core)
            .total_memories(slots * MEMORIES_PER_COMPONENT)
            .max_memories_per_component(MEMORIES_PER_COMPONENT)
            .total_tables(slots * per_component_core)
            .max_tables_per_component(per_component_core)
            .total_stacks(slots)
            .max_memory_size(MAX_MEMORY_MB as usize * 1024 * 1024)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(1 << 20)
            // Keeping the first pages of a slot resident avoids madvise +
            // page faults on every reuse, which dominate instantiation cost.
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10)
            // Without PAGEMAP_SCAN (Linux 6.7+) wasmtime resets the whole
            // resident region with memset on every instance drop: 2 MiB per
            // message, a third of all CPU time in the fresh-instance
            // benchmark. With it, only the pages the guest dirtied are reset.
            // Auto: older kernels fall back to the memset.
            .pagemap_scan(Enabled::Auto);

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .concurrency_support(false)
            .epoch_interruption(true)
            .memory_init_cow(true)
            .consume_fuel(fuel)
            .memory_reservation(MEMORY_RESERVATION)
            .memory_guard_size(MEMORY_GUARD)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let inner = wasmtime::Engine::new(&config).map_err(|source| {
            let reserve = address_space::pool_bytes(slots);
            match address_space::shortfall(reserve, STANDBY_INSTANCES) {
                Some(shortfall) => EngineError::AddressSpace { reserve, slots, max_instances, shortfall, source },
                None => EngineError::Config(source),
            }
        })?;

        let mut linker = Linker::new(&inner);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(EngineError::Config)?;
        hostcalls::add_to_linker(&mut linker, |d: &mut StoreData| &mut d.calls).map_err(EngineError::Config)?;

        spawn_epoch_ticker(&inner).map_err(EngineError::Ticker)?;
        Ok(Engine {
            inner,
            linker: Arc::new(linker),
            cache: cache_dir.map(CodeCache::new),
            loaded: Arc::default(),
            fuel,
            compiled: Arc::default(),
        })
    }

    /// Whether compiled code meters fuel.
    pub fn meters_fuel(&self) -> bool {
        self.fuel
    }

    /// Compiles `wasm` (or loads it from the compiled-code cache) and links
    /// it against natsfn's imports. CPU-heavy on a miss: call it off the
    /// async runtime's worker threads.
    pub fn compile(&self, wasm: &[u8]) -> Result<(Compiled, CacheOutcome), EngineError> {
        let digest: String = Sha256::digest(wasm).iter().map(|b| format!("{b:02x}")).collect();
        if let Some(code) = self.loaded_code(&digest) {
            return Ok((Compiled { pre: code.pre.clone(), digest, _code: code }, CacheOutcome::Shared));
        }
        let cached = self.cache.as_ref().and_then(|c| c.load(&self.inner, &digest));
        let (component, outcome) = match cached {
            Some(component) => (component, CacheOutcome::Hit),
            None => {
                self.compiled.store(true, Ordering::Relaxed);
                let mut component =
                    compile_apart(|| Component::new(&self.inner, wasm)).map_err(EngineError::Compile)?;
                if let Some(cache) = &self.cache {
                    component = cache.store(&self.inner, &digest, component);
                }
                (component, CacheOutcome::Miss)
            }
        };
        let instance_pre = self.linker.instantiate_pre(&component).map_err(EngineError::World)?;
        let pre = GuestPre::new(instance_pre).map_err(EngineError::World)?;
        let code = Arc::new(LoadedCode { pre: pre.clone() });
        let mut loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loaded.retain(|_, weak| weak.strong_count() > 0);
        loaded.insert(digest.clone(), Arc::downgrade(&code));
        Ok((Compiled { pre, digest, _code: code }, outcome))
    }

    /// Gives the memory compiling freed back to the kernel, if anything was
    /// compiled since the last call. Cranelift allocates and frees
    /// megabytes per component, which glibc's malloc keeps for reuse: ~3 MB
    /// of RSS with 100 distinct components loaded (BENCHMARKS.md, "Distinct
    /// components idle"). Call it after a batch of [`Engine::compile`]s (a
    /// start, a reload), not after each: the next compilation would fault
    /// the pages back in, which made loading 100 components up to a second
    /// slower.
    pub(crate) fn release_compiler_memory(&self) {
        if !self.compiled.swap(false, Ordering::Relaxed) {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap pages to the kernel,
        // and may be called from any thread at any time.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// The code already loaded for `digest`, if a handler still uses it.
    fn loaded_code(&self, digest: &str) -> Option<Arc<LoadedCode>> {
        let loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loaded.get(digest).and_then(std::sync::Weak::upgrade)
    }

    /// A fresh store for one invocation, with the handler's memory limit and
    /// a CPU deadline at the invocation's deadline.
    pub(crate) fn store(&self, calls: Invocation) -> Store<StoreData> {
        let budget = calls.tenant.memory.clone();
        self.new_store(calls, budget)
    }

    /// A store for a standby instance: like [`Engine::store`], but what it
    /// holds is charged to the tenant only when a message claims it
    /// ([`Engine::charge`]).
    pub(crate) fn standby_store(&self, calls: Invocation) -> Store<StoreData> {
        self.new_store(calls, None)
    }

    /// Charges what a standby store already holds to its handler's tenant,
    /// for the message claiming it (then [`Engine::renew`] sets it up for
    /// that message). False, charging nothing, when the tenant's budget has
    /// no room for it.
    pub(crate) fn charge(&self, store: &mut Store<StoreData>) -> bool {
        let budget = store.data().calls.tenant.memory.clone();
        store.data_mut().limiter.charge(budget)
    }

    fn new_store(&self, calls: Invocation, budget: Option<Arc<MemoryBudget>>) -> Store<StoreData> {
        let manifest = &calls.manifest;
        let wasi = WasiCtx::builder()
            .stdout(stdio::GuestOutput::new(manifest.clone(), calls.tenant.clone(), stdio::Stream::Stdout))
            .stderr(stdio::GuestOutput::new(manifest.clone(), calls.tenant.clone(), stdio::Stream::Stderr))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limiter = MemoryLimiter {
            max_bytes: manifest.limits.memory_bytes,
            hit: false,
            hit_tenant: false,
            peak: 0,
            granted: 0,
            tenant: budget,
            reserved: 0,
        };
        let data = StoreData { wasi, table: ResourceTable::new(), limiter, calls };
        let mut store = Store::new(&self.inner, data);
        store.limiter(|d| &mut d.limiter);
        self.arm(&mut store);
        // Check in at every tick: yield so a CPU-bound guest cannot hold a
        // runtime thread, and trap once the deadline has passed. The
        // deadline is read from the store, so a reused store follows each
        // invocation's own.
        store.epoch_deadline_callback(|cx| {
            if Instant::now() >= cx.data().calls.deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store
    }

    /// Sets a store that ran an earlier invocation (or was made on
    /// standby) of the same handler up for `message`: the new invocation's
    /// deadline and epoch budget, a clear memory-limit flag. What the guest
    /// keeps in its own memory stays (that is reuse).
    pub(crate) fn renew(&self, store: &mut Store<StoreData>, message: MessageCalls) {
        let data = store.data_mut();
        data.calls.next_message(message);
        data.limiter.hit = false;
        data.limiter.hit_tenant = false;
        self.arm(store);
    }

    /// Gives the invocation in `store` its budgets: the handler's fuel (when
    /// the engine meters it) and one epoch tick before the first check-in.
    fn arm(&self, store: &mut Store<StoreData>) {
        if self.fuel {
            let fuel = store.data().calls.manifest.limits.fuel;
            // Setting fuel only fails when the engine does not meter it.
            let _ = store.set_fuel(fuel.unwrap_or(u64::MAX));
        }
        store.set_epoch_deadline(1);
    }
}

/// Runs `compile` with Cranelift's parallel work on threads of its own,
/// which end with it. On wasmtime's shared thread pool the compiler threads
/// would live on, and glibc's malloc would keep what they freed in their
/// caches, out of [`Engine::release_compiler_memory`]'s reach (BENCHMARKS.md,
/// "Distinct components idle"). Starting its threads (one per core) costs
/// well under a millisecond; compiling a component takes tens.
fn compile_apart<T: Send>(compile: impl FnOnce() -> T + Send) -> T {
    let threads = Arc::new(Mutex::new(Vec::new()));
    let spawned = threads.clone();
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("natsfn-compile-{i}"))
        .spawn_handler(move |worker| {
            let name = worker.name().unwrap_or("natsfn-compile").to_owned();
            let handle = thread::Builder::new().name(name).spawn(|| worker.run())?;
            spawned.lock().unwrap_or_else(PoisonError::into_inner).push(handle);
            Ok(())
        })
        .build();
    let Ok(pool) = pool else {
        // No threads to be had: the shared pool, as wasmtime does by default.
        return compile();
    };
    let compiled = pool.install(compile);
    drop(pool);
    // Joined, the threads have run their exit, which hands their malloc
    // caches back to the arenas a release can trim.
    for handle in std::mem::take(&mut *threads.lock().unwrap_or_else(PoisonError::into_inner)) {
        let _ = handle.join();
    }
    compiled
}

/// Advances `engine`'s epoch every tick until the engine is dropped. One
/// thread per engine, however many invocations run.
fn spawn_epoch_ticker(engine: &wasmtime::Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    thread::Builder::new().name("natsfn-epoch".into()).spawn(move || {
        while let Some(engine) = weak.upgrade() {
            engine.increment_epoch();
            drop(engine);
            thread::sleep(EPOCH_TICK);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's kernel id.
    fn tid() -> libc::pid_t {
        // SAFETY: gettid has no preconditions and cannot fail.
        unsafe { libc::gettid() }
    }

    #[test]
    fn compiling_apart_runs_on_a_thread_that_ends_with_it() {
        let (pooled, tid) = compile_apart(|| (rayon::current_thread_index().is_some(), tid()));
        assert!(pooled, "the work runs in the compile pool, where wasmtime's parallel work follows it");
        assert_ne!(tid, self::tid(), "not on the caller's thread");
        let task = std::path::PathBuf::from(format!("/proc/self/task/{tid}"));
        assert!(!task.exists(), "the compile thread outlived the compilation");
    }
}
