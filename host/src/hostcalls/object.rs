//! `natsfn:host/object`: NATS object-store buckets, checked against
//! `permissions.object`.
//!
//! Whole-object `get` and `put` are for small objects. Big ones stream: a
//! `reader` pulls from the store in chunks the guest asks for, a `writer`
//! feeds a background upload through a small bounded channel, so neither
//! side ever holds the object, and a guest with 16 MiB of memory can move
//! 100 MiB. Both live in the invocation's resource table and die with it; a
//! writer dropped before `finish` aborts its upload, leaving the bucket
//! unchanged (the store publishes an object's metadata only at the end).

use async_nats::jetstream::object_store::{self, ObjectInfo as NatsObjectInfo};
use bytes::Bytes;
use futures::TryStreamExt;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wasmtime::component::Resource;

use super::buckets::{check_object_name, Family};
use super::{in_span, CallError, Invocation};
use crate::bindings::natsfn::host::object::{Host, HostReader, HostWriter, ObjectInfo};
use crate::bindings::WitError;
use crate::permissions::Access;

/// The largest object a single `get` returns; bigger ones need a reader.
pub const MAX_OBJECT_GET: usize = 8 * 1024 * 1024;

/// The most bytes one `reader.read` returns, whatever the guest asks for.
pub const MAX_READ_CHUNK: usize = 1024 * 1024;

/// Chunks a writer may have in flight to the upload task before `write`
/// waits: the back-pressure that keeps host memory flat.
const WRITER_QUEUE: usize = 4;

/// An open object, read in chunks.
pub struct ObjectReader {
    object: object_store::Object,
}

/// An upload in progress.
pub struct ObjectWriter {
    chunks: Option<mpsc::Sender<std::io::Result<Bytes>>>,
    upload: Option<JoinHandle<Result<NatsObjectInfo, object_store::PutError>>>,
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            upload.abort();
        }
    }
}

fn info_to_wit(info: &NatsObjectInfo) -> ObjectInfo {
    ObjectInfo {
        name: info.name.clone(),
        size: info.size as u64,
        digest: info.digest.clone(),
        modified_ns: info.modified.map_or(0, |t| i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX)),
    }
}

fn unavailable(e: impl std::fmt::Display) -> WitError {
    WitError::Unavailable(e.to_string())
}

impl Invocation {
    /// Checks the grant and the name, and opens the bucket (see
    /// `kv_store` for why this is not an `async fn`).
    fn object_store(
        &self,
        bucket: &str,
        name: Option<&str>,
        need: Access,
    ) -> impl std::future::Future<Output = Result<object_store::ObjectStore, WitError>> + Send + 'static {
        let checked = self.bucket(Family::Object, bucket, need).and_then(|bucket| {
            name.map_or(Ok(()), check_object_name)?;
            Ok(bucket)
        });
        let buckets = self.tenant.buckets.clone();
        async move { buckets.object(&checked?).await }
    }
}

/// Maps "no such object" to `not-found` and the rest to `unavailable`.
fn not_found_or<K: PartialEq + std::fmt::Debug + Clone + std::fmt::Display>(
    e: async_nats::error::Error<K>,
    not_found: K,
) -> WitError {
    if e.kind() == not_found {
        WitError::NotFound
    } else {
        unavailable(e)
    }
}

impl Host for Invocation {
    async fn get(&mut self, bucket: String, name: String) -> Result<Vec<u8>, CallError> {
        let span = self.bucket_span("object.get", &bucket, Some(&name));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.object_store(&bucket, Some(&name), Access::Read).await?;
            let mut object =
                store.get(&name).await.map_err(|e| not_found_or(e, object_store::GetErrorKind::NotFound))?;
            if object.info().size > MAX_OBJECT_GET {
                return Err(WitError::TooLarge(MAX_OBJECT_GET as u64).into());
            }
            let mut data = Vec::with_capacity(object.info().size);
            object.read_to_end(&mut data).await.map_err(unavailable)?;
            Ok(data)
        })
        .await
    }

    async fn put(&mut self, bucket: String, name: String, data: Vec<u8>) -> Result<ObjectInfo, CallError> {
        let span = self.bucket_span("object.put", &bucket, Some(&name));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.object_store(&bucket, Some(&name), Access::Write).await?;
            this.payload_fits(data.len())?;
            let info = store.put(name.as_str(), &mut data.as_slice()).await.map_err(unavailable)?;
            Ok(info_to_wit(&info))
        })
        .await
    }

    async fn delete(&mut self, bucket: String, name: String) -> Result<(), CallError> {
        let span = self.bucket_span("object.delete", &bucket, Some(&name));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.object_store(&bucket, Some(&name), Access::Write).await?;
            store.delete(&name).await.map_err(|e| not_found_or(e, object_store::DeleteErrorKind::NotFound))?;
            Ok(())
        })
        .await
    }

    async fn info(&mut self, bucket: String, name: String) -> Result<ObjectInfo, CallError> {
        let span = self.bucket_span("object.info", &bucket, Some(&name));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.object_store(&bucket, Some(&name), Access::Read).await?;
            let info = store.info(&name).await.map_err(|e| not_found_or(e, object_store::InfoErrorKind::NotFound))?;
            Ok(info_to_wit(&info))
        })
        .await
    }

    async fn list(&mut self, bucket: String) -> Result<Vec<ObjectInfo>, CallError> {
        let span = self.bucket_span("object.list", &bucket, None);
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.object_store(&bucket, None, Access::Read).await?;
            let all: Vec<NatsObjectInfo> =
                store.list().await.map_err(unavailable)?.try_collect().await.map_err(unavailable)?;
            Ok(all.iter().filter(|i| !i.deleted).map(info_to_wit).collect())
        })
        .await
    }

    async fn open_reader(&mut self, bucket: String, name: String) -> Result<Resource<ObjectReader>, CallError> {
        let span = self.bucket_span("object.open_reader", &bucket, Some(&name));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.object_store(&bucket, Some(&name), Access::Read).await?;
            let object = store.get(&name).await.map_err(|e| not_found_or(e, object_store::GetErrorKind::NotFound))?;
            let reader = this.table.push(ObjectReader { object }).map_err(|e| unavailable(format!("reader: {e}")))?;
            Ok(reader)
        })
        .await
    }

    async fn open_writer(&mut self, bucket: String, name: String) -> Result<Resource<ObjectWriter>, CallError> {
        let span = self.bucket_span("object.open_writer", &bucket, Some(&name));
        let this = &mut *self;
        in_span(span.as_ref(), async move {
            let store = this.object_store(&bucket, Some(&name), Access::Write).await?;
            let (tx, rx) = mpsc::channel(WRITER_QUEUE);
            let upload = tokio::spawn(async move {
                let mut body = tokio_util::io::StreamReader::new(tokio_stream_from(rx));
                store.put(name.as_str(), &mut body).await
            });
            let writer = ObjectWriter { chunks: Some(tx), upload: Some(upload) };
            Ok(this.table.push(writer).map_err(|e| unavailable(format!("writer: {e}")))?)
        })
        .await
    }
}

/// A receiver as a `Stream`, for `StreamReader`.
fn tokio_stream_from(
    mut rx: mpsc::Receiver<std::io::Result<Bytes>>,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Unpin {
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

impl HostReader for Invocation {
    async fn read(&mut self, reader: Resource<ObjectReader>, max: u32) -> Result<Vec<u8>, CallError> {
        let reader = self.table.get_mut(&reader).map_err(|e| unavailable(format!("reader: {e}")))?;
        let mut buf = vec![0; (max as usize).min(MAX_READ_CHUNK)];
        let mut filled = 0;
        // Fill what the guest asked for, unless the object ends first: short
        // reads would only cost the guest extra calls.
        while filled < buf.len() {
            let n = reader.object.read(&mut buf[filled..]).await.map_err(unavailable)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(buf)
    }

    async fn drop(&mut self, reader: Resource<ObjectReader>) -> wasmtime::Result<()> {
        self.table.delete(reader)?;
        Ok(())
    }
}

impl HostWriter for Invocation {
    async fn write(&mut self, writer: Resource<ObjectWriter>, chunk: Vec<u8>) -> Result<(), CallError> {
        self.payload_fits(chunk.len())?;
        let writer = self.table.get_mut(&writer).map_err(|e| unavailable(format!("writer: {e}")))?;
        let Some(tx) = &writer.chunks else {
            return Err(WitError::Invalid("write after finish".into()).into());
        };
        if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
            // The upload stopped early; its error says why.
            return Err(finish_upload(writer).await.err().unwrap_or_else(|| unavailable("upload ended early")).into());
        }
        Ok(())
    }

    async fn finish(&mut self, writer: Resource<ObjectWriter>) -> Result<ObjectInfo, CallError> {
        let writer = self.table.get_mut(&writer).map_err(|e| unavailable(format!("writer: {e}")))?;
        Ok(finish_upload(writer).await?)
    }

    async fn drop(&mut self, writer: Resource<ObjectWriter>) -> wasmtime::Result<()> {
        self.table.delete(writer)?;
        Ok(())
    }
}

/// Ends the chunk stream and waits for the upload's result.
async fn finish_upload(writer: &mut ObjectWriter) -> Result<ObjectInfo, WitError> {
    writer.chunks = None;
    let upload = writer.upload.take().ok_or_else(|| WitError::Invalid("writer already finished".into()))?;
    let info = upload.await.map_err(unavailable)?.map_err(unavailable)?;
    Ok(info_to_wit(&info))
}
