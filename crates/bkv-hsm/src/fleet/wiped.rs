//! Byte buffers that carry serialized records (OPAQUE password files, client-wrapped
//! keys) between members, wiped when dropped and never reallocated behind our back: a
//! `Vec` that grows frees its old buffer unwiped.

use serde::Serialize;
use std::io::{self, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use zeroize::Zeroizing;

/// Serializes `value` into a buffer of exactly its size, wiped when dropped.
pub(crate) fn serialize<T: Serialize + ?Sized>(
    value: &T,
) -> Result<Zeroizing<Vec<u8>>, postcard::Error> {
    let size = postcard::experimental::serialized_size(value)?;
    let mut bytes = Zeroizing::new(vec![0u8; size]);
    postcard::to_slice(value, &mut bytes)?;
    Ok(bytes)
}

/// A snapshot's bytes, as openraft reads, writes and seeks them: a cursor over a buffer
/// that is wiped when dropped, and wiped before it is replaced when it must grow.
#[derive(Default)]
pub struct SnapshotBytes {
    bytes: Zeroizing<Vec<u8>>,
    position: u64,
}

impl SnapshotBytes {
    /// A snapshot made of `bytes`, read from the start.
    pub(crate) fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self { bytes, position: 0 }
    }

    /// The whole buffer, whatever was read or written of it.
    pub(crate) fn into_bytes(mut self) -> Zeroizing<Vec<u8>> {
        std::mem::take(&mut self.bytes)
    }

    /// Makes room for `needed` bytes in all, copying into a larger buffer and wiping the
    /// old one, so no copy of the contents is freed unwiped.
    fn reserve(&mut self, needed: usize) {
        if needed <= self.bytes.capacity() {
            return;
        }
        let capacity = needed.max(self.bytes.capacity().saturating_mul(2));
        let mut larger = Zeroizing::new(Vec::with_capacity(capacity));
        larger.extend_from_slice(&self.bytes);
        // Dropping the old `Zeroizing` wipes its whole capacity.
        self.bytes = larger;
    }
}

impl std::fmt::Debug for SnapshotBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotBytes({} bytes, redacted)", self.bytes.len())
    }
}

impl AsyncRead for SnapshotBytes {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = usize::try_from(self.position)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        let n = buf.remaining().min(self.bytes.len() - start);
        buf.put_slice(&self.bytes[start..start + n]);
        self.position += n as u64;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SnapshotBytes {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let too_far =
            || io::Error::new(io::ErrorKind::InvalidInput, "snapshot offset past its end");
        // openraft writes each chunk at the end or over one already written; an offset
        // past the end would only make a peer's message allocate for nothing.
        let start = usize::try_from(self.position)
            .ok()
            .filter(|&start| start <= self.bytes.len())
            .ok_or_else(too_far)?;
        let end = start.checked_add(data.len()).ok_or_else(too_far)?;
        self.reserve(end);
        if self.bytes.len() < end {
            self.bytes.resize(end, 0);
        }
        self.bytes[start..end].copy_from_slice(data);
        self.position = end as u64;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for SnapshotBytes {
    fn start_seek(mut self: Pin<&mut Self>, to: SeekFrom) -> io::Result<()> {
        let (base, offset) = match to {
            SeekFrom::Start(at) => {
                self.position = at;
                return Ok(());
            }
            SeekFrom::End(offset) => (self.bytes.len() as u64, offset),
            SeekFrom::Current(offset) => (self.position, offset),
        };
        self.position = base
            .checked_add_signed(offset)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(())
    }

    fn poll_complete(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(Ok(self.position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    #[tokio::test]
    async fn chunks_written_at_their_offsets_read_back_whole_and_none_past_the_end() {
        let mut snapshot = SnapshotBytes::default();
        let whole: Vec<u8> = (0..10_000u32).map(|n| (n % 251) as u8).collect();
        // openraft writes each received chunk at its offset, and may write one again.
        for chunk in [0, 1, 1, 2] {
            let at = chunk * 4_000;
            let end = (at + 4_000).min(whole.len());
            snapshot.seek(SeekFrom::Start(at as u64)).await.unwrap();
            snapshot.write_all(&whole[at..end]).await.unwrap();
        }
        // A chunk past the end is refused: a peer cannot make it allocate at will.
        snapshot.seek(SeekFrom::Start(1 << 40)).await.unwrap();
        assert!(snapshot.write_all(b"far").await.is_err());
        snapshot.seek(SeekFrom::Start(0)).await.unwrap();
        let mut read = Vec::new();
        snapshot.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, whole);
        assert_eq!(snapshot.into_bytes().as_slice(), whole.as_slice());
    }

    #[tokio::test]
    async fn seeks_work_like_a_cursor_and_refuse_to_go_before_the_start() {
        let mut snapshot = SnapshotBytes::new(Zeroizing::new(b"abcdef".to_vec()));
        assert_eq!(snapshot.seek(SeekFrom::End(-2)).await.unwrap(), 4);
        let mut tail = String::new();
        snapshot.read_to_string(&mut tail).await.unwrap();
        assert_eq!(tail, "ef");
        assert_eq!(snapshot.seek(SeekFrom::Current(-6)).await.unwrap(), 0);
        assert!(snapshot.seek(SeekFrom::Current(-1)).await.is_err());
        // A read past the end gives nothing, as a cursor's does.
        snapshot.seek(SeekFrom::Start(100)).await.unwrap();
        assert_eq!(snapshot.read(&mut [0u8; 4]).await.unwrap(), 0);
    }

    #[test]
    fn serialized_bytes_are_exactly_sized_and_match_postcard() {
        let value = (42u64, "password file".to_string(), vec![7u8; 300]);
        let bytes = serialize(&value).unwrap();
        assert_eq!(bytes.as_slice(), postcard::to_allocvec(&value).unwrap());
        // Exactly sized: nothing grew, so no unwiped copy was left behind.
        assert_eq!(bytes.capacity(), bytes.len());
    }

    #[test]
    fn debug_shows_the_size_not_the_bytes() {
        let snapshot = SnapshotBytes::new(Zeroizing::new(b"secret record".to_vec()));
        let shown = format!("{snapshot:?}");
        assert!(!shown.contains("secret") && shown.contains("13 bytes"));
    }
}
