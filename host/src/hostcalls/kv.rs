//! `natsfn:host/kv`: NATS key-value buckets, each call checked against
//! `permissions.kv` (read or write) and the key rules before it is sent.
//!
//! Compare-and-set failures come back as `conflict(current-revision)`, so a
//! guest can re-read and retry without a second round trip to learn where
//! the key is now.

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use futures::TryStreamExt;

use super::buckets::{check_key, Family};
use super::{in_span, CallError, Invocation};
use crate::bindings::natsfn::host::kv::{Entry, Host};
use crate::bindings::natsfn::host::types::KvOperation;
use crate::bindings::WitError;
use crate::permissions::Access;
use crate::subject::{Subject, SubjectPattern};

/// The most history entries one `history` call returns.
const MAX_HISTORY: u32 = 1024;

impl Invocation {
    /// Checks the grant and the key, and opens the bucket. (The checks run
    /// before the future, which must not hold `self` across the await: the
    /// invocation's resource table is not `Sync`.)
    fn kv_store(
        &self,
        bucket: &str,
        key: Option<&str>,
        need: Access,
    ) -> impl std::future::Future<Output = Result<kv::Store, WitError>> + Send + 'static {
        let checked = self.bucket(Family::Kv, bucket, need).and_then(|name| {
            key.map_or(Ok(()), check_key)?;
            Ok(name)
        });
        let buckets = self.tenant.buckets.clone();
        async move { buckets.kv(&checked?).await }
    }

    /// The key's current revision, 0 when it has none: what `conflict`
    /// reports after a lost compare-and-set.
    async fn current_revision(store: &kv::Store, key: &str) -> u64 {
        store.entry(key).await.ok().flatten().map_or(0, |e| e.revision)
    }
}

fn unavailable(e: impl std::fmt::Display) -> WitError {
    WitError::Unavailable(e.to_string())
}

fn to_wit(e: kv::Entry) -> Entry {
    Entry {
        key: e.key,
        value: e.value.into(),
        revision: e.revision,
        operation: match e.operation {
            Operation::Put => KvOperation::Put,
            Operation::Delete => KvOperation::Delete,
            Operation::Purge => KvOperation::Purge,
        },
    }
}

impl Host for Invocation {
    async fn get(&mut self, bucket: String, key: String) -> Result<Option<Entry>, CallError> {
        let span = self.bucket_span("kv.get", &bucket, Some(&key));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.kv_store(&bucket, Some(&key), Access::Read).await?;
            let entry = store.entry(key).await.map_err(unavailable)?;
            Ok(entry.filter(|e| e.operation == Operation::Put).map(to_wit))
        })
        .await
    }

    async fn put(&mut self, bucket: String, key: String, value: Vec<u8>) -> Result<u64, CallError> {
        let span = self.bucket_span("kv.put", &bucket, Some(&key));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.kv_store(&bucket, Some(&key), Access::Write).await?;
            this.payload_fits(value.len())?;
            Ok(store.put(key, value.into()).await.map_err(unavailable)?)
        })
        .await
    }

    async fn create(&mut self, bucket: String, key: String, value: Vec<u8>) -> Result<u64, CallError> {
        let span = self.bucket_span("kv.create", &bucket, Some(&key));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.kv_store(&bucket, Some(&key), Access::Write).await?;
            this.payload_fits(value.len())?;
            match store.create(&key, value.into()).await {
                Ok(revision) => Ok(revision),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                    Err(WitError::Conflict(Self::current_revision(&store, &key).await).into())
                }
                Err(e) => Err(unavailable(e).into()),
            }
        })
        .await
    }

    async fn update(&mut self, bucket: String, key: String, value: Vec<u8>, expected: u64) -> Result<u64, CallError> {
        let span = self.bucket_span("kv.update", &bucket, Some(&key));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.kv_store(&bucket, Some(&key), Access::Write).await?;
            this.payload_fits(value.len())?;
            match store.update(&key, value.into(), expected).await {
                Ok(revision) => Ok(revision),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    Err(WitError::Conflict(Self::current_revision(&store, &key).await).into())
                }
                Err(e) => Err(unavailable(e).into()),
            }
        })
        .await
    }

    async fn delete(&mut self, bucket: String, key: String) -> Result<(), CallError> {
        let span = self.bucket_span("kv.delete", &bucket, Some(&key));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.kv_store(&bucket, Some(&key), Access::Write).await?;
            Ok(store.delete(key).await.map_err(unavailable)?)
        })
        .await
    }

    async fn purge(&mut self, bucket: String, key: String) -> Result<(), CallError> {
        let span = self.bucket_span("kv.purge", &bucket, Some(&key));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.kv_store(&bucket, Some(&key), Access::Write).await?;
            Ok(store.purge(key).await.map_err(unavailable)?)
        })
        .await
    }

    async fn keys(&mut self, bucket: String, filter: Option<String>) -> Result<Vec<String>, CallError> {
        let span = self.bucket_span("kv.keys", &bucket, None);
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let filter: Option<SubjectPattern> =
                filter.map(|f| f.parse().map_err(|e| WitError::Invalid(format!("key filter: {e}")))).transpose()?;
            let store = this.kv_store(&bucket, None, Access::Read).await?;
            let keys: Vec<String> =
                store.keys().await.map_err(unavailable)?.try_collect().await.map_err(unavailable)?;
            Ok(match filter {
                None => keys,
                Some(f) => keys.into_iter().filter(|k| k.parse::<Subject>().is_ok_and(|s| f.matches(&s))).collect(),
            })
        })
        .await
    }

    async fn history(&mut self, bucket: String, key: String, max: u32) -> Result<Vec<Entry>, CallError> {
        let span = self.bucket_span("kv.history", &bucket, Some(&key));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.kv_store(&bucket, Some(&key), Access::Read).await?;
            let all: Vec<kv::Entry> =
                store.history(key).await.map_err(unavailable)?.try_collect().await.map_err(unavailable)?;
            let keep = max.min(MAX_HISTORY) as usize;
            let skip = all.len().saturating_sub(keep);
            Ok(all.into_iter().skip(skip).map(to_wit).collect())
        })
        .await
    }
}
