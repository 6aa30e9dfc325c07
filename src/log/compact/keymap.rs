//! The compactor's key map: for each key of the dirty part of a partition, the offset of
//! its newest record. Keys are kept as 128-bit MD5 digests (as Kafka's cleaner keeps
//! them), so an entry costs the same whatever the key's size, and the map holds at most
//! `log.cleaner.dedupe.buffer.size / ENTRY_BYTES` keys.

use std::collections::HashMap;

use md5::{Digest, Md5};

/// What one entry costs: the digest, the offset and the table's own overhead.
pub(crate) const ENTRY_BYTES: usize = 32;

#[derive(Debug)]
pub(crate) struct KeyMap {
    latest: HashMap<[u8; 16], i64>,
    capacity: usize,
}

impl KeyMap {
    /// A map that holds what `budget` bytes allow (at least one key).
    pub(crate) fn with_budget(budget: usize) -> KeyMap {
        KeyMap {
            latest: HashMap::new(),
            capacity: (budget / ENTRY_BYTES).max(1),
        }
    }

    /// Records `offset` as `key`'s newest; `false` (and nothing changes) when the key is
    /// new and the map is full.
    pub(crate) fn insert(&mut self, key: &[u8], offset: i64) -> bool {
        let digest = digest(key);
        if let Some(at) = self.latest.get_mut(&digest) {
            *at = (*at).max(offset);
            return true;
        }
        if self.latest.len() >= self.capacity {
            return false;
        }
        self.latest.insert(digest, offset);
        true
    }

    /// The offset of `key`'s newest record in the mapped range.
    pub(crate) fn latest(&self, key: &[u8]) -> Option<i64> {
        self.latest.get(&digest(key)).copied()
    }
}

fn digest(key: &[u8]) -> [u8; 16] {
    Md5::digest(key).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newest offset wins whatever the order, and a full map refuses new keys but
    /// still updates the ones it has.
    #[test]
    fn keeps_the_newest_offset_and_stays_within_its_budget() {
        let mut m = KeyMap::with_budget(2 * ENTRY_BYTES);
        assert!(m.insert(b"a", 5));
        assert!(m.insert(b"a", 3));
        assert!(m.insert(b"b", 7));
        assert!(!m.insert(b"c", 9), "a third key does not fit");
        assert!(m.insert(b"b", 8), "a known key still updates");
        assert_eq!(m.latest(b"a"), Some(5));
        assert_eq!(m.latest(b"b"), Some(8));
        assert_eq!(m.latest(b"c"), None);
        assert!(!m.insert(b"d", 1), "still full");
    }
}
