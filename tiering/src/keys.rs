//! Object naming: where every object this crate writes lives in the store.
//!
//! These names are **persisted and stable**: objects written by one version of
//! Strata are found by the next through exactly these strings, so changing a
//! format here is a storage migration, not a refactor. The golden tests at the
//! bottom pin every name.
//!
//! Layout:
//!
//! * `wal/{broker_id}/{session:012}-{seq:012}.wal` — a write-ahead object. The
//!   zero padding makes a plain lexicographic listing of one broker's
//!   directory come back in (session, seq) order for values below 10^12
//!   (negative numbers keep their sign: `-00000000005`).
//! * `segments/{stream}/{base_offset:020}-{leader_epoch}.seg` — a sealed
//!   segment of one stream; padding to 20 digits sorts non-negative offsets
//!   numerically within a stream.
//! * `segments/{stream}` — the prefix holding all of a stream's segments.
//!
//! A stream id is an opaque, non-empty string chosen by the caller (for
//! example `3f2a…-uuid/7`). It is split on `/` into path parts; empty parts
//! are dropped and characters that object stores cannot hold are
//! percent-encoded by [`Path`], so callers should use ids without empty
//! parts (no leading, trailing or doubled `/`) for the naming to be
//! one-to-one. Object-store prefixes match whole parts, so the prefix of
//! stream `a/1` never contains objects of stream `a/10`.

use object_store::path::Path;

/// Key of the write-ahead object number `seq` of `session` on `broker_id`:
/// `wal/{broker_id}/{session:012}-{seq:012}.wal`.
pub fn wal_object_key(broker_id: i32, session: i64, seq: u64) -> Path {
    Path::from(format!("wal/{broker_id}/{session:012}-{seq:012}.wal"))
}

/// Key of the segment of `stream` starting at `base_offset`, written under
/// `leader_epoch`: `segments/{stream}/{base_offset:020}-{leader_epoch}.seg`.
pub fn segment_object_key(stream: &str, base_offset: i64, leader_epoch: i32) -> Path {
    stream_prefix(stream).join(segment_file_name(base_offset, leader_epoch))
}

/// The key of a segment object a compaction pass wrote at `compacted_ms`:
/// `segments/{stream}/{base:020}-{epoch}-c{compacted_ms}.seg`. Each pass writes new
/// objects (create-only), so a rewritten segment never takes the key of the one it
/// replaces, which readers of the old manifest may still be reading.
pub fn compacted_segment_object_key(
    stream: &str,
    base_offset: i64,
    leader_epoch: i32,
    compacted_ms: i64,
) -> Path {
    stream_prefix(stream).join(format!(
        "{base_offset:020}-{leader_epoch}-c{compacted_ms}.seg"
    ))
}

/// The prefix under which all segments of `stream` live: `segments/{stream}`.
pub fn stream_prefix(stream: &str) -> Path {
    debug_assert!(!stream.is_empty(), "stream ids must not be empty");
    Path::from(format!("segments/{stream}"))
}

fn segment_file_name(base_offset: i64, leader_epoch: i32) -> String {
    format!("{base_offset:020}-{leader_epoch}.seg")
}

/// Parses a key produced by [`wal_object_key`] back into
/// `(broker_id, session, seq)`. Returns `None` for anything that is not
/// exactly such a key (including non-canonical spellings of the numbers).
pub fn parse_wal_object_key(key: &Path) -> Option<(i32, i64, u64)> {
    let mut parts = key.parts();
    if parts.next()?.as_ref() != "wal" {
        return None;
    }
    let broker_id: i32 = parts.next()?.as_ref().parse().ok()?;
    let file = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let (session, seq) = file.as_ref().strip_suffix(".wal")?.rsplit_once('-')?;
    let (session, seq) = (session.parse().ok()?, seq.parse().ok()?);
    (wal_object_key(broker_id, session, seq) == *key).then_some((broker_id, session, seq))
}

/// Parses the file name (last part) of a key produced by
/// [`segment_object_key`] into `(base_offset, leader_epoch)`. Returns `None`
/// for anything that is not exactly such a name.
pub fn parse_segment_file_name(name: &str) -> Option<(i64, i32)> {
    let stem = name.strip_suffix(".seg")?;
    // Skip a leading sign so that a negative base offset is not split on it.
    let split = stem.get(1..)?.find('-')? + 1;
    let base_offset = stem.get(..split)?.parse().ok()?;
    let leader_epoch = stem.get(split + 1..)?.parse().ok()?;
    (segment_file_name(base_offset, leader_epoch) == name).then_some((base_offset, leader_epoch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_wal_key() {
        assert_eq!(
            wal_object_key(3, 17, 42).as_ref(),
            "wal/3/000000000017-000000000042.wal"
        );
        assert_eq!(
            wal_object_key(0, 0, 0).as_ref(),
            "wal/0/000000000000-000000000000.wal"
        );
        assert_eq!(
            wal_object_key(-1, -5, u64::MAX).as_ref(),
            "wal/-1/-00000000005-18446744073709551615.wal"
        );
    }

    #[test]
    fn golden_segment_key() {
        assert_eq!(
            segment_object_key("3f2a9c1e-uuid/7", 1234, 5).as_ref(),
            "segments/3f2a9c1e-uuid/7/00000000000000001234-5.seg"
        );
        assert_eq!(
            segment_object_key("s", i64::MAX, -1).as_ref(),
            "segments/s/09223372036854775807--1.seg"
        );
        assert_eq!(
            stream_prefix("3f2a9c1e-uuid/7").as_ref(),
            "segments/3f2a9c1e-uuid/7"
        );
    }

    #[test]
    fn segment_keys_live_under_their_prefix_only() {
        let key = segment_object_key("topic-uuid/1", 0, 0);
        assert!(key.prefix_matches(&stream_prefix("topic-uuid/1")));
        assert!(!key.prefix_matches(&stream_prefix("topic-uuid/10")));
        assert!(!segment_object_key("topic-uuid/10", 0, 0)
            .prefix_matches(&stream_prefix("topic-uuid/1")));
    }

    #[test]
    fn parse_rejects_non_canonical() {
        let parse = |s: &str| parse_wal_object_key(&Path::from(s));
        assert_eq!(
            parse("wal/3/000000000017-000000000042.wal"),
            Some((3, 17, 42))
        );
        assert_eq!(parse("wal/3/17-42.wal"), None);
        assert_eq!(parse("wal/3/000000000017-000000000042.seg"), None);
        assert_eq!(parse("wal/x/000000000017-000000000042.wal"), None);
        assert_eq!(parse("wal/3/000000000017-000000000042.wal/x"), None);
        assert_eq!(parse("segments/3/000000000017-000000000042.wal"), None);
        assert_eq!(
            parse_segment_file_name("00000000000000001234-5.seg"),
            Some((1234, 5))
        );
        assert_eq!(parse_segment_file_name("1234-5.seg"), None);
        assert_eq!(parse_segment_file_name("00000000000000001234-5"), None);
        assert_eq!(parse_segment_file_name(""), None);
        assert_eq!(parse_segment_file_name("-.seg"), None);
    }

    proptest! {
        #[test]
        fn wal_key_round_trips(broker in any::<i32>(), session in any::<i64>(), seq in any::<u64>()) {
            let key = wal_object_key(broker, session, seq);
            prop_assert_eq!(parse_wal_object_key(&key), Some((broker, session, seq)));
        }

        #[test]
        fn segment_name_round_trips(base in any::<i64>(), epoch in any::<i32>()) {
            let key = segment_object_key("a/b", base, epoch);
            let name = key.filename().map(str::to_owned);
            prop_assert_eq!(name.as_deref().and_then(parse_segment_file_name), Some((base, epoch)));
        }

        #[test]
        fn wal_keys_sort_like_numbers(a in (0i64..1_000_000_000_000, 0u64..1_000_000_000_000),
                                      b in (0i64..1_000_000_000_000, 0u64..1_000_000_000_000)) {
            let (ka, kb) = (wal_object_key(1, a.0, a.1), wal_object_key(1, b.0, b.1));
            prop_assert_eq!(ka.as_ref().cmp(kb.as_ref()), a.cmp(&b));
        }

        #[test]
        fn parsers_never_panic(s in ".{0,40}") {
            let _ = parse_segment_file_name(&s);
            let _ = parse_wal_object_key(&Path::from(s.as_str()));
        }
    }
}
