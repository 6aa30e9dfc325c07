//! Local segment files on the NVMe cache: the partition's hot tail.
//!
//! A local segment holds only durable batches (appended after their write-ahead commit),
//! so everything in it may be served to consumers. It is a cache, never the source of
//! truth: a new owner rebuilds it from the write-ahead ranges in object storage, and it
//! is deleted once its sealed copy is committed to the manifest.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tiering::segment::BatchEntry;

use super::batch;

#[derive(Debug)]
pub(crate) struct LocalSegment {
    pub base_offset: i64,
    /// Exclusive end offset.
    pub end_offset: i64,
    pub size: u64,
    pub max_timestamp: i64,
    pub created_ms: i64,
    /// One entry per batch, ascending.
    pub entries: Vec<BatchEntry>,
    pub file: Arc<File>,
    pub path: PathBuf,
}

impl LocalSegment {
    pub(crate) fn create(
        dir: &Path,
        base_offset: i64,
        created_ms: i64,
    ) -> std::io::Result<LocalSegment> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{base_offset:020}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        Ok(LocalSegment {
            base_offset,
            end_offset: base_offset,
            size: 0,
            max_timestamp: -1,
            created_ms,
            entries: Vec::new(),
            file: Arc::new(file),
            path,
        })
    }

    /// Appends durable, stamped batches, all or none: on an error (a full disk) the
    /// segment is left exactly as it was, so it always holds whole batches with no
    /// offset missing. Writes go to the page cache (no fsync: the object store is what
    /// makes them durable).
    #[cfg(test)]
    pub(crate) fn append(&mut self, batches: &[Bytes]) -> std::io::Result<()> {
        let entries = self.plan(batches)?;
        write_planned(&self.file, &entries, batches)?;
        self.record(entries);
        Ok(())
    }

    /// Where `batches` go if appended: one entry per batch, positioned after what the
    /// file holds. Refuses batches that are unreadable or do not follow on.
    pub(crate) fn plan(&self, batches: &[Bytes]) -> std::io::Result<Vec<BatchEntry>> {
        let mut entries = Vec::with_capacity(batches.len());
        let (mut position, mut next) = (self.size, self.end_offset);
        for b in batches {
            let Ok(h) = batch::BatchHeader::parse(b) else {
                return Err(std::io::Error::other(
                    "refusing to append an unreadable batch",
                ));
            };
            if h.base_offset != next {
                return Err(std::io::Error::other(format!(
                    "refusing to append offset {} after {next}: offsets must follow on",
                    h.base_offset
                )));
            }
            entries.push(BatchEntry {
                base_offset: h.base_offset,
                last_offset: h.last_offset(),
                max_timestamp: h.max_timestamp,
                position,
                len: b.len() as u32,
            });
            position += b.len() as u64;
            next = h.last_offset() + 1;
        }
        Ok(entries)
    }

    /// Makes planned batches, written by [`write_planned`], part of the segment.
    pub(crate) fn record(&mut self, entries: Vec<BatchEntry>) {
        for e in entries {
            self.size = e.position + e.len as u64;
            self.end_offset = e.last_offset + 1;
            self.max_timestamp = self.max_timestamp.max(e.max_timestamp);
            self.entries.push(e);
        }
    }

    /// The byte range to serve for a fetch at `offset`: whole batches from the one that
    /// contains it, at most `max_bytes` (but always the first batch).
    pub(crate) fn range_for(&self, offset: i64, max_bytes: u64) -> Option<(u64, u64)> {
        let first = self.entries.partition_point(|e| e.last_offset < offset);
        let start = self.entries.get(first)?;
        let mut end = start.position + start.len as u64;
        for e in &self.entries[first + 1..] {
            let next = e.position + e.len as u64;
            if next - start.position > max_bytes {
                break;
            }
            end = next;
        }
        Some((start.position, end - start.position))
    }

    /// Position of the first batch whose max timestamp is at or after `ts`.
    pub(crate) fn offset_for_timestamp(&self, ts: i64) -> Option<&BatchEntry> {
        self.entries.iter().find(|e| e.max_timestamp >= ts)
    }

    #[cfg(test)]
    pub(crate) fn read_all(&self) -> std::io::Result<Bytes> {
        read_at(&self.file, 0, self.size)
    }

    pub(crate) fn remove_file(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove local segment");
        }
    }
}

/// Writes batches where [`LocalSegment::plan`] put them (blocking file I/O: run it off
/// the runtime's workers). Bytes written past the segment's recorded size are invisible
/// until recorded, and overwritten by the next append if they never are.
pub(crate) fn write_planned(
    file: &File,
    entries: &[BatchEntry],
    batches: &[Bytes],
) -> std::io::Result<()> {
    for (e, b) in entries.iter().zip(batches) {
        file.write_all_at(b, e.position)?;
    }
    Ok(())
}

pub(crate) fn read_at(file: &File, pos: u64, len: u64) -> std::io::Result<Bytes> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, pos)?;
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::batch::{stamp, tests::make_batch};

    #[test]
    fn append_and_ranges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seg = LocalSegment::create(dir.path(), 10, 0).expect("create");
        let a = stamp(&make_batch(2, -1, -1, -1, 5), 10, 0);
        let b = stamp(&make_batch(3, -1, -1, -1, 9), 12, 0);
        seg.append(&[a.clone(), b.clone()]).expect("append");
        assert_eq!(seg.end_offset, 15);
        assert_eq!(seg.range_for(10, 1), Some((0, a.len() as u64)));
        assert_eq!(
            seg.range_for(11, 1 << 20),
            Some((0, (a.len() + b.len()) as u64))
        );
        assert_eq!(seg.range_for(13, 1), Some((a.len() as u64, b.len() as u64)));
        assert_eq!(seg.range_for(15, 1), None);
        assert_eq!(seg.offset_for_timestamp(6).map(|e| e.base_offset), Some(12));
        let all = seg.read_all().expect("read");
        assert_eq!(&all[..a.len()], &a[..]);
        // Offsets must follow on: a batch after a hole is refused, and the segment is
        // left as it was.
        let after_hole = stamp(&make_batch(1, -1, -1, -1, 9), 17, 0);
        assert!(seg
            .append(&[stamp(&make_batch(1, -1, -1, -1, 9), 15, 0), after_hole])
            .is_err());
        assert_eq!(
            (seg.end_offset, seg.entries.len(), seg.size),
            (15, 2, (a.len() + b.len()) as u64)
        );
    }
}
