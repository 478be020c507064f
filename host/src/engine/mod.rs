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

mod stdio;

use std::sync::Arc;
use std::thread;

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{
    Config, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::HandlerPre;
use crate::hostcalls::{self, Invocation};
use crate::limits::{EPOCH_TICK, MAX_MEMORY_MB};
use crate::manifest::Manifest;

/// Why a component could not be turned into a runnable handler.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// wasmtime refused the engine configuration (a host bug or an
    /// unsupported platform).
    #[error("cannot configure the WebAssembly engine: {0:#}")]
    Config(wasmtime::Error),
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
    pub(crate) pre: HandlerPre<StoreData>,
    /// Hex SHA-256 of the component bytes: the handler's version.
    pub digest: String,
}

/// Everything one invocation's store holds.
pub(crate) struct StoreData {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    pub(crate) calls: Invocation,
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl StoreData {
    /// Whether the guest asked for more memory than its limit allows during
    /// this invocation: turns a bare "unreachable" trap into a clear cause.
    pub(crate) fn hit_memory_limit(&self) -> bool {
        self.limiter.hit
    }
}

/// Refuses linear-memory growth past the handler's limit, the way the spec
/// wants (`memory.grow` returns -1, the guest decides what to do), and
/// remembers that it did.
struct MemoryLimiter {
    max_bytes: usize,
    hit: bool,
}

/// Table elements an instance may grow to; generous for real code, small
/// enough that a guest cannot use tables to get around the memory limit.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = desired <= self.max_bytes;
        self.hit |= !ok;
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The host's WebAssembly engine and the linker shared by all handlers.
#[derive(Clone)]
pub struct Engine {
    inner: wasmtime::Engine,
    linker: Arc<Linker<StoreData>>,
}

impl Engine {
    /// Builds an engine whose pool holds `max_instances` live instances.
    pub fn new(max_instances: u32) -> Result<Engine, EngineError> {
        let mut pool = PoolingAllocationConfig::new();
        // A Rust guest is one main core module plus a few small shims; leave
        // room for components made of several modules.
        let per_component_core = 16;
        pool.total_component_instances(max_instances)
            .total_core_instances(max_instances * per_component_core)
            .max_core_instances_per_component(per_component_core)
            .total_memories(max_instances * 2)
            .max_memories_per_component(2)
            .total_tables(max_instances * per_component_core)
            .max_tables_per_component(per_component_core)
            .total_stacks(max_instances)
            .max_memory_size(MAX_MEMORY_MB as usize * 1024 * 1024)
            .max_component_instance_size(1 << 20)
            .max_core_instance_size(1 << 20)
            // Keeping the first pages of a slot resident avoids madvise +
            // page faults on every reuse, which dominate instantiation cost.
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10);

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .concurrency_support(false)
            .epoch_interruption(true)
            .memory_init_cow(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let inner = wasmtime::Engine::new(&config).map_err(EngineError::Config)?;

        let mut linker = Linker::new(&inner);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(EngineError::Config)?;
        hostcalls::add_to_linker(&mut linker, |d: &mut StoreData| &mut d.calls)
            .map_err(EngineError::Config)?;

        spawn_epoch_ticker(&inner).map_err(EngineError::Ticker)?;
        Ok(Engine {
            inner,
            linker: Arc::new(linker),
        })
    }

    /// Compiles `wasm` and links it against natsfn's imports. CPU-heavy: call
    /// it off the async runtime's worker threads.
    pub fn compile(&self, wasm: &[u8]) -> Result<Compiled, EngineError> {
        let component = Component::new(&self.inner, wasm).map_err(EngineError::Compile)?;
        let instance_pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(EngineError::World)?;
        let pre = HandlerPre::new(instance_pre).map_err(EngineError::World)?;
        let digest = Sha256::digest(wasm)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Compiled { pre, digest })
    }

    /// A fresh store for one invocation of `manifest`'s handler, with its
    /// memory limit and a CPU deadline at `deadline`; host calls parent
    /// their spans on `span`.
    pub(crate) fn store(
        &self,
        manifest: Arc<Manifest>,
        nats: async_nats::Client,
        deadline: Instant,
        span: tracing::Span,
    ) -> Store<StoreData> {
        let wasi = WasiCtx::builder()
            .stdout(stdio::GuestOutput::new(
                manifest.clone(),
                stdio::Stream::Stdout,
            ))
            .stderr(stdio::GuestOutput::new(
                manifest.clone(),
                stdio::Stream::Stderr,
            ))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let limiter = MemoryLimiter {
            max_bytes: manifest.limits.memory_bytes,
            hit: false,
        };
        let data = StoreData {
            wasi,
            table: ResourceTable::new(),
            limiter,
            calls: Invocation {
                manifest,
                nats,
                deadline,
                span,
            },
        };
        let mut store = Store::new(&self.inner, data);
        store.limiter(|d| &mut d.limiter);
        // Check in at every tick: yield so a CPU-bound guest cannot hold a
        // runtime thread, and trap once the deadline has passed.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if Instant::now() >= deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store
    }
}

/// Advances `engine`'s epoch every tick until the engine is dropped. One
/// thread per engine, however many invocations run.
fn spawn_epoch_ticker(engine: &wasmtime::Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    thread::Builder::new()
        .name("natsfn-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                thread::sleep(EPOCH_TICK);
            }
        })?;
    Ok(())
}
