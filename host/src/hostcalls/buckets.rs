//! Open KV and object-store buckets, shared by every invocation of a host so
//! that a guest's `kv.get` is one request to the server, not a stream lookup
//! followed by the get.
//!
//! Also the checks that guard every bucket call: the grant in the manifest,
//! then the key or object name. A denial names the bucket; nothing reaches
//! NATS before both checks pass.

use std::collections::HashMap;
use std::sync::Mutex;

use async_nats::jetstream::{self, kv, object_store::ObjectStore};

use super::Invocation;
use crate::bindings::WitError;
use crate::manifest::BucketName;
use crate::permissions::Access;

/// Bucket handles by name, opened on first use.
pub(crate) struct Buckets {
    js: jetstream::Context,
    kv: Mutex<HashMap<BucketName, kv::Store>>,
    objects: Mutex<HashMap<BucketName, ObjectStore>>,
}

impl Buckets {
    pub(crate) fn new(nats: async_nats::Client) -> Self {
        Buckets { js: jetstream::new(nats), kv: Mutex::default(), objects: Mutex::default() }
    }

    pub(crate) async fn kv(&self, bucket: &BucketName) -> Result<kv::Store, WitError> {
        if let Some(store) = lock(&self.kv).get(bucket) {
            return Ok(store.clone());
        }
        let store = self.js.get_key_value(bucket.as_str()).await.map_err(|e| missing_bucket(bucket, e))?;
        lock(&self.kv).insert(bucket.clone(), store.clone());
        Ok(store)
    }

    pub(crate) async fn object(&self, bucket: &BucketName) -> Result<ObjectStore, WitError> {
        if let Some(store) = lock(&self.objects).get(bucket) {
            return Ok(store.clone());
        }
        let store = self.js.get_object_store(bucket.as_str()).await.map_err(|e| missing_bucket(bucket, e))?;
        lock(&self.objects).insert(bucket.clone(), store.clone());
        Ok(store)
    }
}

/// The maps hold clonable handles only; a panic elsewhere cannot leave them
/// half-updated, so a poisoned lock is still good to use.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn missing_bucket(bucket: &BucketName, e: impl std::fmt::Display) -> WitError {
    WitError::Unavailable(format!("bucket `{bucket}` cannot be opened: {e}"))
}

/// Which bucket family a grant is checked in.
#[derive(Clone, Copy)]
pub(crate) enum Family {
    Kv,
    Object,
}

impl Invocation {
    /// Parses `bucket` and checks that the manifest grants `need` on it; a
    /// denial is logged with who asked and names the bucket to the guest.
    pub(crate) fn bucket(&self, family: Family, bucket: &str, need: Access) -> Result<BucketName, WitError> {
        let name: BucketName = bucket.parse().map_err(|p| WitError::Invalid(format!("bucket name {p}")))?;
        let perms = &self.manifest.permissions;
        let (allowed, what) = match family {
            Family::Kv => (perms.kv_allows(&name, need), "kv"),
            Family::Object => (perms.object_allows(&name, need), "object"),
        };
        if !allowed {
            let verb = match need {
                Access::Read => "read",
                Access::Write => "write",
            };
            return Err(self.deny(format!("{what} {verb} on bucket {name}"), name.as_str()));
        }
        Ok(name)
    }
}

/// Checks a KV key against the NATS rules, so a bad key is `invalid` here
/// rather than an opaque failure (or a different key) on the server.
pub(crate) fn check_key(key: &str) -> Result<(), WitError> {
    let ok_chars = key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b));
    if key.is_empty() || !ok_chars || key.starts_with('.') || key.ends_with('.') || key.contains("..") {
        return Err(WitError::Invalid(format!(
            "key `{}` is not a valid KV key (letters, digits and -/_=. ; no leading, trailing or doubled .)",
            key.escape_debug()
        )));
    }
    Ok(())
}

/// Checks an object name: non-empty, printable, bounded.
pub(crate) fn check_object_name(name: &str) -> Result<(), WitError> {
    if name.is_empty() || name.len() > 1024 || name.chars().any(char::is_control) {
        return Err(WitError::Invalid(format!(
            "object name `{}` must be 1 to 1024 printable characters",
            name.escape_debug()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_keys_follow_the_nats_rules() {
        for good in ["a", "a.b", "user/42", "x=y", "A-b_c.d"] {
            assert!(check_key(good).is_ok(), "{good}");
        }
        for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>", "ü"] {
            assert!(matches!(check_key(bad), Err(WitError::Invalid(_))), "{bad}");
        }
        assert!(check_object_name("photos/2024/cat.jpg").is_ok());
        assert!(check_object_name("").is_err() && check_object_name("a\nb").is_err());
    }
}
