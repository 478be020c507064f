//! Hot reload: bringing a running host in line with its handlers
//! directories, and watching them so that happens by itself.
//!
//! A reload compares each manifest and component with what is serving (by a
//! fingerprint of both files' bytes) and acts only on differences:
//! - new handler → compiled, bound;
//! - changed handler, same triggers → compiled off the hot path, then its
//!   slot is pointed at the new version: subscriptions stay open, in-flight
//!   invocations finish on the old version, the next message gets the new;
//! - changed triggers → the old binding is drained and unbound, then the new
//!   one bound (a core subject no longer bound misses what is published in
//!   between, as core NATS does; JetStream consumers pick up where they were);
//! - removed handler → drained and unbound.
//!
//! Anything that fails to load (a half-written file, a broken component, a
//! bad manifest) is reported and changes nothing: the previous version keeps
//! serving, and the next change to the file is tried again. Reloads are
//! serialized, so two quick saves never race.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::dispatch::{Dispatcher, LoadedHandler};
use crate::engine::CacheOutcome;
use crate::host::{compile, LoadError};
use crate::manifest::{self, HandlerName, Manifest, TenantId};
use crate::registry::{Binding, HandlerSlot};

/// A handler's identity: unique per tenant.
pub(crate) type HandlerKey = (TenantId, HandlerName);

/// One serving handler.
pub(crate) struct Entry {
    pub(crate) slot: Arc<HandlerSlot>,
    pub(crate) binding: Binding,
    /// Hash of the manifest and component bytes; empty for inline handlers.
    pub(crate) fingerprint: String,
    /// Whether it came from a handlers directory (inline handlers are never
    /// reloaded or removed by a reload).
    pub(crate) from_dir: bool,
}

pub(crate) type Registry = HashMap<HandlerKey, Entry>;

/// Why watching could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file watcher could not be set up.
    #[error("cannot watch {}: {source}", path.display())]
    Watch {
        /// The folder.
        path: PathBuf,
        /// What the watcher said.
        source: notify::Error,
    },
}

/// What changed for one handler in a reload.
#[derive(Debug, Clone)]
pub struct ReloadChange {
    /// The handler.
    pub handler: HandlerName,
    /// Its tenant.
    pub tenant: TenantId,
    /// What happened.
    pub kind: ChangeKind,
    /// The version now serving (empty when removed).
    pub version: String,
    /// Time spent compiling (or loading from the cache).
    pub compile: Duration,
    /// Time from the compiled version being ready to it serving.
    pub swap: Duration,
    /// Whether the compiled code came from the cache.
    pub cache: Option<CacheOutcome>,
}

/// The kinds of change a reload applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A new handler was loaded and bound.
    Added,
    /// A new version was swapped in; its triggers were kept open.
    Updated,
    /// A new version whose triggers changed: unbound, then bound anew.
    Rebound,
    /// The handler's files are gone: drained and unbound.
    Removed,
}

/// The outcome of one reload.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// What changed.
    pub changes: Vec<ReloadChange>,
    /// What could not be loaded; for a handler that was serving, its
    /// previous version still is.
    pub errors: Vec<LoadError>,
}

/// The reloadable state of a running host.
pub(crate) struct Reloader {
    pub(crate) registry: Mutex<Registry>,
    pub(crate) reload_lock: tokio::sync::Mutex<()>,
    pub(crate) dirs: Vec<PathBuf>,
    pub(crate) create_streams: bool,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) shutdown: CancellationToken,
}

/// Reads a manifest's component and fingerprints manifest plus component.
pub(crate) async fn read_sources(manifest: &Manifest) -> Result<(Vec<u8>, String), LoadError> {
    let read = |path: PathBuf| async move {
        tokio::fs::read(&path).await.map_err(|source| LoadError::ReadComponent { path, source })
    };
    let text = read(manifest.origin.clone()).await?;
    let component = manifest.component.clone().unwrap_or_else(|| manifest.origin.clone());
    let wasm = read(component).await?;
    let mut h = Sha256::new();
    h.update((text.len() as u64).to_le_bytes());
    h.update(&text);
    h.update(&wasm);
    let fingerprint = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((wasm, fingerprint))
}

impl Reloader {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // Nothing panics while holding this lock; recover rather than crash.
        self.registry.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current version of every serving handler, by name.
    pub(crate) fn current(&self) -> Vec<Arc<LoadedHandler>> {
        let mut all: Vec<_> = self.lock().values().map(|e| e.slot.current()).collect();
        all.sort_by(|a, b| a.manifest.name.cmp(&b.manifest.name));
        all
    }

    /// Unbinds every handler (shutdown).
    pub(crate) async fn unbind_all(&self) {
        let entries: Vec<Entry> = self.lock().drain().map(|(_, e)| e).collect();
        futures::future::join_all(entries.into_iter().map(|e| e.binding.unbind())).await;
    }

    pub(crate) async fn reload(&self) -> ReloadReport {
        let _serial = self.reload_lock.lock().await;
        let mut report = ReloadReport::default();
        if self.shutdown.is_cancelled() {
            return report;
        }

        // What the directories say now. Files that fail to parse still
        // count as present, so their handlers are kept, not removed.
        let mut present: HashSet<PathBuf> = HashSet::new();
        let mut manifests = Vec::new();
        for dir in &self.dirs {
            match manifest::discover(dir) {
                Ok(found) => {
                    for m in found {
                        match m {
                            Ok(m) => {
                                present.insert(m.origin.clone());
                                manifests.push(m);
                            }
                            Err(e) => {
                                present.insert(e.path().to_owned());
                                report.errors.push(e.into());
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(dir = %dir.display(), "cannot list handlers directory: {e}"),
            }
        }

        let mut seen: HashSet<HandlerKey> = HashSet::new();
        for manifest in manifests {
            let key = (manifest.tenant.clone(), manifest.name.clone());
            seen.insert(key.clone());
            match self.apply(key, manifest).await {
                Ok(Some(change)) => report.changes.push(change),
                Ok(None) => {}
                Err(e) => report.errors.push(e),
            }
        }
        self.dispatcher.engine.release_compiler_memory();

        // Handlers whose manifest is gone (and did not just fail to parse).
        let removed: Vec<(HandlerKey, Entry)> = {
            let mut registry = self.lock();
            let gone: Vec<HandlerKey> = registry
                .iter()
                .filter(|(key, e)| {
                    e.from_dir && !seen.contains(*key) && !present.contains(&e.slot.current().manifest.origin)
                })
                .map(|(key, _)| key.clone())
                .collect();
            gone.into_iter().filter_map(|k| registry.remove(&k).map(|e| (k, e))).collect()
        };
        for ((tenant, handler), entry) in removed {
            let started = Instant::now();
            entry.binding.unbind().await;
            entry.slot.current().retire();
            tracing::info!(%handler, %tenant, "handler removed");
            report.changes.push(ReloadChange {
                handler,
                tenant,
                kind: ChangeKind::Removed,
                version: String::new(),
                compile: Duration::ZERO,
                swap: started.elapsed(),
                cache: None,
            });
        }
        for e in &report.errors {
            tracing::error!("reload: not loaded, previous version (if any) keeps serving: {e}");
        }
        report
    }

    /// Loads `manifest` and puts it in service if it differs from what is
    /// serving under `key`.
    async fn apply(&self, key: HandlerKey, mut manifest: Manifest) -> Result<Option<ReloadChange>, LoadError> {
        let (wasm, fingerprint) = read_sources(&manifest).await?;
        let existing = self.lock().get(&key).map(|e| (e.slot.clone(), e.fingerprint.clone(), e.from_dir));
        if let Some((_, old_fp, from_dir)) = &existing {
            if !from_dir {
                // An inline handler owns this name; the file is a duplicate.
                return Err(LoadError::Manifest(manifest::ManifestError::Duplicate {
                    path: manifest.origin.clone(),
                    name: key.1,
                    tenant: key.0,
                    first: PathBuf::from("a handler given to the builder"),
                }));
            }
            if *old_fp == fingerprint {
                return Ok(None);
            }
        }
        // A new handler must fit in its tenant's handler count; every
        // version is held to the tenant's limits.
        let in_tenant = match existing {
            Some(_) => 0,
            None => self.lock().keys().filter(|(t, _)| *t == manifest.tenant).count(),
        };
        let tenant = {
            let mut tenants = self.dispatcher.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            crate::host::admit(&mut tenants, &mut manifest, &self.dispatcher.engine, in_tenant)?
        };

        let path = manifest.component.clone().unwrap_or_else(|| manifest.origin.clone());
        let compiling = Instant::now();
        let (compiled, cache) = compile(&self.dispatcher.engine, wasm, path).await?;
        let compile_time = compiling.elapsed();
        let swapping = Instant::now();
        let version = compiled.digest.clone();
        let (tenant_id, handler) = key.clone();

        let kind = match existing {
            None => {
                let next = Arc::new(LoadedHandler::new(manifest, compiled, cache, tenant));
                let slot = HandlerSlot::new(next.clone());
                let binding = self.bind(&slot, &next).await?;
                self.lock().insert(key, Entry { slot, binding, fingerprint, from_dir: true });
                ChangeKind::Added
            }
            Some((slot, _, _)) => {
                let old = slot.current();
                let next = Arc::new(old.successor(manifest, compiled, cache));
                if old.manifest.triggers == next.manifest.triggers {
                    slot.replace(next);
                    if let Some(e) = self.lock().get_mut(&key) {
                        e.fingerprint = fingerprint;
                    }
                    ChangeKind::Updated
                } else {
                    // Drain and unbind the old triggers, then bind the new
                    // ones on a fresh slot; if that fails, the old version is
                    // bound again on its old triggers (below).
                    let fresh = HandlerSlot::new(next.clone());
                    let old_entry = self.lock().remove(&key);
                    if let Some(old_entry) = old_entry {
                        old_entry.binding.unbind().await;
                    }
                    match self.bind(&fresh, &next).await {
                        Ok(binding) => {
                            old.retire();
                            self.lock().insert(key, Entry { slot: fresh, binding, fingerprint, from_dir: true });
                        }
                        Err(e) => {
                            // Put the old version back on its old triggers.
                            let binding = self.bind(&slot, &old).await?;
                            self.lock()
                                .insert(key, Entry { slot, binding, fingerprint: String::new(), from_dir: true });
                            return Err(e);
                        }
                    }
                    ChangeKind::Rebound
                }
            }
        };
        let change = ReloadChange {
            handler,
            tenant: tenant_id,
            kind,
            version,
            compile: compile_time,
            swap: swapping.elapsed(),
            cache: Some(cache),
        };
        tracing::info!(
            handler = %change.handler,
            tenant = %change.tenant,
            version = &change.version[..12],
            kind = ?change.kind,
            compile_ms = change.compile.as_secs_f64() * 1e3,
            swap_ms = change.swap.as_secs_f64() * 1e3,
            cache = ?change.cache,
            "handler reloaded"
        );
        Ok(Some(change))
    }

    async fn bind(&self, slot: &Arc<HandlerSlot>, handler: &LoadedHandler) -> Result<Binding, LoadError> {
        let bound =
            Binding::bind(slot, &handler.manifest.triggers, self.create_streams, &self.dispatcher, &self.shutdown)
                .await
                .map_err(|source| LoadError::Bind {
                    path: handler.manifest.origin.clone(),
                    handler: handler.manifest.name.clone(),
                    source: Box::new(source),
                });
        // New subscriptions must reach the server before the change is
        // reported as serving.
        self.dispatcher.flush().await;
        bound
    }

    /// Folders to watch: the handlers directories, and the folders the
    /// serving components live in (often a build's output folder).
    fn watched_folders(&self) -> HashSet<PathBuf> {
        let mut folders: HashSet<PathBuf> = self.dirs.iter().cloned().collect();
        for h in self.current() {
            if let Some(parent) = h.manifest.component.as_deref().and_then(Path::parent) {
                folders.insert(parent.to_owned());
            }
        }
        folders
    }
}

/// How long the file system must be quiet before a reload: long enough for
/// a compiler to finish writing a component, short enough to feel instant.
const SETTLE: Duration = Duration::from_millis(300);

/// Starts the watcher task; it ends at shutdown.
pub(crate) fn watch(
    reloader: Arc<Reloader>,
    on_reload: impl Fn(&ReloadReport) + Send + 'static,
) -> Result<(), ReloadError> {
    use notify::RecursiveMode;

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut debouncer = notify_debouncer_full::new_debouncer(SETTLE, None, move |result| {
        let _ = tx.send(result);
    })
    .map_err(|source| ReloadError::Watch { path: PathBuf::from("."), source })?;
    let mut watching = HashSet::new();
    for folder in reloader.watched_folders() {
        let mode = if reloader.dirs.contains(&folder) { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
        debouncer.watch(&folder, mode).map_err(|source| ReloadError::Watch { path: folder.clone(), source })?;
        watching.insert(folder);
    }

    tokio::spawn(async move {
        loop {
            let events = tokio::select! {
                e = rx.recv() => e,
                () = reloader.shutdown.cancelled() => break,
            };
            let Some(result) = events else { break };
            let relevant = match result {
                Ok(events) => events.iter().any(|e| {
                    !e.kind.is_access()
                        && e.paths.iter().any(|p| p.extension().is_some_and(|x| x == "toml" || x == "wasm"))
                }),
                Err(errors) => {
                    tracing::warn!("file watcher: {errors:?}");
                    false
                }
            };
            if !relevant {
                continue;
            }
            let report = reloader.reload().await;
            on_reload(&report);
            // A new handler may live next to components in another folder.
            for folder in reloader.watched_folders() {
                if watching.insert(folder.clone()) {
                    if let Err(e) = debouncer.watch(&folder, RecursiveMode::NonRecursive) {
                        tracing::warn!(folder = %folder.display(), "cannot watch component folder: {e}");
                    }
                }
            }
        }
        drop(debouncer);
    });
    Ok(())
}
