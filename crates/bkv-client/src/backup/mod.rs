//! End-to-end encrypted backups: age archives of a directory tree, in a local directory
//! or an S3-compatible bucket, encrypted to an identity derived from the backup key.
//!
//! A backup streams (constant memory), becomes visible only once complete, is read back
//! and verified before older backups are pruned. A restore writes into a fresh
//! directory that appears only once the whole archive checked out.

pub mod archive;
pub mod keys;
pub mod store;

use crate::secrets::BackupKey;
pub use archive::{ArchiveError, UnpackStats};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
pub use store::{BackupStore, StoreError, StoredArchive};

/// Reports bytes processed, for progress bars.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The store failed or is unreachable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The archive could not be made or read.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// Nothing to restore.
    #[error("no backup found{0}")]
    NoBackup(String),
    /// The output directory exists and is not empty.
    #[error("{0} exists and is not empty; restore into an empty or new directory")]
    OutputNotEmpty(String),
    /// Local I/O around the restore.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        source: std::io::Error,
    },
    /// A worker thread died.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A finished backup.
#[derive(Debug, Clone)]
pub struct BackupDone {
    /// The new archive.
    pub archive: StoredArchive,
    /// What verification read back.
    pub verified: UnpackStats,
    /// Older archives deleted by retention.
    pub pruned: Vec<String>,
}

fn new_backup_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut tag = [0u8; 4];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut tag);
    format!("{now:013}-{}", hex::encode(tag))
}

/// Reads `archive` back from the store and checks it decrypts and parses completely.
pub async fn verify(
    store: &BackupStore,
    key: &BackupKey,
    archive: &StoredArchive,
) -> Result<UnpackStats, BackupError> {
    let identity = keys::age_identity(key);
    let (tx, reader) = BackupStore::download_channel();
    let check = tokio::task::spawn_blocking(move || archive::verify(reader, &identity));
    let fetched = store.download(&archive.path, tx).await;
    let stats = check
        .await
        .map_err(|e| BackupError::Internal(e.to_string()))?;
    fetched?;
    Ok(stats?)
}

/// Backs up the tree under `src` for `tenant`/`user`, encrypted to `key`, then keeps the
/// newest `keep` archives of the user. The previous archives are untouched until the
/// new one is complete and verified.
pub async fn create(
    store: &BackupStore,
    tenant: &str,
    user: &str,
    key: &BackupKey,
    src: &Path,
    keep: usize,
    progress: Progress,
) -> Result<BackupDone, BackupError> {
    let locator = keys::locator(key);
    let id = new_backup_id();
    let path = store.archive_path(tenant, user, &locator, &id);
    let recipient = keys::age_identity(key).to_public();
    let (writer, chunks) = BackupStore::upload_channel();
    let src_owned: PathBuf = src.to_path_buf();
    let packing = tokio::task::spawn_blocking(move || -> Result<(), ArchiveError> {
        let mut writer = archive::pack(&src_owned, &recipient, writer, progress.as_ref())?;
        writer.flush().map_err(|source| ArchiveError::Io {
            context: "cannot hand the archive to the store".into(),
            source,
        })
    });
    let complete = async {
        match packing.await {
            Ok(result) => result.map_err(BackupError::from),
            Err(e) => Err(BackupError::Internal(e.to_string())),
        }
    };
    let size = store.upload(&path, chunks, complete).await??;
    let archive = StoredArchive {
        id: id.clone(),
        locator,
        size,
        created_ms: id
            .split('-')
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0),
        path,
    };
    let verified = match verify(store, key, &archive).await {
        Ok(stats) => stats,
        Err(e) => {
            let _ = store.delete(&archive.path).await;
            return Err(e);
        }
    };
    let mut pruned = Vec::new();
    let all = store.list(tenant, user).await?;
    let excess = all.len().saturating_sub(keep.max(1));
    for old in all.iter().filter(|a| a.id != archive.id).take(excess) {
        store.delete(&old.path).await?;
        pruned.push(old.id.clone());
    }
    Ok(BackupDone {
        archive,
        verified,
        pruned,
    })
}

/// Picks the archive to restore: `id` if given, else the newest made with `key`.
pub async fn choose(
    store: &BackupStore,
    account: Option<(&str, &str)>,
    key: &BackupKey,
    id: Option<&str>,
) -> Result<StoredArchive, BackupError> {
    let locator = keys::locator(key);
    let candidates = match account {
        Some((tenant, user)) => store
            .list(tenant, user)
            .await?
            .into_iter()
            .filter(|a| a.locator == locator)
            .collect::<Vec<_>>(),
        None => store.list_by_locator(&locator).await?,
    };
    match id {
        Some(id) => candidates
            .into_iter()
            .find(|a| a.id == id)
            .ok_or_else(|| BackupError::NoBackup(format!(" with id {id} for this key"))),
        None => candidates
            .into_iter()
            .next_back()
            .ok_or_else(|| BackupError::NoBackup(" for this key".into())),
    }
}

/// Restores `archive` into `out` (absent or empty). The tree is unpacked beside `out` and
/// moved into place only when the whole archive decrypted and checked out; on any error
/// nothing is left behind.
pub async fn restore(
    store: &BackupStore,
    key: &BackupKey,
    archive: &StoredArchive,
    out: &Path,
    progress: Progress,
) -> Result<UnpackStats, BackupError> {
    let io = |context: String| move |source| BackupError::Io { context, source };
    if out.exists() {
        let mut entries =
            std::fs::read_dir(out).map_err(io(format!("cannot read {}", out.display())))?;
        if entries.next().is_some() {
            return Err(BackupError::OutputNotEmpty(out.display().to_string()));
        }
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(format!("cannot create {}", parent.display())))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "restore".into());
    let staging = parent.join(format!(".{name}.bkv-partial-{}", new_backup_id()));
    std::fs::create_dir(&staging).map_err(io(format!("cannot create {}", staging.display())))?;

    let identity = keys::age_identity(key);
    let (tx, reader) = BackupStore::download_channel();
    let staging_for_unpack = staging.clone();
    let unpacking = tokio::task::spawn_blocking(move || {
        let counted = CountingReader {
            inner: reader,
            progress,
        };
        archive::unpack(counted, &identity, &staging_for_unpack)
    });
    let fetched = store.download(&archive.path, tx).await;
    let unpacked = unpacking
        .await
        .map_err(|e| BackupError::Internal(e.to_string()));
    let result = match (fetched, unpacked) {
        (Err(e), _) => Err(BackupError::from(e)),
        (_, Err(e)) => Err(e),
        (_, Ok(Err(e))) => Err(BackupError::from(e)),
        (Ok(()), Ok(Ok(stats))) => Ok(stats),
    };
    let stats = match result {
        Ok(stats) => stats,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if out.exists() {
        std::fs::remove_dir(out).map_err(io(format!("cannot replace {}", out.display())))?;
    }
    if let Err(e) = std::fs::rename(&staging, out) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(io(format!(
            "cannot move the restored tree to {}",
            out.display()
        ))(e));
    }
    Ok(stats)
}

struct CountingReader<R> {
    inner: R,
    progress: Progress,
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
}
