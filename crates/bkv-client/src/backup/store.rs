//! Where archives live: a local directory or an S3-compatible bucket, through
//! `object_store`. Uploads are multipart: an archive becomes visible only once complete.

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use std::io::{self, Read};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[error("backup store {store}: {reason}")]
pub struct StoreError {
    store: String,
    reason: String,
}

/// One stored archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredArchive {
    /// Backup id (sortable by creation time).
    pub id: String,
    /// Which key's archive this is (see `keys::locator`).
    pub locator: String,
    /// Size in bytes.
    pub size: u64,
    /// Milliseconds since the Unix epoch when it was made.
    pub created_ms: u64,
    pub(crate) path: ObjectPath,
}

/// A backup store.
pub struct BackupStore {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    name: String,
}

impl std::fmt::Debug for BackupStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// Bytes per chunk handed from the archive writer to the uploader.
const CHUNK: usize = 1 << 20;
/// Chunks in flight between the archive thread and the network.
const QUEUE: usize = 4;

impl BackupStore {
    /// Opens `spec`: `s3://bucket[/prefix]` (AWS environment variables; `AWS_ENDPOINT` and
    /// `AWS_ALLOW_HTTP=true` for an S3-compatible server) or a local directory.
    pub fn open(spec: &str) -> Result<Self, StoreError> {
        let fail = |reason: String| StoreError {
            store: spec.to_string(),
            reason,
        };
        if let Some(rest) = spec.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(fail("no bucket in the URL".into()));
            }
            let store = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| fail(e.to_string()))?;
            Ok(Self {
                store: Arc::new(store),
                prefix: ObjectPath::from(prefix.trim_matches('/')),
                name: spec.to_string(),
            })
        } else {
            std::fs::create_dir_all(spec).map_err(|e| fail(e.to_string()))?;
            let store = LocalFileSystem::new_with_prefix(spec).map_err(|e| fail(e.to_string()))?;
            Ok(Self {
                store: Arc::new(store),
                prefix: ObjectPath::from(""),
                name: spec.to_string(),
            })
        }
    }

    fn fail(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            store: self.name.clone(),
            reason: e.to_string(),
        }
    }

    fn root(&self) -> ObjectPath {
        self.prefix.child("backups")
    }

    /// Where `tenant`/`user`'s archives live.
    pub(crate) fn user_prefix(&self, tenant: &str, user: &str) -> ObjectPath {
        self.root()
            .child(hex::encode(tenant))
            .child(hex::encode(user))
    }

    /// The path of a new archive.
    pub(crate) fn archive_path(
        &self,
        tenant: &str,
        user: &str,
        locator: &str,
        id: &str,
    ) -> ObjectPath {
        self.user_prefix(tenant, user)
            .child(locator)
            .child(format!("{id}.age"))
    }

    async fn list_under(&self, prefix: &ObjectPath) -> Result<Vec<StoredArchive>, StoreError> {
        let mut found = Vec::new();
        let mut listing = self.store.list(Some(prefix));
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| self.fail(e))?;
            let parts: Vec<_> = meta.location.parts().collect();
            let Some(file) = parts.last().map(|p| p.as_ref().to_string()) else {
                continue;
            };
            let Some(id) = file.strip_suffix(".age") else {
                continue;
            };
            let locator = parts
                .get(parts.len().wrapping_sub(2))
                .map(|p| p.as_ref().to_string())
                .unwrap_or_default();
            let created_ms = id
                .split('-')
                .next()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            found.push(StoredArchive {
                id: id.to_string(),
                locator,
                size: meta.size,
                created_ms,
                path: meta.location,
            });
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    /// Every archive of `tenant`/`user`, oldest first.
    pub async fn list(&self, tenant: &str, user: &str) -> Result<Vec<StoredArchive>, StoreError> {
        self.list_under(&self.user_prefix(tenant, user)).await
    }

    /// Every archive made with the key whose locator is `locator`, oldest first.
    pub async fn list_by_locator(&self, locator: &str) -> Result<Vec<StoredArchive>, StoreError> {
        Ok(self
            .list_under(&self.root())
            .await?
            .into_iter()
            .filter(|a| a.locator == locator)
            .collect())
    }

    /// Uploads what arrives on `chunks` to `path`, as one multipart upload. `complete`
    /// decides, once the chunks end, whether to commit the upload or abort it.
    pub(crate) async fn upload<E>(
        &self,
        path: &ObjectPath,
        mut chunks: mpsc::Receiver<Bytes>,
        complete: impl std::future::Future<Output = Result<(), E>>,
    ) -> Result<Result<u64, E>, StoreError> {
        let upload = self
            .store
            .put_multipart(path)
            .await
            .map_err(|e| self.fail(e))?;
        let mut writer = WriteMultipart::new(upload);
        let mut total = 0u64;
        while let Some(chunk) = chunks.recv().await {
            total += chunk.len() as u64;
            if let Err(e) = writer.wait_for_capacity(QUEUE).await {
                drop(chunks);
                let _ = complete.await;
                return Err(self.fail(e));
            }
            writer.put(chunk);
        }
        match complete.await {
            Ok(()) => {
                writer.finish().await.map_err(|e| self.fail(e))?;
                Ok(Ok(total))
            }
            Err(e) => {
                let _ = writer.abort().await;
                Ok(Err(e))
            }
        }
    }

    /// Streams `path` into `sink` (until the receiver hangs up).
    pub(crate) async fn download(
        &self,
        path: &ObjectPath,
        sink: mpsc::Sender<io::Result<Bytes>>,
    ) -> Result<(), StoreError> {
        let result = self.store.get(path).await.map_err(|e| self.fail(e))?;
        let mut stream = result.into_stream();
        while let Some(chunk) = stream.next().await {
            let item = chunk.map_err(|e| io::Error::other(e.to_string()));
            let failed = item.is_err();
            if sink.send(item).await.is_err() || failed {
                break;
            }
        }
        Ok(())
    }

    /// Deletes `path`.
    pub(crate) async fn delete(&self, path: &ObjectPath) -> Result<(), StoreError> {
        self.store.delete(path).await.map_err(|e| self.fail(e))
    }

    /// The channel pair that connects a blocking archive writer to [`BackupStore::upload`].
    pub(crate) fn upload_channel() -> (ChunkWriter, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            },
            rx,
        )
    }

    /// The channel pair that connects [`BackupStore::download`] to a blocking reader.
    pub(crate) fn download_channel() -> (mpsc::Sender<io::Result<Bytes>>, ChunkReader) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            tx,
            ChunkReader {
                rx,
                current: Bytes::new(),
            },
        )
    }
}

/// A blocking `Write` that hands 1 MiB chunks to the async uploader (bounded: constant memory).
pub(crate) struct ChunkWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A blocking `Read` over chunks from the async downloader.
pub(crate) struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
