//! The compiled-code cache: machine code for a component, on disk, keyed by
//! the component's content hash and the engine's compilation settings, so a
//! restart or a reload of an unchanged component skips Cranelift.
//!
//! Entries are written to a temporary file and renamed into place, so a
//! crash never leaves a half-written entry under a valid name. The key
//! includes wasmtime's own compatibility hash (version, target, settings):
//! code compiled by another engine configuration is never loaded.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;

/// Whether a compilation was served from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from the cache.
    Hit,
    /// Compiled (and stored, when there is a cache).
    Miss,
    /// Already loaded for another handler (or version) with the same
    /// component bytes: the code in memory is shared, nothing was read.
    Shared,
}

/// A directory of precompiled components.
#[derive(Debug, Clone)]
pub(crate) struct CodeCache {
    dir: PathBuf,
}

impl CodeCache {
    pub(crate) fn new(dir: PathBuf) -> Self {
        CodeCache { dir }
    }

    fn entry(&self, engine: &wasmtime::Engine, digest: &str) -> PathBuf {
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        self.dir.join(format!("{digest}-{:016x}.cwasm", h.finish()))
    }

    /// The cached component for `digest`, if there is a usable one.
    pub(crate) fn load(&self, engine: &wasmtime::Engine, digest: &str) -> Option<Component> {
        let path = self.entry(engine, digest);
        if !path.is_file() {
            return None;
        }
        // SAFETY: the file is in natsfn's own cache directory, was written by
        // `store` below from `Component::serialize` of an engine with the
        // same compatibility hash (part of the file name), and is replaced
        // only by atomic rename. A corrupt entry fails deserialization's
        // checks and is recompiled.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unusable compiled-code cache entry: {e:#}");
                None
            }
        }
    }

    /// Stores `component` for `digest` and returns it as loaded back from
    /// its entry, the same code a restart would load. Freshly compiled,
    /// the code sits in the process's anonymous memory; loaded from the
    /// entry it is a private mapping of the file, whose clean pages the
    /// kernel shares between hosts running the same component and can
    /// reclaim under memory pressure (BENCHMARKS.md, "Distinct components
    /// idle"). A failure to write or to load back costs only that: it is
    /// logged, and the compiled component is returned.
    pub(crate) fn store(&self, engine: &wasmtime::Engine, digest: &str, component: Component) -> Component {
        let path = self.entry(engine, digest);
        let written = component
            .serialize()
            .map_err(|e| format!("{e:#}"))
            .and_then(|bytes| write_atomically(&self.dir, &path, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), "cannot write compiled-code cache entry: {e}");
            return component;
        }
        self.load(engine, digest).unwrap_or(component)
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
