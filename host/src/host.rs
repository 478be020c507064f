//! The embedding API: [`Host::builder`] → [`Host`] (handlers loaded) →
//! [`RunningHost`] (triggers bound) → [`ShutdownReport`].
//!
//! Loading is forgiving and running is strict. A manifest or component that
//! cannot be used is reported in [`Host::load_errors`] and skipped, so one bad
//! file never keeps the others from serving. Once the host runs, shutdown is
//! ordered: triggers stop taking messages (subscriptions are drained), the
//! invocations already admitted finish or are abandoned at the deadline, and
//! the connection is flushed so their replies and publishes are not lost.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::buckets::BucketSpec;
use crate::dispatch::{Dispatcher, HandlerStats, LoadedHandler};
use crate::engine::{CacheOutcome, Engine, EngineError};
use crate::limits::{DEFAULT_MAX_INSTANCES, DEFAULT_SHUTDOWN_TIMEOUT, FLUSH_TIMEOUT, STANDBY_INSTANCES};
use crate::manifest::{self, HandlerName, Manifest, ManifestError, TenantId, Trigger};
use crate::registry::{Binding, HandlerSlot};
use crate::reload::{Entry, HandlerKey, Registry, ReloadError, ReloadReport, Reloader};
use crate::telemetry::Tracer;
use crate::tenant::config::{HostConfig, TenantConfig};
use crate::tenant::{Tenant, TenantError, TenantStats, Tenants, UnknownTenant};
use crate::triggers::TriggerError;

/// Why a host could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Neither a NATS URL nor a client was given to the builder.
    #[error("no NATS connection: call nats_url() or nats_client() on the builder")]
    NoNats,
    /// Connecting to NATS failed.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The URL tried.
        url: String,
        /// The client's error.
        source: async_nats::ConnectError,
    },
    /// A handlers directory could not be listed.
    #[error("{}: cannot read handlers directory: {source}", path.display())]
    HandlersDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A declared bucket could not be created.
    #[error("cannot create bucket `{name}`: {reason}")]
    Bucket {
        /// The bucket.
        name: String,
        /// The server's answer.
        reason: String,
    },
    /// The WebAssembly engine could not be set up.
    #[error(transparent)]
    Engine(EngineError),
    /// A tenant names no server URL and the host has none to lend it.
    #[error("tenant `{tenant}` has no `url` and the host has no NATS URL (give one with nats_url(), --nats or `nats` in the host config)")]
    TenantUrl {
        /// The tenant.
        tenant: crate::manifest::TenantId,
    },
}

/// A handler that was not loaded, and why. Its `Display` names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The component file could not be read.
    #[error("{}: cannot read component: {source}", path.display())]
    ReadComponent {
        /// The component file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A trigger could not be bound when the host started.
    #[error("{}: handler {handler}: {source}", path.display())]
    Bind {
        /// The handler's manifest.
        path: PathBuf,
        /// The handler.
        handler: HandlerName,
        /// What went wrong.
        source: Box<TriggerError>,
    },
    /// The component does not compile or does not fit the handler world.
    #[error("{}: {source}", path.display())]
    Component {
        /// The component file (or the manifest's origin for bytes).
        path: PathBuf,
        /// What the engine said.
        source: EngineError,
    },
    /// The handler's tenant is not declared, or did not start.
    #[error("{}: tenant: {source}", path.display())]
    Tenant {
        /// The handler's manifest.
        path: PathBuf,
        /// Why the tenant cannot take it.
        source: UnknownTenant,
    },
    /// The tenant already has as many handlers as its limits allow.
    #[error("{}: handler {handler}: tenant `{tenant}` already has its limit of {max} handlers (limits.max_handlers)", path.display())]
    TooManyHandlers {
        /// The handler's manifest.
        path: PathBuf,
        /// The handler.
        handler: HandlerName,
        /// Its tenant.
        tenant: TenantId,
        /// The tenant's `limits.max_handlers`.
        max: u32,
    },
    /// A tenant declared in the host config did not start; its handlers
    /// are not loaded (they are listed separately).
    #[error(transparent)]
    TenantStart(#[from] TenantError),
}

/// Where the host's NATS connection comes from.
enum NatsSource {
    None,
    Url(String),
    Client(async_nats::Client),
}

/// A handler manifest whose component compiled, not yet given its tenant's
/// runtime state.
struct Prepared {
    manifest: Manifest,
    compiled: crate::engine::Compiled,
    cache: CacheOutcome,
    /// For handlers from files: what reload compares.
    fingerprint: Option<String>,
    tenant: Option<Arc<Tenant>>,
}

/// A handler given to the builder as bytes instead of files.
struct InlineHandler {
    manifest: String,
    origin: PathBuf,
    wasm: Vec<u8>,
}

/// Builds a [`Host`]. Every setting has a default except the NATS
/// connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), natsfn::HostError> {
/// let host = natsfn::Host::builder()
///     .nats_url("nats://127.0.0.1:4222")
///     .handlers_dir("examples/quickstart")
///     .build()
///     .await?;
/// host.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(()) }
/// ```
pub struct HostBuilder {
    nats: NatsSource,
    dirs: Vec<PathBuf>,
    inline: Vec<InlineHandler>,
    max_instances: u32,
    shutdown_timeout: Duration,
    create_streams: bool,
    buckets: Vec<BucketSpec>,
    cache_dir: Option<PathBuf>,
    tenants: Vec<TenantConfig>,
    fuel: bool,
    tracer: Option<Tracer>,
}

impl HostBuilder {
    /// Applies a host config file: its tenants, its handler directories,
    /// its pool size, and its NATS URL unless one was given already.
    pub fn config(mut self, config: HostConfig) -> Self {
        if matches!(self.nats, NatsSource::None) {
            if let Some(url) = config.nats {
                self.nats = NatsSource::Url(url);
            }
        }
        if let Some(n) = config.max_instances {
            self.max_instances = n;
        }
        self.dirs.extend(config.handlers);
        self.tenants.extend(config.tenants);
        self
    }

    /// Declares a tenant: handlers naming it run on its own connection,
    /// within its limits. Once any tenant is declared, handlers naming an
    /// undeclared tenant are not loaded.
    pub fn tenant(mut self, tenant: TenantConfig) -> Self {
        self.tenants.push(tenant);
        self
    }

    /// Meters fuel, so handlers may set `limits.fuel` (on by itself when a
    /// declared tenant sets a fuel limit). It costs some guest speed.
    pub fn fuel_metering(mut self, on: bool) -> Self {
        self.fuel = on;
        self
    }

    /// Keeps compiled machine code in `dir`, keyed by component hash and
    /// engine settings, so a restart skips compiling unchanged components.
    /// Off by default for embedders; the CLI uses the user's cache folder.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// Declares a KV or object bucket that the host creates at start-up if
    /// it does not exist (an existing one is left as it is).
    pub fn bucket(mut self, spec: BucketSpec) -> Self {
        self.buckets.push(spec);
        self
    }

    /// Lets JetStream triggers create their stream (file storage, subjects
    /// from the trigger's `filter`) when it does not exist. Off by default:
    /// streams are usually an operator's decision, and a typo in a stream
    /// name should be an error, not a new stream.
    pub fn create_streams(mut self, allow: bool) -> Self {
        self.create_streams = allow;
        self
    }

    /// Connects to NATS at `url` when built; the host owns that connection
    /// and drains it on shutdown.
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.nats = NatsSource::Url(url.into());
        self
    }

    /// Uses an existing client. The host flushes it on shutdown but leaves
    /// it open for its owner.
    pub fn nats_client(mut self, client: async_nats::Client) -> Self {
        self.nats = NatsSource::Client(client);
        self
    }

    /// Loads every handler manifest found in `dir` (see
    /// [`manifest::discover`]). May be called more than once.
    pub fn handlers_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dirs.push(dir.into());
        self
    }

    /// Loads every handler manifest found in each of `dirs`.
    pub fn handlers_dir_all(mut self, dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        self.dirs.extend(dirs);
        self
    }

    /// Adds a handler from manifest text and component bytes. The
    /// manifest's `component` field, if any, is ignored. `label` names the
    /// handler in errors.
    pub fn handler(
        mut self,
        label: impl Into<PathBuf>,
        manifest_toml: impl Into<String>,
        wasm: impl Into<Vec<u8>>,
    ) -> Self {
        self.inline.push(InlineHandler { manifest: manifest_toml.into(), origin: label.into(), wasm: wasm.into() });
        self
    }

    /// Instances that may be alive at once across all handlers (the size of
    /// the instance pool). Default [`DEFAULT_MAX_INSTANCES`].
    pub fn max_instances(mut self, n: u32) -> Self {
        self.max_instances = n.max(1);
        self
    }

    /// How long shutdown waits for in-flight invocations. Default
    /// [`DEFAULT_SHUTDOWN_TIMEOUT`].
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Traces every invocation and host call with `tracer` (an
    /// [`OtlpPipeline`](crate::telemetry::OtlpPipeline)'s, or one made from
    /// an embedder's own provider). Without one the host makes no spans and
    /// leaves trace headers alone.
    pub fn tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = Some(tracer);
        self
    }

    /// Connects, then loads and compiles every handler. Handlers that fail
    /// to load are listed in [`Host::load_errors`] (and logged); only a
    /// problem that affects every handler is an error here.
    pub async fn build(self) -> Result<Host, HostError> {
        let (mut tenants, tenant_errors, host_connection) = if self.tenants.is_empty() {
            let (nats, owns) = match self.nats {
                NatsSource::None => return Err(HostError::NoNats),
                NatsSource::Client(c) => (c, false),
                NatsSource::Url(url) => {
                    let client = async_nats::ConnectOptions::new()
                        .name("natsfn")
                        .connect(&url)
                        .await
                        .map_err(|source| HostError::Connect { url, source })?;
                    (client, true)
                }
            };
            let js = async_nats::jetstream::new(nats.clone());
            for spec in &self.buckets {
                spec.ensure(&js).await.map_err(|reason| HostError::Bucket { name: spec.name.to_string(), reason })?;
            }
            (Tenants::shared(nats.clone()), Vec::new(), Some((nats, owns)))
        } else {
            // Tenants connect on their own; the host's URL is only the
            // default for those that name none.
            let default_url = match self.nats {
                NatsSource::Url(url) => url,
                _ => String::new(),
            };
            if default_url.is_empty() {
                if let Some(t) = self.tenants.iter().find(|t| t.url.is_none()) {
                    return Err(HostError::TenantUrl { tenant: t.id.clone() });
                }
            }
            let mut tenants = self.tenants.clone();
            for t in &mut tenants {
                t.buckets.extend(self.buckets.iter().cloned());
            }
            let (running, errors) = Tenants::start(&tenants, &default_url).await;
            (running, errors, None)
        };
        // Every tenant's instance share must fit in the pool, or one tenant
        // could take instances promised to another.
        let shares: u32 = self.tenants.iter().filter_map(|t| t.limits.max_instances).sum();
        let max_instances = self.max_instances.max(shares);
        let fuel = self.fuel || self.tenants.iter().any(|t| t.limits.fuel.is_some());
        let engine = Engine::new(max_instances, self.cache_dir, fuel).map_err(HostError::Engine)?;

        let (prepared, mut load_errors) = load_all(&engine, &self.dirs, self.inline, Some(&mut tenants)).await?;
        load_errors.splice(0..0, tenant_errors.into_iter().map(LoadError::TenantStart));
        let mut handlers = Vec::new();
        let mut fingerprints = HashMap::new();
        for p in prepared {
            // load_all was given the tenants, so every handler it returns
            // was admitted by one.
            let Some(tenant) = p.tenant else { continue };
            let h = LoadedHandler::new(p.manifest, p.compiled, p.cache, tenant);
            if let Some(fp) = p.fingerprint {
                fingerprints.insert((h.manifest.tenant.clone(), h.manifest.name.clone()), fp);
            }
            handlers.push(Arc::new(h));
        }

        Ok(Host {
            engine,
            tenants,
            host_connection,
            handlers,
            load_errors,
            max_instances,
            shutdown_timeout: self.shutdown_timeout,
            create_streams: self.create_streams,
            dirs: self.dirs,
            fingerprints,
            tracer: self.tracer,
        })
    }
}

/// Loads every handler from `dirs` and `inline`: those that compiled (and,
/// given `tenants`, were admitted by their tenant), and an error for each
/// that was skipped.
async fn load_all(
    engine: &Engine,
    dirs: &[PathBuf],
    inline: Vec<InlineHandler>,
    mut tenants: Option<&mut Tenants>,
) -> Result<(Vec<Prepared>, Vec<LoadError>), HostError> {
    // A manifest, with its component bytes when they were given inline.
    type Candidate = Result<(Manifest, Option<Vec<u8>>), LoadError>;
    let mut candidates: Vec<Candidate> = Vec::new();
    for dir in dirs {
        let found = manifest::discover(dir).map_err(|source| HostError::HandlersDir { path: dir.clone(), source })?;
        candidates.extend(found.into_iter().map(|m| m.map(|m| (m, None)).map_err(LoadError::from)));
    }
    for h in inline {
        let parsed = Manifest::from_toml(&h.manifest, &h.origin).map(|mut m| {
            m.component = None;
            (m, Some(h.wasm))
        });
        candidates.push(parsed.map_err(LoadError::from));
    }

    let mut loaded: Vec<Prepared> = Vec::new();
    let mut load_errors = Vec::new();
    for candidate in candidates {
        let prepared = match candidate {
            Ok((manifest, wasm)) => load(engine, manifest, wasm, &loaded, tenants.as_deref_mut()).await,
            Err(e) => Err(e),
        };
        match prepared {
            Ok(p) => {
                log_loaded(&p);
                loaded.push(p);
            }
            Err(e) => {
                tracing::error!("handler not loaded: {e}");
                load_errors.push(e);
            }
        }
    }
    engine.release_compiler_memory();
    Ok((loaded, load_errors))
}

/// Gives a handler to its tenant: the tenant must exist and have room for
/// one more handler (`in_tenant` are loaded already), and the handler's
/// limits are lowered to the tenant's ceilings.
pub(crate) fn admit(
    tenants: &mut Tenants,
    manifest: &mut Manifest,
    engine: &Engine,
    in_tenant: usize,
) -> Result<Arc<Tenant>, LoadError> {
    let tenant =
        tenants.get(&manifest.tenant).map_err(|source| LoadError::Tenant { path: manifest.origin.clone(), source })?;
    if let Some(max) = tenant.limits.max_handlers {
        if in_tenant >= max as usize {
            return Err(LoadError::TooManyHandlers {
                path: manifest.origin.clone(),
                handler: manifest.name.clone(),
                tenant: manifest.tenant.clone(),
                max,
            });
        }
    }
    for lowered in tenant.cap(manifest) {
        tracing::warn!(handler = %manifest.name, tenant = %manifest.tenant, "{}: lowered to the tenant's limit: {lowered}", manifest.origin.display());
    }
    if manifest.limits.fuel.is_some() && !engine.meters_fuel() {
        return Err(LoadError::Manifest(ManifestError::Field {
            path: manifest.origin.clone(),
            field: "limits.fuel".into(),
            problem: "this host does not meter fuel (enable it with a tenant fuel limit in the host config, or HostBuilder::fuel_metering)".into(),
        }));
    }
    Ok(tenant)
}

/// Loads and compiles the handlers in `dirs` without connecting to NATS:
/// what `natsfn validate` runs. Returns what loaded and what did not.
pub async fn validate(dirs: &[PathBuf]) -> Result<(Vec<HandlerInfo>, Vec<LoadError>), HostError> {
    let engine = Engine::new(1, None, true).map_err(HostError::Engine)?;
    let (prepared, errors) = load_all(&engine, dirs, Vec::new(), None).await?;
    Ok((prepared.iter().map(|p| info_of(&p.manifest, &p.compiled, p.cache)).collect(), errors))
}

/// Reads (if needed) and compiles one handler's component off the async
/// worker threads, after rejecting a name already taken by a handler given
/// another way (directories check duplicates among themselves) and, given
/// `tenants`, having the handler admitted by its tenant. Handlers from files
/// come with their fingerprint, which reload compares.
async fn load(
    engine: &Engine,
    mut manifest: Manifest,
    wasm: Option<Vec<u8>>,
    loaded: &[Prepared],
    tenants: Option<&mut Tenants>,
) -> Result<Prepared, LoadError> {
    if let Some(first) =
        loaded.iter().find(|h| h.manifest.name == manifest.name && h.manifest.tenant == manifest.tenant)
    {
        return Err(LoadError::Manifest(ManifestError::Duplicate {
            path: manifest.origin.clone(),
            name: manifest.name.clone(),
            tenant: manifest.tenant.clone(),
            first: first.manifest.origin.clone(),
        }));
    }
    let tenant = match tenants {
        Some(tenants) => {
            let in_tenant = loaded.iter().filter(|p| p.manifest.tenant == manifest.tenant).count();
            Some(admit(tenants, &mut manifest, engine, in_tenant)?)
        }
        None => None,
    };
    let (wasm, fingerprint) = match wasm {
        Some(w) => (w, None),
        None => {
            let (wasm, fingerprint) = crate::reload::read_sources(&manifest).await?;
            (wasm, Some(fingerprint))
        }
    };
    let path = manifest.component.clone().unwrap_or_else(|| manifest.origin.clone());
    let (compiled, cache) = compile(engine, wasm, path).await?;
    Ok(Prepared { manifest, compiled, cache, fingerprint, tenant })
}

/// Compiles on a blocking thread; `path` names the component in errors.
pub(crate) async fn compile(
    engine: &Engine,
    wasm: Vec<u8>,
    path: PathBuf,
) -> Result<(crate::engine::Compiled, CacheOutcome), LoadError> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || engine.compile(&wasm))
        .await
        .unwrap_or_else(|join| Err(EngineError::Compile(wasmtime::Error::msg(format!("compiler task failed: {join}")))))
        .map_err(|source| LoadError::Component { path, source })
}

fn log_loaded(h: &Prepared) {
    let m = &h.manifest;
    let triggers: Vec<String> = m.triggers.iter().map(Trigger::to_string).collect();
    tracing::info!(
        handler = %m.name,
        tenant = %m.tenant,
        version = &h.compiled.digest[..12],
        triggers = %triggers.join(", "),
        memory_mb = m.limits.memory_bytes >> 20,
        timeout_ms = m.limits.timeout.as_millis() as u64,
        max_concurrency = m.limits.max_concurrency,
        cache = ?h.cache,
        "handler loaded"
    );
}

/// A host with its handlers loaded, not yet bound to any subject.
pub struct Host {
    engine: Engine,
    tenants: Tenants,
    /// The host's own connection (no host config), and whether the host
    /// opened it.
    host_connection: Option<(async_nats::Client, bool)>,
    handlers: Vec<Arc<LoadedHandler>>,
    load_errors: Vec<LoadError>,
    max_instances: u32,
    shutdown_timeout: Duration,
    create_streams: bool,
    dirs: Vec<PathBuf>,
    /// Fingerprints of the handlers loaded from files, for reload.
    fingerprints: HashMap<HandlerKey, String>,
    tracer: Option<Tracer>,
}

/// What the host knows about one loaded handler.
#[derive(Debug, Clone)]
pub struct HandlerInfo {
    /// The handler's name.
    pub name: HandlerName,
    /// Its tenant.
    pub tenant: TenantId,
    /// Hex SHA-256 of its component.
    pub version: String,
    /// Its triggers.
    pub triggers: Vec<Trigger>,
    /// Where its manifest came from.
    pub origin: PathBuf,
    /// Whether its compiled code came from the cache.
    pub cache: CacheOutcome,
}

impl Host {
    /// Starts building a host.
    pub fn builder() -> HostBuilder {
        HostBuilder {
            nats: NatsSource::None,
            dirs: Vec::new(),
            inline: Vec::new(),
            max_instances: DEFAULT_MAX_INSTANCES,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            create_streams: false,
            buckets: Vec::new(),
            cache_dir: None,
            tenants: Vec::new(),
            fuel: false,
            tracer: None,
        }
    }

    /// The handlers that loaded.
    pub fn handlers(&self) -> Vec<HandlerInfo> {
        self.handlers.iter().map(|h| info(h)).collect()
    }

    /// The handlers that did not load, and why.
    pub fn load_errors(&self) -> &[LoadError] {
        &self.load_errors
    }

    /// The tenants that started, with their counters (all zero before
    /// start; [`RunningHost::tenant_stats`] once running).
    pub fn tenant_stats(&self) -> Vec<(TenantId, TenantStats)> {
        self.tenants.all().map(|t| (t.id.clone(), t.stats())).collect()
    }

    /// Binds every trigger and returns once the server has them (after a
    /// flush), so a message published after this returns is delivered.
    pub async fn start(self) -> Result<RunningHost, HostError> {
        let shutdown = CancellationToken::new();
        let dispatcher = Dispatcher {
            engine: self.engine,
            tenants: Arc::new(std::sync::Mutex::new(self.tenants)),
            instance_permits: Arc::new(tokio::sync::Semaphore::new(self.max_instances as usize)),
            invocations: TaskTracker::new(),
            abandon: CancellationToken::new(),
            tracer: self.tracer,
            standby_permits: Arc::new(tokio::sync::Semaphore::new(STANDBY_INSTANCES as usize)),
            idle_pools: Arc::default(),
        };
        // A handler whose trigger cannot be bound (a missing stream, say)
        // is reported and left out; the others serve regardless.
        let mut registry = Registry::default();
        let mut load_errors = self.load_errors;
        for handler in self.handlers {
            let key = (handler.manifest.tenant.clone(), handler.manifest.name.clone());
            let slot = HandlerSlot::new(handler.clone());
            match Binding::bind(&slot, &handler.manifest.triggers, self.create_streams, &dispatcher, &shutdown).await {
                Ok(binding) => {
                    let fingerprint = self.fingerprints.get(&key).cloned().unwrap_or_default();
                    let from_dir = self.fingerprints.contains_key(&key);
                    registry.insert(key, Entry { slot, binding, fingerprint, from_dir });
                }
                Err(source) => {
                    let e = LoadError::Bind {
                        path: handler.manifest.origin.clone(),
                        handler: handler.manifest.name.clone(),
                        source: Box::new(source),
                    };
                    tracing::error!("handler not started: {e}");
                    load_errors.push(e);
                }
            }
        }
        dispatcher.flush().await;
        let triggers: usize = registry.values().map(|e| e.binding.len()).sum();
        tracing::info!(handlers = registry.len(), triggers, "natsfn ready");
        let reloader = Arc::new(Reloader {
            registry: std::sync::Mutex::new(registry),
            reload_lock: tokio::sync::Mutex::new(()),
            dirs: self.dirs,
            create_streams: self.create_streams,
            dispatcher: dispatcher.clone(),
            shutdown: shutdown.clone(),
        });
        Ok(RunningHost {
            host_connection: self.host_connection,
            load_errors,
            reloader,
            dispatcher,
            shutdown,
            shutdown_timeout: self.shutdown_timeout,
        })
    }

    /// Starts, runs until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<ShutdownReport, HostError> {
        let running = self.start().await?;
        shutdown.await;
        Ok(running.shutdown().await)
    }
}

pub(crate) fn info(h: &LoadedHandler) -> HandlerInfo {
    info_of(&h.manifest, &h.compiled, h.cache)
}

fn info_of(m: &Manifest, compiled: &crate::engine::Compiled, cache: CacheOutcome) -> HandlerInfo {
    HandlerInfo {
        name: m.name.clone(),
        tenant: m.tenant.clone(),
        version: compiled.digest.clone(),
        triggers: m.triggers.clone(),
        origin: m.origin.clone(),
        cache,
    }
}

/// A host whose triggers are bound and serving.
pub struct RunningHost {
    host_connection: Option<(async_nats::Client, bool)>,
    load_errors: Vec<LoadError>,
    reloader: Arc<Reloader>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Invocations still running at the deadline, abandoned.
    pub abandoned: usize,
    /// Whether everything finished before the deadline.
    pub clean: bool,
}

impl RunningHost {
    /// Handlers that are not running: those that failed to load, and those
    /// whose triggers could not be bound.
    pub fn load_errors(&self) -> &[LoadError] {
        &self.load_errors
    }

    /// The handlers that are serving, in name order.
    pub fn handlers(&self) -> Vec<HandlerInfo> {
        self.reloader.current().iter().map(|h| info(h)).collect()
    }

    /// Counters of every handler.
    pub fn stats(&self) -> Vec<(HandlerInfo, HandlerStats)> {
        self.reloader.current().iter().map(|h| (info(h), h.stats.snapshot())).collect()
    }

    /// Counters of the handler named `name` (in any tenant).
    pub fn handler_stats(&self, name: &str) -> Option<HandlerStats> {
        self.reloader.current().iter().find(|h| h.manifest.name.as_str() == name).map(|h| h.stats.snapshot())
    }

    /// Every tenant's counters.
    pub fn tenant_stats(&self) -> Vec<(TenantId, TenantStats)> {
        let tenants = self.dispatcher.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        tenants.all().map(|t| (t.id.clone(), t.stats())).collect()
    }

    /// Re-reads the handlers directories and applies what changed: new
    /// handlers are bound, changed ones swapped (or rebound when their
    /// triggers changed), removed ones drained and unbound. A file that does
    /// not load leaves the version that was serving in place.
    pub async fn reload(&self) -> ReloadReport {
        self.reloader.reload().await
    }

    /// Watches the handlers directories (and the folders of their
    /// components) and reloads when a manifest or component changes, until
    /// shutdown. `on_reload` sees every report, e.g. to print it.
    pub fn watch(&self, on_reload: impl Fn(&ReloadReport) + Send + 'static) -> Result<(), ReloadError> {
        crate::reload::watch(self.reloader.clone(), on_reload)
    }

    /// Stops taking messages, lets in-flight invocations finish until the
    /// shutdown timeout, abandons the rest, and flushes what they sent.
    pub async fn shutdown(self) -> ShutdownReport {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.shutdown.cancel();
        let triggers_done = self.reloader.unbind_all();
        let tracker = self.dispatcher.invocations.clone();
        let mut clean = tokio::time::timeout_at(deadline, async {
            triggers_done.await;
            tracker.close();
            tracker.wait().await;
        })
        .await
        .is_ok();
        let abandoned = self.dispatcher.invocations.len();
        if !clean {
            tracing::warn!(abandoned, "shutdown deadline reached; abandoning running invocations");
            self.dispatcher.abandon.cancel();
            self.dispatcher.invocations.close();
            self.dispatcher.invocations.wait().await;
        }
        // Replies and publishes of the last invocations are still in the
        // client's buffer: push them out before letting go.
        // Client::drain closes without waiting for buffered publishes, so
        // flush first: the round trip proves the server has every reply and
        // ack.
        // Both are bounded: a server that is gone never answers.
        if !self.dispatcher.flush().await {
            clean = false;
        }
        let mut owned =
            self.dispatcher.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner).owned_connections();
        if let Some((nats, true)) = &self.host_connection {
            owned.push(nats.clone());
        }
        for nats in owned {
            match tokio::time::timeout(FLUSH_TIMEOUT, nats.drain()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("cannot drain a NATS connection on shutdown: {e}"),
                Err(_) => tracing::warn!("a NATS connection did not drain within {FLUSH_TIMEOUT:?}; closing it"),
            }
        }
        tracing::info!(abandoned, clean, "natsfn stopped");
        ShutdownReport { abandoned, clean }
    }
}
