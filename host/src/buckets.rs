//! Buckets the host declares and creates at start-up, so handlers can rely
//! on them: `--kv-bucket carts:history=5,ttl=3600` on the command line, or
//! [`crate::HostBuilder::bucket`] when embedding. A bucket that already
//! exists is left exactly as it is.

use std::str::FromStr;
use std::time::Duration;

use async_nats::jetstream::{self, kv, object_store, stream::StorageType};

use crate::manifest::BucketName;

/// A bucket to create if missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketSpec {
    /// KV or object store.
    pub kind: BucketKind,
    /// The bucket name.
    pub name: BucketName,
    /// KV only: revisions kept per key (1 to 64).
    pub history: i64,
    /// Entries expire after this long; zero keeps them.
    pub ttl: Duration,
    /// Size cap in bytes; -1 for none.
    pub max_bytes: i64,
    /// File (default) or memory storage.
    pub memory: bool,
}

/// The two kinds of bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketKind {
    /// A key-value bucket.
    Kv,
    /// An object-store bucket.
    Object,
}

impl BucketSpec {
    /// A bucket of `kind` named `name` with default settings.
    pub fn new(kind: BucketKind, name: BucketName) -> Self {
        BucketSpec { kind, name, history: 1, ttl: Duration::ZERO, max_bytes: -1, memory: false }
    }

    /// Parses `name[:key=value,...]` with keys `history`, `ttl` (seconds),
    /// `max_bytes` and `storage` (`file` or `memory`).
    pub fn parse(kind: BucketKind, text: &str) -> Result<Self, String> {
        let (name, options) = text.split_once(':').unwrap_or((text, ""));
        let mut spec = BucketSpec::new(kind, BucketName::from_str(name).map_err(|p| format!("bucket name {p}"))?);
        for option in options.split(',').filter(|o| !o.is_empty()) {
            let (key, value) = option.split_once('=').ok_or_else(|| format!("`{option}` is not key=value"))?;
            let number = || value.parse::<i64>().map_err(|_| format!("{key}: `{value}` is not a number"));
            match key {
                "history" if kind == BucketKind::Kv => {
                    spec.history = number()?;
                    if !(1..=64).contains(&spec.history) {
                        return Err(format!("history: {value} is outside 1..=64"));
                    }
                }
                "ttl" => spec.ttl = Duration::from_secs(number()?.max(0) as u64),
                "max_bytes" => spec.max_bytes = number()?,
                "storage" => {
                    spec.memory = match value {
                        "file" => false,
                        "memory" => true,
                        _ => return Err(format!("storage: `{value}` is not file or memory")),
                    }
                }
                _ => return Err(format!("unknown bucket option `{key}`")),
            }
        }
        Ok(spec)
    }

    /// Creates the bucket unless it exists.
    pub(crate) async fn ensure(&self, js: &jetstream::Context) -> Result<(), String> {
        let name = self.name.to_string();
        let storage = if self.memory { StorageType::Memory } else { StorageType::File };
        match self.kind {
            BucketKind::Kv => {
                if js.get_key_value(&name).await.is_ok() {
                    return Ok(());
                }
                js.create_key_value(kv::Config {
                    bucket: name,
                    history: self.history,
                    max_age: self.ttl,
                    max_bytes: self.max_bytes,
                    storage,
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|e| e.to_string())
            }
            BucketKind::Object => {
                if js.get_object_store(&name).await.is_ok() {
                    return Ok(());
                }
                js.create_object_store(object_store::Config {
                    bucket: name,
                    max_age: self.ttl,
                    max_bytes: self.max_bytes,
                    storage,
                    ..Default::default()
                })
                .await
                .map(drop)
                .map_err(|e| e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_options() {
        let spec = BucketSpec::parse(BucketKind::Kv, "carts:history=5,ttl=60,storage=memory").unwrap();
        assert_eq!(
            (spec.name.as_str(), spec.history, spec.ttl, spec.memory),
            ("carts", 5, Duration::from_secs(60), true)
        );
        assert_eq!(BucketSpec::parse(BucketKind::Object, "images").unwrap().max_bytes, -1);
        assert!(BucketSpec::parse(BucketKind::Kv, "a.b").unwrap_err().contains("bucket name"));
        assert!(BucketSpec::parse(BucketKind::Kv, "c:history=99").unwrap_err().contains("history"));
        assert!(BucketSpec::parse(BucketKind::Object, "c:history=2").unwrap_err().contains("unknown bucket option"));
        assert!(BucketSpec::parse(BucketKind::Kv, "c:colour=red").unwrap_err().contains("unknown bucket option"));
    }
}
