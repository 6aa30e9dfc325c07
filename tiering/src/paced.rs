//! Large writes to a `file://` store that fsyncs, paced so they never stall the small
//! ones.
//!
//! A segment upload is tens of megabytes written and then fsynced in one go. On a shared
//! disk that one closing fsync fills the device queue (and, on ext4, the journal commit
//! every other fsync joins) for a few hundred milliseconds, and the write-ahead fsyncs
//! that `acks=all` producers wait on queue behind it. So a large object is written in
//! chunks, each synced (`fdatasync`) before the next: the upload keeps at most one
//! chunk in the queue, each sync is short, and the others' fsyncs get their turn in
//! between. The contract is object_store's create: a staged file
//! (`key#digits`, which listings skip), synced, hard-linked to the key (failing if the
//! key exists), the directory synced, the staged name removed.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use object_store::PutPayload;

/// Bytes handed to the disk at once; objects this large or larger are paced.
pub(crate) const CHUNK: usize = 8 << 20;

/// Writes `payload` as the new object at `dest`, paced (see the module docs).
pub(crate) fn put_create(dest: &Path, payload: &PutPayload) -> object_store::Result<()> {
    let (file, staged) = staged(dest).map_err(|e| generic(dest, e))?;
    let result = write_paced(&file, payload)
        .and_then(|()| file.sync_data())
        .map_err(|e| generic(dest, e))
        .and_then(|()| {
            drop(file);
            match std::fs::hard_link(&staged, dest) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    Err(object_store::Error::AlreadyExists {
                        path: dest.display().to_string(),
                        source: Box::new(e),
                    })
                }
                Err(e) => Err(generic(dest, e)),
            }
        })
        .and_then(|()| {
            let parent = dest.parent().unwrap_or(dest);
            sync_dir(parent).map_err(|e| generic(dest, e))
        });
    let _ = std::fs::remove_file(&staged);
    result
}

/// A fresh staging file beside `dest`, creating (and syncing) missing directories.
fn staged(dest: &Path) -> std::io::Result<(File, PathBuf)> {
    let parent = dest
        .parent()
        .ok_or_else(|| std::io::Error::other("no parent"))?;
    if !parent.exists() {
        let mut missing = vec![parent.to_path_buf()];
        while let Some(up) = missing.last().and_then(|p| p.parent()) {
            if up.exists() {
                break;
            }
            missing.push(up.to_path_buf());
        }
        std::fs::create_dir_all(parent)?;
        // Each new directory's entry lives in its parent.
        for up in missing.iter().filter_map(|d| d.parent()) {
            sync_dir(up)?;
        }
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut n = u64::from(std::process::id()) * 1_000_000 + NEXT.fetch_add(1, Ordering::Relaxed);
    loop {
        let mut name = dest.as_os_str().to_owned();
        name.push(format!("#{n}"));
        let path = PathBuf::from(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Writes every chunk of the payload, waiting for each `CHUNK` to reach the disk
/// (`fdatasync`, so each wait is short and other fsyncs get their turn between them).
fn write_paced(file: &File, payload: &PutPayload) -> std::io::Result<()> {
    let mut writer = file;
    let (mut written, mut synced) = (0u64, 0u64);
    for part in payload.iter() {
        for piece in part.chunks(CHUNK) {
            writer.write_all(piece)?;
            written += piece.len() as u64;
            if written - synced >= CHUNK as u64 {
                file.sync_data()?;
                synced = written;
            }
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn generic(dest: &Path, e: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalFileSystem",
        source: format!("{}: {e}", dest.display()).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The object holds exactly the payload, spread over several chunks; a second
    /// create of the same key fails as taken and leaves no staged file behind.
    #[test]
    fn a_paced_create_writes_the_payload_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("segments/s/0001.seg");
        let data: Vec<u8> = (0..(CHUNK * 2 + 123)).map(|i| (i % 251) as u8).collect();
        let payload = PutPayload::from_iter([
            bytes::Bytes::from(data[..1000].to_vec()),
            bytes::Bytes::from(data[1000..].to_vec()),
        ]);
        put_create(&dest, &payload).expect("create");
        assert_eq!(std::fs::read(&dest).expect("read"), data);
        let again = put_create(&dest, &payload);
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "{again:?}"
        );
        let names: Vec<_> = std::fs::read_dir(dest.parent().expect("parent"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no staged file left: {names:?}");
    }
}
