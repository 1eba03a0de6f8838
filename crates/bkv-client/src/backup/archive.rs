//! Backup archives: a tar stream of a directory tree inside an age file. Both directions
//! stream, so memory stays flat whatever the size; restoring refuses any entry that
//! would land outside the output directory.

use std::fs;
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

/// Why an archive could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading the source or writing the output failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The failure.
        source: io::Error,
    },
    /// The archive is not for this key, or is not an age file.
    #[error("cannot decrypt the archive: {0} (wrong key, or not a bkv archive)")]
    Decrypt(String),
    /// The archive is corrupted or truncated (authentication failed part way).
    #[error("the archive is corrupted or truncated: {0}")]
    Corrupt(String),
    /// An entry would be written outside the output directory.
    #[error("refusing unsafe path in archive: {0}")]
    UnsafePath(String),
    /// An entry of a kind bkv never writes (hard link, device, …).
    #[error("refusing unsupported entry {path} in archive (type {kind})")]
    Unsupported {
        /// The entry's path.
        path: String,
        /// Its tar type.
        kind: String,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ArchiveError {
    let context = context.into();
    move |source| ArchiveError::Io { context, source }
}

/// Counts the bytes that pass through a writer.
struct Counting<'a, W> {
    inner: W,
    progress: &'a (dyn Fn(u64) + Send + Sync),
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        (self.progress)(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn collect(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> Result<(), ArchiveError> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(io_err(format!("cannot read {}", dir.display())))?
        .collect::<Result<_, _>>()
        .map_err(io_err(format!("cannot read {}", dir.display())))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let rel = rel.join(entry.file_name());
        let kind = entry
            .file_type()
            .map_err(io_err(format!("cannot stat {}", entry.path().display())))?;
        if kind.is_dir() {
            out.push(rel.clone());
            collect(&entry.path(), &rel, out)?;
        } else if kind.is_file() || kind.is_symlink() {
            out.push(rel);
        } else {
            tracing::warn!(path = %entry.path().display(), "skipping special file");
        }
    }
    Ok(())
}

/// Total size of the regular files under `src` (for progress bars).
pub fn source_size(src: &Path) -> u64 {
    let mut paths = Vec::new();
    if collect(src, Path::new(""), &mut paths).is_err() {
        return 0;
    }
    paths
        .iter()
        .filter_map(|p| fs::symlink_metadata(src.join(p)).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Writes the tree under `src` (contents, names, modes, mtimes, symlinks as links) as a
/// tar stream encrypted with age to `recipient`, into `out`. Returns `out`.
pub fn pack<W: Write>(
    src: &Path,
    recipient: &age::x25519::Recipient,
    out: W,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<W, ArchiveError> {
    if !fs::metadata(src)
        .map_err(io_err(format!("cannot read {}", src.display())))?
        .is_dir()
    {
        return Err(ArchiveError::Io {
            context: format!("{} is not a directory", src.display()),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        });
    }
    let mut paths = Vec::new();
    collect(src, Path::new(""), &mut paths)?;
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
            .map_err(|e| ArchiveError::Decrypt(e.to_string()))?;
    let stream = encryptor
        .wrap_output(io::BufWriter::with_capacity(1 << 16, out))
        .map_err(io_err("cannot start the age stream"))?;
    let mut builder = tar::Builder::new(Counting {
        inner: stream,
        progress,
    });
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    for rel in &paths {
        builder
            .append_path_with_name(src.join(rel), rel)
            .map_err(io_err(format!(
                "cannot archive {}",
                src.join(rel).display()
            )))?;
    }
    let counting = builder
        .into_inner()
        .map_err(io_err("cannot finish the tar stream"))?;
    let buffered = counting
        .inner
        .finish()
        .map_err(io_err("cannot finish the age stream"))?;
    buffered.into_inner().map_err(|e| ArchiveError::Io {
        context: "cannot flush the archive".into(),
        source: e.into_error(),
    })
}

/// What a restore or verification saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Entries (files, directories, links).
    pub entries: u64,
    /// Bytes of file content.
    pub bytes: u64,
}

/// The relative path of an entry, if it stays inside the output directory.
fn safe_relative(path: &Path) -> Result<PathBuf, ArchiveError> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return Err(ArchiveError::UnsafePath(path.display().to_string())),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(ArchiveError::UnsafePath(path.display().to_string()));
    }
    Ok(out)
}

/// Refuses to write through a symlink that an earlier entry created.
fn check_no_symlink_ancestor(root: &Path, rel: &Path) -> Result<(), ArchiveError> {
    let mut current = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        current.push(part);
        if let Ok(meta) = fs::symlink_metadata(&current) {
            if meta.file_type().is_symlink() {
                return Err(ArchiveError::UnsafePath(rel.display().to_string()));
            }
        }
    }
    Ok(())
}

fn decrypting_reader<R: Read>(
    input: R,
    identity: &age::x25519::Identity,
) -> Result<impl Read, ArchiveError> {
    let decryptor = age::Decryptor::new(BufReader::with_capacity(1 << 16, input))
        .map_err(|e| ArchiveError::Decrypt(e.to_string()))?;
    decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|e| ArchiveError::Decrypt(e.to_string()))
}

/// Copies with a large buffer: age decrypts 64 KiB chunks, so small reads only add copies.
fn drain(reader: &mut impl Read) -> io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn corrupt(e: io::Error) -> ArchiveError {
    ArchiveError::Corrupt(e.to_string())
}

/// Decrypts and unpacks an archive into `out` (which must exist and be empty). Stops at
/// the first error; the caller removes `out` then.
pub fn unpack<R: Read>(
    input: R,
    identity: &age::x25519::Identity,
    out: &Path,
) -> Result<UnpackStats, ArchiveError> {
    let reader = decrypting_reader(input, identity)?;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    let mut stats = UnpackStats::default();
    let mut directories = Vec::new();
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = entry.path().map_err(corrupt)?.into_owned();
        let rel = safe_relative(&raw)?;
        check_no_symlink_ancestor(out, &rel)?;
        let dest = out.join(&rel);
        // Nor onto a link an earlier entry made (a directory entry would chmod its target).
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(ArchiveError::UnsafePath(rel.display().to_string()));
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                fs::create_dir_all(&dest)
                    .map_err(io_err(format!("cannot create {}", dest.display())))?;
                let mode = entry.header().mode().ok();
                let mtime = entry.header().mtime().ok();
                directories.push((dest, mode, mtime));
            }
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::GNUSparse
            | tar::EntryType::Symlink => {
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent)
                        .map_err(io_err(format!("cannot create {}", parent.display())))?;
                }
                stats.bytes += entry.header().size().unwrap_or(0);
                let special_bits = kind != tar::EntryType::Symlink
                    && entry.header().mode().is_ok_and(|m| m & 0o7000 != 0);
                entry.unpack(&dest).map_err(|e| {
                    if e.kind() == io::ErrorKind::InvalidData
                        || e.kind() == io::ErrorKind::UnexpectedEof
                    {
                        corrupt(e)
                    } else {
                        ArchiveError::Io {
                            context: format!("cannot write {}", dest.display()),
                            source: e,
                        }
                    }
                })?;
                // Setuid, setgid and sticky bits are never restored from an archive.
                #[cfg(unix)]
                if special_bits {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = fs::metadata(&dest)
                        .map_err(io_err(format!("cannot stat {}", dest.display())))?
                        .permissions()
                        .mode();
                    fs::set_permissions(&dest, fs::Permissions::from_mode(mode & 0o777))
                        .map_err(io_err(format!("cannot set mode of {}", dest.display())))?;
                }
            }
            other => {
                return Err(ArchiveError::Unsupported {
                    path: rel.display().to_string(),
                    kind: format!("{other:?}"),
                })
            }
        }
        stats.entries += 1;
    }
    // Reading to the end makes age check the final chunk, so a cut archive is caught.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(corrupt)?;
    // Directories last (deepest first): writing their children changed their mtimes.
    directories.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
    for (dir, mode, mtime) in directories {
        #[cfg(unix)]
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode & 0o777))
                .map_err(io_err(format!("cannot set mode of {}", dir.display())))?;
        }
        if let Some(mtime) = mtime {
            filetime::set_file_mtime(&dir, filetime::FileTime::from_unix_time(mtime as i64, 0))
                .map_err(io_err(format!("cannot set mtime of {}", dir.display())))?;
        }
    }
    Ok(stats)
}

/// Decrypts and reads a whole archive without writing anything: proves it is complete,
/// authentic and well formed.
pub fn verify<R: Read>(
    input: R,
    identity: &age::x25519::Identity,
) -> Result<UnpackStats, ArchiveError> {
    let reader = decrypting_reader(input, identity)?;
    let mut archive = tar::Archive::new(reader);
    let mut stats = UnpackStats::default();
    for entry in archive.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let raw = entry.path().map_err(corrupt)?.into_owned();
        safe_relative(&raw)?;
        stats.bytes += drain(&mut entry).map_err(corrupt)?;
        stats.entries += 1;
    }
    drain(&mut archive.into_inner()).map_err(corrupt)?;
    Ok(stats)
}

#[cfg(test)]
mod tests;
