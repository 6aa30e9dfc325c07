//! The swap of a finished pass into the manifest, and what its owner does with each
//! answer. Shared by the owner task and the simulation, so both run the same rules.
//!
//! A swap whose answer was lost (the metadata store timed out after applying it) must
//! not be taken for a refusal: the objects it wrote would be deleted while the manifest
//! names them. So a failed swap asks the store what it holds, as a failed segment commit
//! does; when even that fails, the owner's view may be wrong and it claims the partition
//! again (which re-reads it).

use super::job::Compacted;
use crate::metadata::{MetaError, MetadataStore, PartitionKey, SegmentRecord};

/// What became of a swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Swap {
    /// The manifest now holds the pass's segments.
    Committed,
    /// Not sent: the owner's manifest no longer starts with what the pass read
    /// (retention, DeleteRecords or an ownership change came between). The objects
    /// the pass wrote are named by nothing and are deleted at once.
    Stale,
    /// A newer epoch holds the partition; the store refused the swap. Its objects are
    /// deleted at once; the owner steps down.
    Fenced,
    /// The store answered with an error and then showed the swap not applied. The
    /// objects are left to the orphan collector (a late apply would name them).
    Failed(String),
    /// Whether it applied is unknown: the owner claims the partition again. The
    /// objects are left to the orphan collector.
    Unknown(String),
}

impl Swap {
    /// The label of `strata_compaction_passes_total`.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            Swap::Committed => "committed",
            Swap::Stale | Swap::Fenced | Swap::Failed(_) | Swap::Unknown(_) => "not_committed",
        }
    }

    /// Whether the objects the pass wrote may be deleted now.
    pub(crate) fn discard_written(&self) -> bool {
        matches!(self, Swap::Stale | Swap::Fenced)
    }
}

/// Swaps `c` into the manifest of `key` at `leader_epoch`, if `current` (the owner
/// serves the partition and its manifest still starts with `c.replaced`).
pub(crate) async fn swap(
    meta: &dyn MetadataStore,
    key: PartitionKey,
    leader_epoch: i32,
    c: &Compacted,
    current: bool,
) -> Swap {
    if !current {
        return Swap::Stale;
    }
    let bases: Vec<i64> = c.replaced.iter().map(|s| s.base_offset).collect();
    match meta
        .replace_segments(key, leader_epoch, &bases, &c.segments)
        .await
    {
        Ok(()) => Swap::Committed,
        Err(MetaError::Fenced(_)) => Swap::Fenced,
        Err(e) => match meta.read_partition(key).await {
            Ok(state) if holds(&state.segments, &c.segments, &c.replaced) => Swap::Committed,
            Ok(state) if holds(&state.segments, &c.replaced, &c.segments) => {
                Swap::Failed(e.to_string())
            }
            Ok(_) => Swap::Unknown(format!("{e}; the manifest holds neither side")),
            Err(read) => Swap::Unknown(format!("{e}; then reading the manifest: {read}")),
        },
    }
}

/// Whether `manifest` holds every record of `these` and none of `not` that `these` does
/// not also hold. Records compare whole: a segment a pass kept as it was keeps its
/// object but not its `compacted_ms`, so a pass that wrote nothing new still tells.
fn holds(manifest: &[SegmentRecord], these: &[SegmentRecord], not: &[SegmentRecord]) -> bool {
    these.iter().all(|s| manifest.contains(s))
        && not
            .iter()
            .filter(|n| !these.contains(n))
            .all(|n| !manifest.contains(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(base: i64, end: i64, key: &str) -> SegmentRecord {
        SegmentRecord {
            base_offset: base,
            end_offset: end,
            object_key: key.to_owned(),
            size_bytes: 10,
            data_bytes: 10,
            max_timestamp: 0,
            created_ms: 0,
            compacted_ms: 0,
        }
    }

    #[test]
    fn a_manifest_holds_one_side_of_a_swap() {
        let (a, b, c) = (seg(0, 5, "a"), seg(5, 9, "b"), seg(9, 12, "c"));
        let ab = seg(0, 9, "ab");
        let old = vec![a.clone(), b.clone(), c.clone()];
        let new = vec![ab.clone(), c];
        let (replaced, written) = (vec![a, b], vec![ab]);
        assert!(holds(&new, &written, &replaced), "applied");
        assert!(!holds(&old, &written, &replaced));
        assert!(holds(&old, &replaced, &written), "not applied");
        assert!(!holds(&new, &replaced, &written));
        // An input kept as it was: the same object, now marked compacted.
        let a2 = SegmentRecord {
            compacted_ms: 7,
            ..seg(0, 5, "a")
        };
        let (replaced, kept) = (vec![seg(0, 5, "a")], vec![a2.clone()]);
        assert!(holds(&kept, &kept, &replaced), "applied");
        assert!(!holds(&replaced, &kept, &replaced));
        assert!(holds(&replaced, &replaced, &kept), "not applied");
        assert!(!holds(&kept, &replaced, &kept));
    }
}
