//! The orphan collector: deletes objects under `segments/` and `wal/` that no manifest
//! references and the metadata does not remember, once they are older than a grace
//! period. Orphans come from crashes between writing an object and committing it (an
//! upload whose commit never happened, a flush whose commit failed past its timeout)
//! and from topic deletions cut short; without this they would be paid for forever.
//!
//! Safety: the listing comes first and the metadata second, so an object committed in
//! between is in the metadata's answer; and only objects older than `orphan.grace.ms`
//! are candidates, so an object written but not yet committed (a flush commits within
//! `wal.flush.timeout.ms`, an upload within seconds) is never taken. An object any
//! manifest references is never deleted.

use std::collections::HashSet;
use std::time::Duration;

use object_store::path::Path;

use crate::metadata::MetadataStore;

/// Deletes the orphans older than `grace` as of `now_ms`; returns how many.
pub(crate) async fn collect(
    store: &tiering::Store,
    meta: &dyn MetadataStore,
    grace: Duration,
    now_ms: i64,
) -> anyhow::Result<usize> {
    let oldest = now_ms - grace.as_millis() as i64;
    let mut candidates = Vec::new();
    for prefix in ["segments", "wal"] {
        for object in store.list(&Path::from(prefix)).await? {
            if object.last_modified.timestamp_millis() <= oldest {
                candidates.push((prefix, object.location));
            }
        }
    }
    if candidates.is_empty() {
        return Ok(0);
    }
    let known: HashSet<String> = meta.known_objects().await?.into_iter().collect();
    let mut deleted = 0;
    for (prefix, key) in candidates {
        if known.contains(key.as_ref()) {
            continue;
        }
        store.delete(&key).await?;
        crate::metrics::metrics()
            .orphans_deleted
            .with_label_values(&[prefix])
            .inc();
        tracing::debug!(object = %key, "deleted an orphaned object");
        deleted += 1;
    }
    Ok(deleted)
}
