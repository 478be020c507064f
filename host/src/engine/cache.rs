//! The compiled-code cache: machine code for a component, on disk, keyed by
//! the component's content hash and the engine's compilation settings, so a
//! restart or a reload of an unchanged component skips Cranelift.
//!
//! Entries are written to a temporary file and renamed into place, so a
//! crash never leaves a half-written entry under a valid name. The key
//! includes wasmtime's own compatibility hash (version, target, settings):
//! code compiled by another engine configuration is never loaded.
//!
//! Every rebuild of a component during development, and every natsfn
//! upgrade, adds entries that nothing loads again, so the cache is bounded:
//! past [`MAX_BYTES`], the entries least recently stored or loaded go. An
//! entry a running host has loaded stays mapped after its file is removed,
//! so eviction never disturbs a host, even another one sharing the folder.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

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

/// How large the cache may grow before its least recently used entries go:
/// room for a few hundred typical components (~0.15-2 MB each).
pub(crate) const MAX_BYTES: u64 = 512 << 20;

/// What an eviction brings the cache down to, so that a cache at its limit
/// is not swept again by every store.
const AFTER_EVICTION: u64 = MAX_BYTES / 4 * 3;

/// The file name ending of an entry.
const ENTRY_SUFFIX: &str = ".cwasm";

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
        self.dir.join(format!("{digest}-{:016x}{ENTRY_SUFFIX}", h.finish()))
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
        // only by atomic rename and removed only by unlinking (eviction), so
        // the mapped contents never change under a host. A corrupt entry
        // fails deserialization's checks and is recompiled.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => {
                // Used now: the last entry eviction would take. Failing to
                // mark it only makes it an earlier candidate.
                let _ =
                    std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                Some(c)
            }
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
        evict(&self.dir, MAX_BYTES, AFTER_EVICTION, &path);
        self.load(engine, digest).unwrap_or(component)
    }
}

/// When the entries in `dir` take more than `max` bytes, removes the least
/// recently used (oldest modification time) until they take at most
/// `down_to`, never `keep` (the entry just stored). Other files are left
/// alone. Best effort: a file that cannot be read or removed (another host
/// may remove it first) is skipped.
fn evict(dir: &Path, max: u64, down_to: u64, keep: &Path) {
    let Ok(listing) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<(SystemTime, u64, PathBuf)> = listing
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(ENTRY_SUFFIX))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), e.path()))
        })
        .collect();
    let mut total: u64 = entries.iter().map(|(_, len, _)| len).sum();
    if total <= max {
        return;
    }
    entries.sort();
    for (_, len, path) in entries {
        if total <= down_to {
            break;
        }
        if path == keep {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total = total.saturating_sub(len);
                tracing::debug!(path = %path.display(), "evicted a compiled-code cache entry");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => total = total.saturating_sub(len),
            Err(e) => tracing::debug!(path = %path.display(), "cannot evict a compiled-code cache entry: {e}"),
        }
    }
}

fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Writes a `len`-byte file named `name` in `dir`, last modified `age`
    /// seconds ago.
    fn file(dir: &Path, name: &str, len: usize, age: u64) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, vec![0u8; len]).unwrap();
        let when = SystemTime::now() - Duration::from_secs(age);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(when).unwrap();
        path
    }

    #[test]
    fn eviction_removes_the_least_recently_used_entries_down_to_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let oldest = file(dir.path(), "a-1.cwasm", 100, 400);
        let old = file(dir.path(), "b-1.cwasm", 100, 300);
        let recent = file(dir.path(), "c-1.cwasm", 100, 200);
        let newest = file(dir.path(), "d-1.cwasm", 100, 100);
        let other = file(dir.path(), "notes.txt", 1000, 500);
        // 400 bytes of entries against a limit of 350: down to 250.
        evict(dir.path(), 350, 250, &newest);
        assert!(!oldest.exists() && !old.exists(), "the two least recently used go");
        assert!(recent.exists() && newest.exists());
        assert!(other.exists(), "files that are not entries are not the cache's to remove");
    }

    #[test]
    fn eviction_leaves_a_cache_within_its_limit_and_never_takes_the_entry_just_stored() {
        let dir = tempfile::tempdir().unwrap();
        let a = file(dir.path(), "a-1.cwasm", 100, 200);
        let b = file(dir.path(), "b-1.cwasm", 100, 100);
        evict(dir.path(), 200, 0, &b);
        assert!(a.exists() && b.exists(), "at the limit nothing goes");
        // Were the entry just stored the oldest (a clock set back), it
        // would stay and the others go.
        let stored = file(dir.path(), "c-1.cwasm", 100, 300);
        evict(dir.path(), 200, 0, &stored);
        assert!(stored.exists());
        assert!(!a.exists() && !b.exists());
        // A folder that is not there is no error.
        evict(&dir.path().join("missing"), 0, 0, &stored);
    }
}
