//! A device's key store: `DEVICE/backup.key`, 32 raw bytes, readable by its owner only.

use crate::secrets::BackupKey;
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name of the backup key inside a device directory.
pub const KEY_FILE: &str = "backup.key";

/// Replaces `path` with `bytes` all at once, readable as `mode` says (Unix): a temporary
/// file of its own beside it, synced, then renamed over it. A reader sees the old file or
/// the new one, never a torn one, and writers at once never trample each other.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut nonce = [0u8; 8];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        hex::encode(nonce)
    ));
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            options.mode(mode);
            let file = options.open(&tmp)?;
            // The umask may have narrowed or the mode widened nothing: set it exactly.
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            write_and_sync(file, bytes)?;
        }
        #[cfg(not(unix))]
        {
            let _ = mode;
            write_and_sync(options.open(&tmp)?, bytes)?;
        }
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

fn write_and_sync(mut file: std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all(bytes)?;
    file.sync_all()
}

/// Why the device's key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// I/O failure.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The key file is not 32 bytes.
    #[error("{0}: not a backup key (expected exactly 32 bytes)")]
    NotAKey(String),
}

/// One device's directory.
#[derive(Debug, Clone)]
pub struct Device {
    dir: PathBuf,
}

impl Device {
    /// The device kept in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Path of the key file.
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DeviceError + '_ {
        move |source| DeviceError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// The stored key, if there is one.
    pub fn load(&self) -> Result<Option<BackupKey>, DeviceError> {
        let path = self.key_path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => zeroize::Zeroizing::new(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io(&path)(e)),
        };
        BackupKey::from_bytes(&bytes)
            .map(Some)
            .map_err(|_| DeviceError::NotAKey(path.display().to_string()))
    }

    /// Stores `key` atomically with mode 0600 (directory 0700), replacing any earlier key.
    pub fn store(&self, key: &BackupKey) -> Result<(), DeviceError> {
        let dir = &self.dir;
        std::fs::create_dir_all(dir).map_err(Self::io(dir))?;
        let path = self.key_path();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Tighten a directory we may have just created; ignore dirs we do not own.
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        write_atomically(&path, key.as_bytes(), 0o600).map_err(Self::io(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_then_load_with_owner_only_mode() {
        let dir = std::env::temp_dir().join(format!("bkv-device-{}", std::process::id()));
        let device = Device::new(dir.join("phone"));
        assert!(device.load().unwrap().is_none());
        let key = BackupKey::from_bytes(&[9; 32]).unwrap();
        device.store(&key).unwrap();
        assert_eq!(device.load().unwrap(), Some(key));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(device.key_path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(device.key_path(), b"short").unwrap();
        assert!(matches!(device.load(), Err(DeviceError::NotAKey(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
