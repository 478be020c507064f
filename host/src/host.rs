//! The embedding API: [`Host::builder`] → [`Host`] (handlers loaded) →
//! [`RunningHost`] (triggers bound) → [`ShutdownReport`].
//!
//! Loading is forgiving and running is strict. A manifest or component that
//! cannot be used is reported in [`Host::load_errors`] and skipped, so one bad
//! file never keeps the others from serving. Once the host runs, shutdown is
//! ordered: triggers stop taking messages (subscriptions are drained), the
//! invocations already admitted finish or are abandoned at the deadline, and
//! the connection is flushed so their replies and publishes are not lost.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::dispatch::{Dispatcher, HandlerStats, LoadedHandler};
use crate::engine::{Engine, EngineError};
use crate::limits::{DEFAULT_MAX_INSTANCES, DEFAULT_SHUTDOWN_TIMEOUT};
use crate::manifest::{self, HandlerName, Manifest, ManifestError, TenantId, Trigger};
use crate::triggers::{self, TriggerError};

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
    /// The WebAssembly engine could not be set up.
    #[error(transparent)]
    Engine(EngineError),
    /// A trigger could not be bound.
    #[error("handler {handler}: {source}")]
    Trigger {
        /// The handler whose trigger failed.
        handler: HandlerName,
        /// What went wrong.
        source: TriggerError,
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
}

impl HostBuilder {
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
        self.inline.push(InlineHandler {
            manifest: manifest_toml.into(),
            origin: label.into(),
            wasm: wasm.into(),
        });
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
        let engine = Engine::new(self.max_instances).map_err(HostError::Engine)?;

        let (handlers, load_errors) = load_all(&engine, &self.dirs, self.inline).await?;

        Ok(Host {
            engine,
            nats,
            owns_connection,
            handlers,
            load_errors,
            max_instances: self.max_instances,
            shutdown_timeout: self.shutdown_timeout,
        })
    }
}

/// Loads every handler from `dirs` and `inline`: the loaded ones, and an
/// error for each that was skipped.
async fn load_all(
    engine: &Engine,
    dirs: &[PathBuf],
    inline: Vec<InlineHandler>,
) -> Result<(Vec<Arc<LoadedHandler>>, Vec<LoadError>), HostError> {
    // A manifest, with its component bytes when they were given inline.
    type Candidate = Result<(Manifest, Option<Vec<u8>>), LoadError>;
    let mut candidates: Vec<Candidate> = Vec::new();
    for dir in dirs {
        let found = manifest::discover(dir).map_err(|source| HostError::HandlersDir {
            path: dir.clone(),
            source,
        })?;
        candidates.extend(
            found
                .into_iter()
                .map(|m| m.map(|m| (m, None)).map_err(LoadError::from)),
        );
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
    for candidate in candidates {
        let loaded = match candidate {
            Ok((manifest, wasm)) => load(engine, manifest, wasm, &handlers).await,
            Err(e) => Err(e),
        };
        match loaded {
            Ok(h) => {
                log_loaded(&h);
                handlers.push(Arc::new(h));
            }
            Err(e) => {
                tracing::error!("handler not loaded: {e}");
                load_errors.push(e);
            }
        }
    }
    Ok((handlers, load_errors))
}

/// Loads and compiles the handlers in `dirs` without connecting to NATS:
/// what `natsfn validate` runs. Returns what loaded and what did not.
pub async fn validate(dirs: &[PathBuf]) -> Result<(Vec<HandlerInfo>, Vec<LoadError>), HostError> {
    let engine = Engine::new(1).map_err(HostError::Engine)?;
    let (handlers, errors) = load_all(&engine, dirs, Vec::new()).await?;
    Ok((handlers.iter().map(|h| info(h)).collect(), errors))
}

/// Reads (if needed) and compiles one handler's component off the async
/// worker threads, and rejects a name already taken by a handler given
/// another way (directories check duplicates among themselves).
async fn load(
    engine: &Engine,
    manifest: Manifest,
    wasm: Option<Vec<u8>>,
    loaded: &[Arc<LoadedHandler>],
) -> Result<LoadedHandler, LoadError> {
    if let Some(first) = loaded
        .iter()
        .find(|h| h.manifest.name == manifest.name && h.manifest.tenant == manifest.tenant)
    {
        return Err(LoadError::Manifest(ManifestError::Duplicate {
            path: manifest.origin.clone(),
            name: manifest.name.clone(),
            tenant: manifest.tenant.clone(),
            first: first.manifest.origin.clone(),
        }));
    }
    let path = manifest
        .component
        .clone()
        .unwrap_or_else(|| manifest.origin.clone());
    let wasm = match wasm {
        Some(w) => w,
        None => tokio::fs::read(&path)
            .await
            .map_err(|source| LoadError::ReadComponent {
                path: path.clone(),
                source,
            })?,
    };
    let engine = engine.clone();
    let compiled = tokio::task::spawn_blocking(move || engine.compile(&wasm))
        .await
        .unwrap_or_else(|join| {
            Err(EngineError::Compile(wasmtime::Error::msg(format!(
                "compiler task failed: {join}"
            ))))
        })
        .map_err(|source| LoadError::Component { path, source })?;
    Ok(LoadedHandler::new(manifest, compiled))
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
            instance_permits: Arc::new(tokio::sync::Semaphore::new(self.max_instances as usize)),
            invocations: TaskTracker::new(),
            abandon: CancellationToken::new(),
        };
        let mut triggers = Vec::new();
        for handler in &self.handlers {
            for trigger in &handler.manifest.triggers {
                let bound = triggers::bind(
                    trigger,
                    handler.clone(),
                    dispatcher.clone(),
                    shutdown.clone(),
                )
                .await;
                match bound {
                    Ok(task) => triggers.push(task),
                    Err(source) => {
                        shutdown.cancel();
                        dispatcher.abandon.cancel();
                        return Err(HostError::Trigger {
                            handler: handler.manifest.name.clone(),
                            source,
                        });
                    }
                }
            }
        }
        if let Err(e) = self.nats.flush().await {
            tracing::warn!("cannot flush subscriptions to the server: {e}");
        }
        tracing::info!(
            handlers = self.handlers.len(),
            triggers = triggers.len(),
            "natsfn ready"
        );
        Ok(RunningHost {
            nats: self.nats,
            owns_connection: self.owns_connection,
            handlers: self.handlers,
            dispatcher,
            shutdown,
            triggers,
            shutdown_timeout: self.shutdown_timeout,
        })
    }

    /// Starts, runs until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<ShutdownReport, HostError> {
        let running = self.start().await?;
        shutdown.await;
        Ok(running.shutdown().await)
    }
}

fn info(h: &LoadedHandler) -> HandlerInfo {
    HandlerInfo {
        name: h.manifest.name.clone(),
        tenant: h.manifest.tenant.clone(),
        version: h.compiled.digest.clone(),
        triggers: h.manifest.triggers.clone(),
        origin: h.manifest.origin.clone(),
    }
}

/// A host whose triggers are bound and serving.
pub struct RunningHost {
    nats: async_nats::Client,
    owns_connection: bool,
    handlers: Vec<Arc<LoadedHandler>>,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
    triggers: Vec<tokio::task::JoinHandle<()>>,
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
    /// Counters of every handler, by name and tenant.
    pub fn stats(&self) -> Vec<(HandlerInfo, HandlerStats)> {
        self.handlers
            .iter()
            .map(|h| (info(h), h.stats.snapshot()))
            .collect()
    }

    /// Counters of the handler named `name` (in any tenant).
    pub fn handler_stats(&self, name: &str) -> Option<HandlerStats> {
        self.handlers
            .iter()
            .find(|h| h.manifest.name.as_str() == name)
            .map(|h| h.stats.snapshot())
    }

    /// Stops taking messages, lets in-flight invocations finish until the
    /// shutdown timeout, abandons the rest, and flushes what they sent.
    pub async fn shutdown(self) -> ShutdownReport {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.shutdown.cancel();
        let triggers_done = futures::future::join_all(self.triggers);
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
            tracing::warn!(
                abandoned,
                "shutdown deadline reached; abandoning running invocations"
            );
            self.dispatcher.abandon.cancel();
            self.dispatcher.invocations.close();
            self.dispatcher.invocations.wait().await;
        }
        // Replies and publishes of the last invocations are still in the
        // client's buffer: push them out before letting go.
        // Client::drain closes without waiting for buffered publishes, so
        // flush first: the PONG proves the server has every reply.
        // (The same fix as main's 2eccd80, which this branch predates.)
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
