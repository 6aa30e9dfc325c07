//! The local cache disk: whether the broker may write to it now.
//!
//! Local disk is a cache (design §2): the partitions' hot tails and the block cache's
//! disk tier. A full disk must never cost an acknowledged record, so it is a state the
//! broker knows rather than an error each write meets on its own. The disk counts as
//! full once a local write fails for lack of space (ENOSPC, EDQUOT) or a check finds
//! less than `cache.disk.min.free.bytes` free; while full, local writes are not even
//! attempted (partitions serve their tails from the write-ahead objects, `acks=1`
//! produces are refused, the block cache keeps to memory) and `/readyz` says so. A
//! check every `cache.disk.check.interval.ms` finds the room again: twice the minimum
//! free, so a disk hovering at the line does not flap.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{info, warn};

/// The state of the cache disk, shared by every writer of it.
#[derive(Debug)]
pub(crate) struct CacheDisk {
    dir: PathBuf,
    min_free_bytes: u64,
    full: AtomicBool,
    blocks: Arc<tiering::BlockCache>,
}

/// Why a local write did not happen (the label of `strata_local_write_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteFailure {
    /// The disk had no room (ENOSPC, EDQUOT).
    NoSpace,
    /// Any other I/O error.
    Io,
    /// Not attempted: the disk is known to be full.
    Skipped,
}

impl WriteFailure {
    pub(crate) fn label(self) -> &'static str {
        match self {
            WriteFailure::NoSpace => "no_space",
            WriteFailure::Io => "io",
            WriteFailure::Skipped => "skipped",
        }
    }

    pub(crate) fn of(e: &std::io::Error) -> WriteFailure {
        match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                WriteFailure::NoSpace
            }
            _ => WriteFailure::Io,
        }
    }
}

impl CacheDisk {
    pub(crate) fn new(
        dir: PathBuf,
        min_free_bytes: u64,
        blocks: Arc<tiering::BlockCache>,
    ) -> CacheDisk {
        crate::metrics::metrics().cache_disk_full.set(0);
        CacheDisk {
            dir,
            min_free_bytes,
            full: AtomicBool::new(false),
            blocks,
        }
    }

    /// Whether local writes may be attempted.
    pub(crate) fn writable(&self) -> bool {
        !self.full.load(Ordering::Acquire)
    }

    /// Counts a local write that failed (or was skipped); one that failed for lack of
    /// space marks the disk full at once.
    pub(crate) fn note_failure(
        &self,
        failure: WriteFailure,
        what: &str,
        error: Option<&std::io::Error>,
    ) {
        crate::metrics::metrics()
            .local_write_failures
            .with_label_values(&[failure.label()])
            .inc();
        if failure == WriteFailure::NoSpace {
            if let Some(e) = error {
                self.set_full(true, &format!("{what}: {e}"));
            }
        }
    }

    /// Counts a failed local write and returns the error's class.
    pub(crate) fn note_error(&self, what: &str, e: &std::io::Error) -> WriteFailure {
        let failure = WriteFailure::of(e);
        self.note_failure(failure, what, Some(e));
        failure
    }

    /// Checks the free space of the cache directory (a blocking `statvfs`: call it off
    /// the runtime's workers) and updates the state. Returns whether writes may go on.
    pub(crate) fn check(&self) -> bool {
        let free = match fs4::available_space(&self.dir) {
            Ok(free) => free,
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot read the cache disk's free space");
                return self.writable();
            }
        };
        crate::metrics::metrics()
            .cache_disk_free_bytes
            .set(free.min(i64::MAX as u64) as i64);
        if self.writable() && free < self.min_free_bytes {
            self.set_full(
                true,
                &format!("{free} bytes free, below cache.disk.min.free.bytes"),
            );
        } else if !self.writable() && free >= self.min_free_bytes.saturating_mul(2).max(1) {
            self.set_full(false, &format!("{free} bytes free"));
        }
        self.writable()
    }

    fn set_full(&self, full: bool, reason: &str) {
        if self.full.swap(full, Ordering::AcqRel) == full {
            return;
        }
        self.blocks.set_disk_writes(!full);
        crate::metrics::metrics()
            .cache_disk_full
            .set(i64::from(full));
        if full {
            warn!(dir = %self.dir.display(), reason, "cache disk full: local writes stop, partitions serve their tails from write-ahead objects, acks=1 produces are refused");
        } else {
            info!(dir = %self.dir.display(), reason, "cache disk has room again: local writes resume");
        }
    }
}
