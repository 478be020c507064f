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
use crate::hostcalls::Buckets;
use crate::limits::{DEFAULT_MAX_INSTANCES, DEFAULT_SHUTDOWN_TIMEOUT};
use crate::manifest::{self, HandlerName, Manifest, ManifestError, TenantId, Trigger};
use crate::registry::{Binding, HandlerSlot};
use crate::reload::{Entry, HandlerKey, Registry, ReloadError, ReloadReport, Reloader};
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
}

/// Where the host's NATS connection comes from.
enum NatsSource {
    None,
    Url(String),
    Client(async_nats::Client),
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
}

impl HostBuilder {
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

    /// Connects, then loads and compiles every handler. Handlers that fail
    /// to load are listed in [`Host::load_errors`] (and logged); only a
    /// problem that affects every handler is an error here.
    pub async fn build(self) -> Result<Host, HostError> {
        let (nats, owns_connection) = match self.nats {
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
        let engine = Engine::new(self.max_instances, self.cache_dir).map_err(HostError::Engine)?;

        let (handlers, load_errors, fingerprints) = load_all(&engine, &self.dirs, self.inline).await?;

        Ok(Host {
            engine,
            nats,
            owns_connection,
            handlers,
            load_errors,
            max_instances: self.max_instances,
            shutdown_timeout: self.shutdown_timeout,
            create_streams: self.create_streams,
            dirs: self.dirs,
            fingerprints,
        })
    }
}

/// Loads every handler from `dirs` and `inline`: the loaded ones, and an
/// error for each that was skipped.
async fn load_all(
    engine: &Engine,
    dirs: &[PathBuf],
    inline: Vec<InlineHandler>,
) -> Result<(Vec<Arc<LoadedHandler>>, Vec<LoadError>, HashMap<HandlerKey, String>), HostError> {
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

    let mut handlers: Vec<Arc<LoadedHandler>> = Vec::new();
    let mut load_errors = Vec::new();
    let mut fingerprints = HashMap::new();
    for candidate in candidates {
        let loaded = match candidate {
            Ok((manifest, wasm)) => load(engine, manifest, wasm, &handlers).await,
            Err(e) => Err(e),
        };
        match loaded {
            Ok((h, fingerprint)) => {
                log_loaded(&h);
                if let Some(fp) = fingerprint {
                    fingerprints.insert((h.manifest.tenant.clone(), h.manifest.name.clone()), fp);
                }
                handlers.push(Arc::new(h));
            }
            Err(e) => {
                tracing::error!("handler not loaded: {e}");
                load_errors.push(e);
            }
        }
    }
    Ok((handlers, load_errors, fingerprints))
}

/// Loads and compiles the handlers in `dirs` without connecting to NATS:
/// what `natsfn validate` runs. Returns what loaded and what did not.
pub async fn validate(dirs: &[PathBuf]) -> Result<(Vec<HandlerInfo>, Vec<LoadError>), HostError> {
    let engine = Engine::new(1, None).map_err(HostError::Engine)?;
    let (handlers, errors, _) = load_all(&engine, dirs, Vec::new()).await?;
    Ok((handlers.iter().map(|h| info(h)).collect(), errors))
}

/// Reads (if needed) and compiles one handler's component off the async
/// worker threads, and rejects a name already taken by a handler given
/// another way (directories check duplicates among themselves). Handlers
/// from files come with their fingerprint, which reload compares.
async fn load(
    engine: &Engine,
    manifest: Manifest,
    wasm: Option<Vec<u8>>,
    loaded: &[Arc<LoadedHandler>],
) -> Result<(LoadedHandler, Option<String>), LoadError> {
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
    let (wasm, fingerprint) = match wasm {
        Some(w) => (w, None),
        None => {
            let (wasm, fingerprint) = crate::reload::read_sources(&manifest).await?;
            (wasm, Some(fingerprint))
        }
    };
    let path = manifest.component.clone().unwrap_or_else(|| manifest.origin.clone());
    let (compiled, cache) = compile(engine, wasm, path).await?;
    Ok((LoadedHandler::new(manifest, compiled, cache), fingerprint))
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

fn log_loaded(h: &LoadedHandler) {
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
    nats: async_nats::Client,
    owns_connection: bool,
    handlers: Vec<Arc<LoadedHandler>>,
    load_errors: Vec<LoadError>,
    max_instances: u32,
    shutdown_timeout: Duration,
    create_streams: bool,
    dirs: Vec<PathBuf>,
    /// Fingerprints of the handlers loaded from files, for reload.
    fingerprints: HashMap<HandlerKey, String>,
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

    /// The NATS client the host uses.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Binds every trigger and returns once the server has them (after a
    /// flush), so a message published after this returns is delivered.
    pub async fn start(self) -> Result<RunningHost, HostError> {
        let shutdown = CancellationToken::new();
        let dispatcher = Dispatcher {
            engine: self.engine,
            nats: self.nats.clone(),
            buckets: Arc::new(Buckets::new(self.nats.clone())),
            instance_permits: Arc::new(tokio::sync::Semaphore::new(self.max_instances as usize)),
            invocations: TaskTracker::new(),
            abandon: CancellationToken::new(),
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
        if let Err(e) = self.nats.flush().await {
            tracing::warn!("cannot flush subscriptions to the server: {e}");
        }
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
            nats: self.nats,
            owns_connection: self.owns_connection,
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
    HandlerInfo {
        name: h.manifest.name.clone(),
        tenant: h.manifest.tenant.clone(),
        version: h.compiled.digest.clone(),
        triggers: h.manifest.triggers.clone(),
        origin: h.manifest.origin.clone(),
        cache: h.cache,
    }
}

/// A host whose triggers are bound and serving.
pub struct RunningHost {
    nats: async_nats::Client,
    owns_connection: bool,
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
        // flush first: the PONG proves the server has every reply and ack.
        if let Err(e) = self.nats.flush().await {
            tracing::warn!("cannot flush the NATS connection on shutdown: {e}");
            clean = false;
        }
        if self.owns_connection {
            if let Err(e) = self.nats.drain().await {
                tracing::warn!("cannot drain the NATS connection on shutdown: {e}");
            }
        }
        tracing::info!(abandoned, clean, "natsfn stopped");
        ShutdownReport { abandoned, clean }
    }
}
