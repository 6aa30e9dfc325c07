//! The conformance suite every [`MetadataStore`] backend must pass.
//!
//! Kafka semantics are written once above the trait, so every backend has to behave
//! identically: this module owns the executable statement of that behaviour. Each
//! `check_*` function exercises one area against any store and panics with a message on
//! the first difference. The checks create their own uniquely named topics and objects
//! and only assert about those, so they can run one store each (as separate tests, via
//! [`metadata_store_conformance!`]) or all against one shared store ([`run_all`]).
//!
//! Behaviour pinned here that the trait docs leave implicit:
//! - a `commit_wal` naming a partition that does not exist (its topic was deleted)
//!   reports it as `Fenced`, like a stale epoch, so the rest can be retried without it;
//! - `set_partition_count` with a count at or below the current one is an `Ok` no-op;
//! - a `commit_wal` with no partitions still records its object (as garbage);
//! - committed offsets are stored as given: a lower offset than the stored one replaces
//!   it (judging commits is the group coordinator's job), and a topic need not exist;
//! - committed offsets are independent of topics: `delete_topic` leaves them;
//! - `commit_offsets` with no offsets is a no-op (the group does not appear);
//! - `fetch_offsets` sorts topics by name as Rust's `String` order does (bytewise);
//! - `delete_offsets` and `expire_offsets` count only rows that existed; expiry is
//!   strict (`commit_timestamp_ms < before_ms`) and never touches unlisted groups;
//! - a transaction's pending offsets replace the group's committed ones when it
//!   completes with a commit, whatever their offsets (as plain commits do), and only
//!   `CompleteCommit` and `CompleteAbort` records settle them;
//! - a trim forgets the aborted transactions whose marker is below the new log start
//!   offset.

use std::collections::BTreeMap;

use super::{
    AbortedTxnRecord, BrokerRecord, CommittedOffset, Fence, MetaError, MetadataStore,
    PartitionCommit, PartitionKey, PartitionOwner, PartitionState, ProducerBatch,
    ProducerStateRecord, SegmentRecord, TopicRecord, TxnOffsetRecord, TxnRecord, TxnState,
    WalCommit, WalRangeRecord,
};

/// Generates one `#[tokio::test]` per check, each against a fresh store made by
/// `$make_store` (an expression evaluated inside the async test, so it may `.await`).
macro_rules! metadata_store_conformance {
    ($make_store:expr) => {
        $crate::metadata::conformance::metadata_store_conformance!(
            @tests $make_store;
            check_topic_create_and_list,
            check_topic_delete,
            check_topic_configs,
            check_partition_count_growth,
            check_claim_bumps_epoch,
            check_release_and_owners,
            check_fenced_offset_commit,
            check_fenced_offset_delete_and_expiry,
            check_commit_wal_applies,
            check_stale_commit_is_fenced,
            check_several_objects_commit_together,
            check_commit_segment_drops_covered_ranges,
            check_trim_log,
            check_replace_segments,
            check_wal_object_gc,
            check_known_objects,
            check_producer_ids,
            check_broker_sessions,
            check_broker_membership,
            check_large_commit,
            check_offset_commit_and_fetch,
            check_offset_overwrite,
            check_offset_groups_isolated,
            check_offset_delete,
            check_offset_groups_listed,
            check_offset_expiry,
            check_offsets_independent_of_topics,
            check_large_offset_commit,
            check_txn_records,
            check_txn_offsets_settle,
            check_aborted_txns
        );
    };
    (@tests $make_store:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                let store = $make_store;
                $crate::metadata::conformance::$check(&store).await;
            }
        )+
    };
}
pub(crate) use metadata_store_conformance;

/// Runs every check, one after the other, against the same store.
pub(crate) async fn run_all(store: &dyn MetadataStore) {
    check_topic_create_and_list(store).await;
    check_topic_delete(store).await;
    check_topic_configs(store).await;
    check_partition_count_growth(store).await;
    check_claim_bumps_epoch(store).await;
    check_release_and_owners(store).await;
    check_fenced_offset_commit(store).await;
    check_fenced_offset_delete_and_expiry(store).await;
    check_commit_wal_applies(store).await;
    check_stale_commit_is_fenced(store).await;
    check_several_objects_commit_together(store).await;
    check_commit_segment_drops_covered_ranges(store).await;
    check_trim_log(store).await;
    check_replace_segments(store).await;
    check_wal_object_gc(store).await;
    check_known_objects(store).await;
    check_producer_ids(store).await;
    check_broker_sessions(store).await;
    check_broker_membership(store).await;
    check_large_commit(store).await;
    check_offset_commit_and_fetch(store).await;
    check_offset_overwrite(store).await;
    check_offset_groups_isolated(store).await;
    check_offset_delete(store).await;
    check_offset_groups_listed(store).await;
    check_offset_expiry(store).await;
    check_offsets_independent_of_topics(store).await;
    check_large_offset_commit(store).await;
    check_txn_records(store).await;
    check_txn_offsets_settle(store).await;
    check_aborted_txns(store).await;
}

// ---------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------

/// A name no other check (or earlier run against a shared store) uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", crate::clock::unique_id().simple())
}

fn topic_record(name: &str, partitions: i32) -> TopicRecord {
    TopicRecord {
        name: name.to_owned(),
        id: crate::clock::unique_id(),
        partitions,
        configs: BTreeMap::from([("retention.ms".to_owned(), "86400000".to_owned())]),
        created_ms: 1_700_000_000_000,
    }
}

pub(crate) async fn new_topic(store: &dyn MetadataStore, partitions: i32) -> TopicRecord {
    let topic = topic_record(&unique("topic"), partitions);
    store
        .create_topic(&topic)
        .await
        .expect("create a fresh topic");
    topic
}

pub(crate) fn key(topic: &TopicRecord, partition: i32) -> PartitionKey {
    PartitionKey {
        topic_id: topic.id,
        partition,
    }
}

fn range(base_offset: i64, end_offset: i64, object_key: &str) -> WalRangeRecord {
    WalRangeRecord {
        base_offset,
        end_offset,
        object_key: object_key.to_owned(),
        position: u64::try_from(base_offset).expect("test offsets are non-negative") * 100,
        len: u64::try_from(end_offset - base_offset).expect("test ranges are non-empty") * 100,
        max_timestamp: 1_700_000_000_000 + end_offset,
        object_size: 4096 + end_offset as u64,
    }
}

fn segment(base_offset: i64, end_offset: i64) -> SegmentRecord {
    SegmentRecord {
        base_offset,
        end_offset,
        object_key: unique("segment"),
        size_bytes: 4096,
        data_bytes: 4000,
        max_timestamp: 1_700_000_000_000 + end_offset,
        created_ms: 1_700_000_000_500,
        compacted_ms: 0,
    }
}

fn producer(producer_id: i64, last_seq: i32, last_offset: i64) -> ProducerStateRecord {
    ProducerStateRecord {
        producer_id,
        epoch: 3,
        batches: vec![ProducerBatch {
            first_seq: 0,
            last_seq,
            base_offset: last_offset - i64::from(last_seq),
            last_offset,
            timestamp: 1_700_000_000_000,
        }],
        last_update_ms: 1_700_000_000_100,
        txn_first_offset: -1,
        coordinator_epoch: -1,
    }
}

fn part_commit(
    key: PartitionKey,
    leader_epoch: i32,
    range: WalRangeRecord,
    producers: Vec<ProducerStateRecord>,
) -> PartitionCommit {
    PartitionCommit {
        key,
        leader_epoch,
        range,
        producers,
        aborted: vec![],
    }
}

/// A commit of one object (the form most checks need).
fn wal_commit(object_key: &str, partitions: Vec<PartitionCommit>) -> [WalCommit; 1] {
    [WalCommit {
        object_key: object_key.to_owned(),
        created_ms: 1_700_000_000_200,
        partitions,
    }]
}

/// Commits one range of one partition in its own write-ahead object; returns the key.
pub(crate) async fn commit_one(
    store: &dyn MetadataStore,
    key: PartitionKey,
    leader_epoch: i32,
    base_offset: i64,
    end_offset: i64,
) -> String {
    let object_key = unique("wal");
    let commit = wal_commit(
        &object_key,
        vec![part_commit(
            key,
            leader_epoch,
            range(base_offset, end_offset, &object_key),
            vec![],
        )],
    );
    store.commit_wal(&commit).await.expect("commit one range");
    object_key
}

async fn claim(store: &dyn MetadataStore, key: PartitionKey) -> PartitionState {
    store
        .claim_partition(key, 1)
        .await
        .expect("claim an existing partition")
}

async fn find_topic(store: &dyn MetadataStore, name: &str) -> Option<TopicRecord> {
    store
        .list_topics()
        .await
        .expect("list topics")
        .into_iter()
        .find(|t| t.name == name)
}

async fn unreferenced(store: &dyn MetadataStore) -> Vec<String> {
    store
        .unreferenced_wal_objects()
        .await
        .expect("list unreferenced wal objects")
}

fn assert_fenced(result: Result<(), MetaError>, expected: &[PartitionKey], what: &str) {
    match result {
        Err(MetaError::Fenced(mut keys)) => {
            keys.sort();
            let mut expected = expected.to_vec();
            expected.sort();
            assert_eq!(keys, expected, "{what}: wrong partitions named as fenced");
        }
        other => panic!("{what}: expected Fenced({expected:?}), got {other:?}"),
    }
}

fn assert_partition_not_found<T: std::fmt::Debug>(result: Result<T, MetaError>, what: &str) {
    assert!(
        matches!(result, Err(MetaError::PartitionNotFound)),
        "{what}: expected PartitionNotFound, got {result:?}"
    );
}

fn assert_topic_not_found<T: std::fmt::Debug>(result: Result<T, MetaError>, what: &str) {
    assert!(
        matches!(result, Err(MetaError::TopicNotFound)),
        "{what}: expected TopicNotFound, got {result:?}"
    );
}

fn committed(
    topic: &str,
    partition: i32,
    offset: i64,
    commit_timestamp_ms: i64,
) -> CommittedOffset {
    CommittedOffset {
        topic: topic.to_owned(),
        partition,
        offset,
        leader_epoch: 4,
        metadata: format!("meta {topic}/{partition}@{offset}"),
        commit_timestamp_ms,
    }
}

/// What `fetch_offsets` must return for these offsets: sorted by topic, then partition.
fn sorted_offsets(offsets: &[CommittedOffset]) -> Vec<CommittedOffset> {
    let mut offsets = offsets.to_vec();
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    offsets
}

async fn commit_offsets(store: &dyn MetadataStore, group: &str, offsets: &[CommittedOffset]) {
    store
        .commit_offsets(group, offsets, None)
        .await
        .expect("commit offsets");
}

async fn fetch_offsets(store: &dyn MetadataStore, group: &str) -> Vec<CommittedOffset> {
    store.fetch_offsets(group).await.expect("fetch offsets")
}

/// The groups with offsets whose names start with `prefix` (other checks may share the store).
async fn offset_groups_with(store: &dyn MetadataStore, prefix: &str) -> Vec<String> {
    store
        .offset_groups()
        .await
        .expect("list offset groups")
        .into_iter()
        .filter(|g| g.starts_with(prefix))
        .collect()
}

fn sorted_producers(mut producers: Vec<ProducerStateRecord>) -> Vec<ProducerStateRecord> {
    producers.sort_by_key(|p| p.producer_id);
    producers
}

// ---------------------------------------------------------------------------------
// Topics
// ---------------------------------------------------------------------------------

/// Create, read back, refuse a duplicate name, and create the partitions.
pub(crate) async fn check_topic_create_and_list(store: &dyn MetadataStore) {
    let topic = topic_record(&unique("topic"), 3);
    store.create_topic(&topic).await.expect("create topic");
    assert_eq!(find_topic(store, &topic.name).await, Some(topic.clone()));

    let duplicate = TopicRecord {
        id: crate::clock::unique_id(),
        partitions: 7,
        ..topic.clone()
    };
    let result = store.create_topic(&duplicate).await;
    assert!(
        matches!(result, Err(MetaError::TopicExists)),
        "duplicate name: expected TopicExists, got {result:?}"
    );
    assert_eq!(
        find_topic(store, &topic.name).await,
        Some(topic.clone()),
        "a refused duplicate must not change the topic"
    );

    let second = new_topic(store, 1).await;
    let listed = store.list_topics().await.expect("list topics");
    for expected in [&topic, &second] {
        assert_eq!(
            listed.iter().filter(|t| t.name == expected.name).count(),
            1,
            "each topic listed exactly once"
        );
    }

    for partition in 0..3 {
        let state = claim(store, key(&topic, partition)).await;
        assert_eq!(state.leader_epoch, 1, "new partitions start at epoch 0");
        assert_eq!((state.log_start_offset, state.high_watermark), (0, 0));
    }
    assert_partition_not_found(
        store.claim_partition(key(&topic, 3), 1).await,
        "claim past the partition count",
    );
    assert_partition_not_found(
        store.claim_partition(key(&duplicate, 0), 1).await,
        "claim a partition of the refused duplicate's id",
    );
}

/// Delete removes the topic and all its partition data; the name can be reused
/// without seeing old data; the old objects become garbage.
pub(crate) async fn check_topic_delete(store: &dyn MetadataStore) {
    let topic = new_topic(store, 2).await;
    let old = key(&topic, 0);
    let state = claim(store, old).await;
    let object_key = commit_one(store, old, state.leader_epoch, 0, 5).await;
    store
        .commit_segment(old, state.leader_epoch, &segment(0, 3))
        .await
        .expect("commit segment");
    assert!(!unreferenced(store).await.contains(&object_key));

    let removed = store.delete_topic(&topic.name).await.expect("delete topic");
    assert_eq!(removed, topic, "delete returns what was removed");
    assert_eq!(find_topic(store, &topic.name).await, None);
    assert_topic_not_found(store.delete_topic(&topic.name).await, "delete twice");
    assert!(
        unreferenced(store).await.contains(&object_key),
        "ranges of a deleted topic no longer reference their object"
    );

    assert_partition_not_found(store.claim_partition(old, 1).await, "claim deleted");
    assert_partition_not_found(
        store
            .commit_segment(old, state.leader_epoch, &segment(5, 6))
            .await,
        "commit segment to deleted",
    );
    assert_partition_not_found(
        store.trim_log(old, state.leader_epoch, 5, &[0]).await,
        "trim deleted",
    );
    let stale_object = unique("wal");
    let result = store
        .commit_wal(&wal_commit(
            &stale_object,
            vec![part_commit(
                old,
                state.leader_epoch,
                range(5, 6, &stale_object),
                vec![],
            )],
        ))
        .await;
    assert_fenced(result, &[old], "commit to a deleted topic's partition");

    let recreated = TopicRecord {
        id: crate::clock::unique_id(),
        ..topic.clone()
    };
    store.create_topic(&recreated).await.expect("re-create");
    let fresh = claim(store, key(&recreated, 0)).await;
    assert_eq!(
        fresh,
        PartitionState {
            leader_epoch: 1,
            log_start_offset: 0,
            high_watermark: 0,
            segments: vec![],
            wal_ranges: vec![],
            producers: vec![],
            epoch_history: vec![(1, 0)],
            aborted: vec![],
        },
        "a re-created topic starts empty"
    );
}

/// Configs are replaced as a whole.
pub(crate) async fn check_topic_configs(store: &dyn MetadataStore) {
    let topic = new_topic(store, 1).await;
    let configs = BTreeMap::from([
        ("cleanup.policy".to_owned(), "delete".to_owned()),
        ("retention.bytes".to_owned(), "1073741824".to_owned()),
    ]);
    store
        .set_topic_configs(&topic.name, &configs)
        .await
        .expect("set configs");
    let stored = find_topic(store, &topic.name).await.expect("topic listed");
    assert_eq!(stored.configs, configs, "configs replaced, old keys gone");
    assert_eq!(
        (stored.id, stored.partitions, stored.created_ms),
        (topic.id, topic.partitions, topic.created_ms),
        "only configs change"
    );

    store
        .set_topic_configs(&topic.name, &BTreeMap::new())
        .await
        .expect("clear configs");
    let stored = find_topic(store, &topic.name).await.expect("topic listed");
    assert!(stored.configs.is_empty());

    assert_topic_not_found(
        store.set_topic_configs(&unique("missing"), &configs).await,
        "configs of a missing topic",
    );
}

/// The partition count only grows; new partitions start empty, old ones keep their data.
pub(crate) async fn check_partition_count_growth(store: &dyn MetadataStore) {
    let topic = new_topic(store, 2).await;
    let first = claim(store, key(&topic, 0)).await;
    commit_one(store, key(&topic, 0), first.leader_epoch, 0, 4).await;

    store
        .set_partition_count(&topic.name, 5)
        .await
        .expect("grow");
    let stored = find_topic(store, &topic.name).await.expect("topic listed");
    assert_eq!(stored.partitions, 5);
    let new = claim(store, key(&topic, 4)).await;
    assert_eq!(
        (new.leader_epoch, new.high_watermark, new.wal_ranges.len()),
        (1, 0, 0)
    );
    let old = claim(store, key(&topic, 0)).await;
    assert_eq!(
        (old.leader_epoch, old.high_watermark),
        (2, 4),
        "growing leaves existing partitions alone"
    );
    assert_partition_not_found(
        store.claim_partition(key(&topic, 5), 1).await,
        "claim past the new count",
    );

    for count in [3, 5] {
        store
            .set_partition_count(&topic.name, count)
            .await
            .expect("a count at or below the current one is a no-op");
    }
    let stored = find_topic(store, &topic.name).await.expect("topic listed");
    assert_eq!(stored.partitions, 5, "the count never shrinks");
    let still = claim(store, key(&topic, 4)).await;
    assert_eq!(
        still.leader_epoch, 2,
        "a no-op does not recreate partitions"
    );

    assert_topic_not_found(
        store.set_partition_count(&unique("missing"), 3).await,
        "grow a missing topic",
    );
}

// ---------------------------------------------------------------------------------
// Ownership and the write path
// ---------------------------------------------------------------------------------

/// Every claim bumps the epoch and records (epoch, high watermark) in the history.
pub(crate) async fn check_claim_bumps_epoch(store: &dyn MetadataStore) {
    let topic = new_topic(store, 1).await;
    let p = key(&topic, 0);

    let first = store.claim_partition(p, 1).await.expect("first claim");
    assert_eq!(
        first,
        PartitionState {
            leader_epoch: 1,
            log_start_offset: 0,
            high_watermark: 0,
            segments: vec![],
            wal_ranges: vec![],
            producers: vec![],
            epoch_history: vec![(1, 0)],
            aborted: vec![],
        }
    );

    let object_key = commit_one(store, p, 1, 0, 10).await;
    let second = store.claim_partition(p, 2).await.expect("second claim");
    assert_eq!(second.leader_epoch, 2);
    assert_eq!(second.high_watermark, 10);
    assert_eq!(second.epoch_history, vec![(1, 0), (2, 10)]);
    assert_eq!(second.wal_ranges, vec![range(0, 10, &object_key)]);
    // Reading without claiming sees the same state and changes nothing.
    assert_eq!(store.read_partition(p).await.expect("read"), second);
    assert_eq!(store.read_partition(p).await.expect("read"), second);
    assert!(matches!(
        store
            .read_partition(PartitionKey {
                topic_id: crate::clock::unique_id(),
                partition: 0
            })
            .await,
        Err(MetaError::PartitionNotFound)
    ));

    let stale_object = unique("wal");
    let result = store
        .commit_wal(&wal_commit(
            &stale_object,
            vec![part_commit(p, 1, range(10, 12, &stale_object), vec![])],
        ))
        .await;
    assert_fenced(result, &[p], "the former owner commits after a new claim");
    commit_one(store, p, 2, 10, 12).await;

    // The same broker re-claiming still gets a new epoch.
    let third = store.claim_partition(p, 2).await.expect("third claim");
    assert_eq!(third.leader_epoch, 3);
    assert_eq!(third.epoch_history, vec![(1, 0), (2, 10), (3, 12)]);

    let missing = PartitionKey {
        topic_id: crate::clock::unique_id(),
        partition: 0,
    };
    assert_partition_not_found(store.claim_partition(missing, 1).await, "claim unknown");
}

/// A write-ahead commit appends ranges, raises high watermarks and replaces the
/// given producer states, across partitions, in one step.
pub(crate) async fn check_commit_wal_applies(store: &dyn MetadataStore) {
    let topic = new_topic(store, 2).await;
    let (p0, p1) = (key(&topic, 0), key(&topic, 1));
    let e0 = claim(store, p0).await.leader_epoch;
    let e1 = claim(store, p1).await.leader_epoch;

    let first = unique("wal");
    store
        .commit_wal(&wal_commit(
            &first,
            vec![
                part_commit(p0, e0, range(0, 3, &first), vec![producer(7, 2, 2)]),
                part_commit(p1, e1, range(0, 2, &first), vec![producer(8, 1, 1)]),
            ],
        ))
        .await
        .expect("first commit");
    let second = unique("wal");
    store
        .commit_wal(&wal_commit(
            &second,
            vec![part_commit(
                p0,
                e0,
                range(3, 5, &second),
                vec![producer(7, 4, 4), producer(9, 0, 3)],
            )],
        ))
        .await
        .expect("second commit");

    let s0 = claim(store, p0).await;
    assert_eq!(s0.high_watermark, 5);
    assert_eq!(
        s0.wal_ranges,
        vec![range(0, 3, &first), range(3, 5, &second)],
        "ranges kept in base offset order"
    );
    assert_eq!(
        sorted_producers(s0.producers),
        vec![producer(7, 4, 4), producer(9, 0, 3)],
        "producer 7 replaced, producer 9 added"
    );
    assert_eq!(s0.epoch_history, vec![(e0, 0), (e0 + 1, 5)]);

    let s1 = claim(store, p1).await;
    assert_eq!(s1.high_watermark, 2);
    assert_eq!(s1.wal_ranges, vec![range(0, 2, &first)]);
    assert_eq!(s1.producers, vec![producer(8, 1, 1)]);

    let garbage = unreferenced(store).await;
    assert!(!garbage.contains(&first) && !garbage.contains(&second));
}

/// One stale epoch fails the whole commit: nothing of any partition is applied.
pub(crate) async fn check_stale_commit_is_fenced(store: &dyn MetadataStore) {
    let topic = new_topic(store, 2).await;
    let (p0, p1) = (key(&topic, 0), key(&topic, 1));
    let old0 = claim(store, p0).await.leader_epoch;
    let e1 = claim(store, p1).await.leader_epoch;
    let new0 = claim(store, p0).await.leader_epoch;
    assert!(new0 > old0);

    let attempts = [
        ("one stale partition", vec![(p0, old0), (p1, e1)], vec![p0]),
        ("an epoch from the future", vec![(p1, e1 + 5)], vec![p1]),
        ("both stale", vec![(p0, old0), (p1, e1 - 1)], vec![p0, p1]),
    ];
    for (what, partitions, expected) in attempts {
        let object_key = unique("wal");
        let commit = wal_commit(
            &object_key,
            partitions
                .into_iter()
                .map(|(k, epoch)| {
                    part_commit(k, epoch, range(0, 4, &object_key), vec![producer(11, 3, 3)])
                })
                .collect(),
        );
        assert_fenced(store.commit_wal(&commit).await, &expected, what);
        assert!(
            !unreferenced(store).await.contains(&object_key),
            "{what}: a fenced commit must not remember its object"
        );
    }

    // The current epochs still work after the failed attempts, from offset 0.
    let object_key = unique("wal");
    store
        .commit_wal(&wal_commit(
            &object_key,
            vec![part_commit(p1, e1, range(0, 1, &object_key), vec![])],
        ))
        .await
        .expect("commit with the current epoch");

    let s0 = claim(store, p0).await;
    assert_eq!(
        (s0.high_watermark, s0.wal_ranges.len(), s0.producers.len()),
        (0, 0, 0),
        "nothing of the fenced commits reached partition 0"
    );
    let s1 = claim(store, p1).await;
    assert_eq!(s1.high_watermark, 1);
    assert_eq!(s1.wal_ranges, vec![range(0, 1, &object_key)]);
    assert!(
        s1.producers.is_empty(),
        "no producer state from the fenced commits"
    );
}

/// Several objects in one commit (the flusher's group commit): every range in order,
/// the high watermark at the last one's end, every object remembered; a stale epoch in
/// any of them applies nothing of any.
pub(crate) async fn check_several_objects_commit_together(store: &dyn MetadataStore) {
    let topic = new_topic(store, 2).await;
    let (p0, p1) = (key(&topic, 0), key(&topic, 1));
    let e0 = claim(store, p0).await.leader_epoch;
    let e1 = claim(store, p1).await.leader_epoch;
    let (a, b) = (unique("wal"), unique("wal"));
    let [first] = wal_commit(
        &a,
        vec![
            part_commit(p0, e0, range(0, 3, &a), vec![producer(7, 2, 2)]),
            part_commit(p1, e1, range(0, 1, &a), vec![]),
        ],
    );
    let [second] = wal_commit(
        &b,
        vec![part_commit(
            p0,
            e0,
            range(3, 8, &b),
            vec![producer(7, 7, 5)],
        )],
    );
    store
        .commit_wal(&[first, second])
        .await
        .expect("two objects at once");
    let s0 = claim(store, p0).await;
    assert_eq!(s0.high_watermark, 8);
    assert_eq!(s0.wal_ranges, vec![range(0, 3, &a), range(3, 8, &b)]);
    assert_eq!(
        s0.producers,
        vec![producer(7, 7, 5)],
        "the later state wins"
    );
    let e0 = s0.leader_epoch;
    let s1 = claim(store, p1).await;
    assert_eq!(s1.high_watermark, 1);
    let e1 = s1.leader_epoch;
    let garbage = unreferenced(store).await;
    assert!(!garbage.contains(&a) && !garbage.contains(&b));

    // The second object is stale for p1: neither applies.
    let (c, d) = (unique("wal"), unique("wal"));
    let [third] = wal_commit(&c, vec![part_commit(p0, e0, range(8, 9, &c), vec![])]);
    let [fourth] = wal_commit(&d, vec![part_commit(p1, e1 - 1, range(1, 2, &d), vec![])]);
    assert_fenced(
        store.commit_wal(&[third, fourth]).await,
        &[p1],
        "a stale epoch in the second object",
    );
    let s0 = claim(store, p0).await;
    assert_eq!(
        (s0.high_watermark, s0.wal_ranges.len()),
        (8, 2),
        "nothing of the fenced commit reached partition 0"
    );
    let garbage = unreferenced(store).await;
    assert!(!garbage.contains(&c) && !garbage.contains(&d));
}

/// A sealed segment replaces the write-ahead ranges it covers.
pub(crate) async fn check_commit_segment_drops_covered_ranges(store: &dyn MetadataStore) {
    let topic = new_topic(store, 1).await;
    let p = key(&topic, 0);
    let epoch = claim(store, p).await.leader_epoch;
    let o1 = commit_one(store, p, epoch, 0, 10).await;
    let o2 = commit_one(store, p, epoch, 10, 20).await;
    let o3 = commit_one(store, p, epoch, 20, 30).await;

    let first = segment(0, 20);
    store
        .commit_segment(p, epoch, &first)
        .await
        .expect("commit segment");
    let garbage = unreferenced(store).await;
    assert!(garbage.contains(&o1) && garbage.contains(&o2));
    assert!(!garbage.contains(&o3));

    // A range reaching past the segment's end is kept.
    let second = segment(20, 25);
    store
        .commit_segment(p, epoch, &second)
        .await
        .expect("commit segment");

    let stale = store.commit_segment(p, epoch - 1, &segment(30, 40)).await;
    assert_fenced(stale, &[p], "segment from a stale epoch");
    let missing = PartitionKey {
        topic_id: crate::clock::unique_id(),
        partition: 0,
    };
    assert_partition_not_found(
        store.commit_segment(missing, 1, &segment(0, 1)).await,
        "segment of an unknown partition",
    );

    let state = claim(store, p).await;
    assert_eq!(state.segments, vec![first, second]);
    assert_eq!(state.wal_ranges, vec![range(20, 30, &o3)]);
    assert_eq!(
        state.high_watermark, 30,
        "segments do not move the watermark"
    );
}

/// Trimming raises the log start offset (never lowers it) and forgets segments.
/// Compaction's swap: the replaced segments go and the new ones take their offsets (a
/// base offset may be reused), in one fenced transaction; segments outside the swap
/// stay; the compaction time is stored.
pub(crate) async fn check_replace_segments(store: &dyn MetadataStore) {
    let topic = new_topic(store, 1).await;
    let p = key(&topic, 0);
    let epoch = claim(store, p).await.leader_epoch;
    let (s1, s2, s3) = (segment(0, 10), segment(10, 20), segment(20, 30));
    for s in [&s1, &s2, &s3] {
        store.commit_segment(p, epoch, s).await.expect("segment");
    }
    let compacted = SegmentRecord {
        compacted_ms: 1_700_000_001_000,
        ..segment(0, 20)
    };
    assert_fenced(
        store
            .replace_segments(p, epoch + 1, &[0, 10], std::slice::from_ref(&compacted))
            .await,
        &[p],
        "a swap at a wrong epoch",
    );
    assert_eq!(
        store.read_partition(p).await.expect("read").segments,
        vec![s1.clone(), s2.clone(), s3.clone()],
        "a fenced swap changes nothing"
    );
    store
        .replace_segments(p, epoch, &[0, 10], std::slice::from_ref(&compacted))
        .await
        .expect("swap");
    assert_eq!(
        store.read_partition(p).await.expect("read").segments,
        vec![compacted.clone(), s3.clone()]
    );
    // Compacted again: the same base offset, a new object.
    let again = SegmentRecord {
        compacted_ms: 1_700_000_002_000,
        ..segment(0, 30)
    };
    store
        .replace_segments(p, epoch, &[0, 20], std::slice::from_ref(&again))
        .await
        .expect("second swap");
    let state = claim(store, p).await;
    assert_eq!(state.segments, vec![again.clone()]);
    assert_eq!(state.segments[0].compacted_ms, 1_700_000_002_000);

    // A trim the owner never heard of dropped what a pass read: its swap, wholly
    // below the new log start, is refused and changes nothing.
    let epoch = state.leader_epoch;
    let s4 = segment(30, 40);
    store.commit_segment(p, epoch, &s4).await.expect("segment");
    store.trim_log(p, epoch, 30, &[0]).await.expect("trim");
    let late = SegmentRecord {
        compacted_ms: 1_700_000_003_000,
        ..segment(0, 30)
    };
    let refused = store
        .replace_segments(p, epoch, &[0], std::slice::from_ref(&late))
        .await;
    assert!(
        matches!(refused, Err(MetaError::Conflict(_))),
        "a swap below the log start: {refused:?}"
    );
    assert_eq!(
        store.read_partition(p).await.expect("read").segments,
        vec![s4]
    );
}

pub(crate) async fn check_trim_log(store: &dyn MetadataStore) {
    let topic = new_topic(store, 1).await;
    let p = key(&topic, 0);
    let epoch = claim(store, p).await.leader_epoch;
    let (s1, s2, s3) = (segment(0, 10), segment(10, 20), segment(20, 30));
    for s in [&s1, &s2, &s3] {
        store.commit_segment(p, epoch, s).await.expect("segment");
    }

    store
        .trim_log(p, epoch, 10, &[0])
        .await
        .expect("trim to 10");
    store
        .trim_log(p, epoch, 5, &[])
        .await
        .expect("a lower start is a no-op");
    store
        .trim_log(p, epoch, 0, &[999])
        .await
        .expect("dropping an unknown segment is harmless");
    assert_fenced(
        store.trim_log(p, epoch + 1, 30, &[10, 20]).await,
        &[p],
        "trim with a wrong epoch",
    );
    assert_partition_not_found(
        store
            .trim_log(
                PartitionKey {
                    topic_id: crate::clock::unique_id(),
                    partition: 0,
                },
                1,
                1,
                &[],
            )
            .await,
        "trim an unknown partition",
    );

    let state = claim(store, p).await;
    assert_eq!(state.log_start_offset, 10);
    assert_eq!(state.segments, vec![s2, s3.clone()]);

    store
        .trim_log(p, state.leader_epoch, 20, &[10])
        .await
        .expect("trim by the new owner");
    let state = claim(store, p).await;
    assert_eq!(state.log_start_offset, 20);
    assert_eq!(state.segments, vec![s3]);
}

/// Objects become garbage when no range references them, and are forgotten on request.
pub(crate) async fn check_wal_object_gc(store: &dyn MetadataStore) {
    let topic = new_topic(store, 1).await;
    let p = key(&topic, 0);
    let epoch = claim(store, p).await.leader_epoch;

    let referenced = commit_one(store, p, epoch, 0, 10).await;
    // Written, then every partition in it was fenced and dropped from the retry.
    let empty = unique("wal");
    store
        .commit_wal(&wal_commit(&empty, vec![]))
        .await
        .expect("commit without partitions");

    let garbage = unreferenced(store).await;
    assert!(
        garbage.contains(&empty),
        "an object with no ranges is garbage"
    );
    assert!(!garbage.contains(&referenced));

    store
        .commit_segment(p, epoch, &segment(0, 10))
        .await
        .expect("segment covering the object");
    assert!(unreferenced(store).await.contains(&referenced));

    store
        .forget_wal_objects(&[referenced.clone(), empty.clone(), unique("never-written")])
        .await
        .expect("forget objects");
    let garbage = unreferenced(store).await;
    assert!(!garbage.contains(&referenced) && !garbage.contains(&empty));
    store.forget_wal_objects(&[]).await.expect("forget nothing");
}

/// Every segment and write-ahead object the store references or remembers is known;
/// forgotten write-ahead objects and dropped segments are not.
pub(crate) async fn check_known_objects(store: &dyn MetadataStore) {
    let topic = new_topic(store, 1).await;
    let p = key(&topic, 0);
    let epoch = claim(store, p).await.leader_epoch;
    let wal = commit_one(store, p, epoch, 0, 10).await;
    let seg = segment(0, 10);
    store
        .commit_segment(p, epoch, &seg)
        .await
        .expect("segment covering the object");
    let known = store.known_objects().await.expect("known objects");
    assert!(
        known.contains(&wal),
        "a remembered write-ahead object is known"
    );
    assert!(known.contains(&seg.object_key), "a segment object is known");

    store
        .forget_wal_objects(std::slice::from_ref(&wal))
        .await
        .expect("forget");
    store.trim_log(p, epoch, 10, &[0]).await.expect("trim");
    let known = store.known_objects().await.expect("known objects");
    assert!(
        !known.contains(&wal),
        "a forgotten write-ahead object is not known"
    );
    assert!(
        !known.contains(&seg.object_key),
        "a dropped segment is not known"
    );
}

/// Brokers register with a lease, renew it, and stop being live when it expires or
/// they deregister; a newer session supersedes an older one of the same id.
pub(crate) async fn check_broker_membership(store: &dyn MetadataStore) {
    // Ids far from other checks' so a shared store does not mix them up.
    let id = 7_000_000 + (crate::clock::unique_id().as_u128() % 1_000_000) as i32;
    let record = |session: i64, expires: i64, zone: Option<&str>| BrokerRecord {
        broker_id: id,
        session,
        host: "10.0.0.1".to_owned(),
        port: 9092,
        zone: zone.map(str::to_owned),
        lease_expires_ms: expires,
        draining: false,
    };
    let live = |brokers: Vec<BrokerRecord>| -> Vec<BrokerRecord> {
        brokers.into_iter().filter(|b| b.broker_id == id).collect()
    };
    assert!(live(store.live_brokers(0).await.expect("live")).is_empty());
    store
        .heartbeat_broker(&record(1, 1_000, Some("az-1")))
        .await
        .expect("register");
    assert_eq!(
        live(store.live_brokers(999).await.expect("live")),
        vec![record(1, 1_000, Some("az-1"))]
    );
    assert!(
        live(store.live_brokers(1_000).await.expect("live")).is_empty(),
        "a lease is live strictly before its expiry"
    );
    // Renewal moves the expiry (and may change address and zone).
    store
        .heartbeat_broker(&record(1, 2_000, None))
        .await
        .expect("renew");
    assert_eq!(
        live(store.live_brokers(1_500).await.expect("live")),
        vec![record(1, 2_000, None)]
    );
    // A draining broker stays live and says so.
    let draining = BrokerRecord {
        draining: true,
        ..record(1, 2_000, None)
    };
    store.heartbeat_broker(&draining).await.expect("drain");
    assert_eq!(
        live(store.live_brokers(1_500).await.expect("live")),
        vec![draining]
    );
    store
        .heartbeat_broker(&record(1, 2_000, None))
        .await
        .expect("undrain");
    // A restarted broker (newer session) takes over; the old one is refused.
    store
        .heartbeat_broker(&record(2, 3_000, Some("az-2")))
        .await
        .expect("newer session");
    let stale = store.heartbeat_broker(&record(1, 9_000, None)).await;
    assert!(matches!(stale, Err(MetaError::Superseded)), "{stale:?}");
    assert_eq!(
        live(store.live_brokers(2_500).await.expect("live")),
        vec![record(2, 3_000, Some("az-2"))]
    );
    // Deregistering an old session does nothing; the current one leaves at once.
    store
        .deregister_broker(id, 1)
        .await
        .expect("deregister stale");
    assert_eq!(live(store.live_brokers(0).await.expect("live")).len(), 1);
    store.deregister_broker(id, 2).await.expect("deregister");
    assert!(live(store.live_brokers(0).await.expect("live")).is_empty());
}

// ---------------------------------------------------------------------------------
// Allocation
// ---------------------------------------------------------------------------------

/// Producer ids are positive, strictly increasing and unique, also when allocated
/// concurrently.
pub(crate) async fn check_producer_ids(store: &dyn MetadataStore) {
    let mut previous = 0;
    for _ in 0..20 {
        let id = store.next_producer_id().await.expect("producer id");
        assert!(id > previous, "producer id {id} after {previous}");
        previous = id;
    }

    let allocate = |n: usize| async move {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(store.next_producer_id().await.expect("producer id"));
        }
        ids
    };
    let (a, b, c, d) = tokio::join!(allocate(25), allocate(25), allocate(25), allocate(25));
    let mut all: Vec<i64> = [a, b, c, d].concat();
    assert!(all.iter().all(|&id| id > previous), "ids never go back");
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 100, "concurrent allocations never share an id");
}

/// Broker sessions increase per broker, independently of other brokers.
pub(crate) async fn check_broker_sessions(store: &dyn MetadataStore) {
    // Broker ids unlikely to be used by another check on a shared store.
    let seed = crate::clock::unique_id().as_u128();
    let broker = i32::try_from(seed % 1_000_000).expect("fits") + 1_000;
    let other = broker + 1_000_000;

    let mut previous = 0;
    for _ in 0..5 {
        let session = store
            .start_broker_session(broker)
            .await
            .expect("start session");
        assert!(session > previous, "session {session} after {previous}");
        previous = session;
    }
    let first_other = store
        .start_broker_session(other)
        .await
        .expect("start session of another broker");
    assert!(first_other >= 1);
    let next = store
        .start_broker_session(broker)
        .await
        .expect("start session");
    assert!(next > previous, "other brokers do not reset the counter");
}

/// Hundreds of partitions in one write-ahead commit apply together.
pub(crate) async fn check_large_commit(store: &dyn MetadataStore) {
    const PARTITIONS: i32 = 500;
    let topic = new_topic(store, PARTITIONS).await;
    let mut epochs = Vec::with_capacity(PARTITIONS as usize);
    for partition in 0..PARTITIONS {
        epochs.push(claim(store, key(&topic, partition)).await.leader_epoch);
    }

    for (round, base) in [(0_i64, 0_i64), (1, 10)] {
        let object_key = unique("wal");
        let partitions = (0..PARTITIONS)
            .zip(&epochs)
            .map(|(partition, &epoch)| {
                part_commit(
                    key(&topic, partition),
                    epoch,
                    range(base, base + 10, &object_key),
                    vec![producer(
                        100 + i64::from(partition),
                        i32::try_from(round).expect("small"),
                        base + 9,
                    )],
                )
            })
            .collect();
        store
            .commit_wal(&wal_commit(&object_key, partitions))
            .await
            .expect("large commit");
    }

    for partition in [0, PARTITIONS / 2, PARTITIONS - 1] {
        let state = claim(store, key(&topic, partition)).await;
        assert_eq!(state.high_watermark, 20);
        assert_eq!(state.wal_ranges.len(), 2);
        assert_eq!(
            state.producers,
            vec![producer(100 + i64::from(partition), 1, 19)]
        );
    }
}

// ---------------------------------------------------------------------------------
// Consumer group offsets
// ---------------------------------------------------------------------------------

/// Committed offsets read back field for field, sorted by topic (bytewise) and then
/// partition (numerically), whatever the commit order.
pub(crate) async fn check_offset_commit_and_fetch(store: &dyn MetadataStore) {
    let group = unique("group");
    let base = unique("offsets");
    // Bytewise, "B" sorts before "a"; partition 10 sorts after 2 (numerically).
    let (upper, lower) = (format!("{base}-B"), format!("{base}-a"));
    let offsets = vec![
        CommittedOffset {
            topic: lower.clone(),
            partition: 10,
            offset: 1 << 40,
            leader_epoch: -1,
            metadata: String::new(),
            commit_timestamp_ms: 1_700_000_000_000,
        },
        CommittedOffset {
            topic: upper.clone(),
            partition: 3,
            offset: 0,
            leader_epoch: 7,
            metadata: "ünïcode \u{1f600} 'quoted'".to_owned(),
            commit_timestamp_ms: 1_700_000_000_001,
        },
        CommittedOffset {
            topic: lower.clone(),
            partition: 2,
            offset: 42,
            leader_epoch: i32::MAX,
            metadata: "m".repeat(4096),
            commit_timestamp_ms: i64::MAX,
        },
        committed(&upper, 0, 5, 1),
        committed(&lower, 0, 9, 2),
    ];
    commit_offsets(store, &group, &offsets).await;

    let fetched = fetch_offsets(store, &group).await;
    assert_eq!(
        fetched,
        sorted_offsets(&offsets),
        "every field read back, sorted by topic then partition"
    );
    let order: Vec<(&str, i32)> = fetched
        .iter()
        .map(|o| (o.topic.as_str(), o.partition))
        .collect();
    assert_eq!(
        order,
        vec![
            (upper.as_str(), 0),
            (upper.as_str(), 3),
            (lower.as_str(), 0),
            (lower.as_str(), 2),
            (lower.as_str(), 10),
        ],
        "topics bytewise, partitions numerically"
    );

    assert!(
        fetch_offsets(store, &unique("group")).await.is_empty(),
        "a group that never committed has no offsets"
    );
}

/// A new commit of a partition replaces the stored one entirely, even with a lower
/// offset (the store does not judge), and leaves the group's other partitions alone.
pub(crate) async fn check_offset_overwrite(store: &dyn MetadataStore) {
    let group = unique("group");
    let topic = unique("offsets");
    let first = CommittedOffset {
        topic: topic.clone(),
        partition: 0,
        offset: 100,
        leader_epoch: 3,
        metadata: "first".to_owned(),
        commit_timestamp_ms: 1_000,
    };
    let other = committed(&topic, 1, 7, 1_000);
    commit_offsets(store, &group, &[first.clone(), other.clone()]).await;

    let higher = CommittedOffset {
        offset: 150,
        leader_epoch: 4,
        metadata: "higher".to_owned(),
        commit_timestamp_ms: 2_000,
        ..first.clone()
    };
    commit_offsets(store, &group, std::slice::from_ref(&higher)).await;
    assert_eq!(
        fetch_offsets(store, &group).await,
        vec![higher, other.clone()],
        "a commit replaces every field of the partition's offset"
    );

    let lower = CommittedOffset {
        offset: 50,
        leader_epoch: -1,
        metadata: String::new(),
        commit_timestamp_ms: 3_000,
        ..first
    };
    commit_offsets(store, &group, std::slice::from_ref(&lower)).await;
    assert_eq!(
        fetch_offsets(store, &group).await,
        vec![lower, other],
        "a lower offset replaces a higher one: the store does not judge"
    );
}

/// Groups never see or change each other's offsets, also for the same partitions and
/// for names that are prefixes of each other.
pub(crate) async fn check_offset_groups_isolated(store: &dyn MetadataStore) {
    let a = unique("group");
    let b = format!("{a}-b");
    let topic = unique("offsets");
    let a_offsets = vec![committed(&topic, 0, 10, 1), committed(&topic, 1, 11, 1)];
    let b_offsets = vec![committed(&topic, 0, 20, 2)];
    commit_offsets(store, &a, &a_offsets).await;
    commit_offsets(store, &b, &b_offsets).await;
    assert_eq!(fetch_offsets(store, &a).await, a_offsets);
    assert_eq!(fetch_offsets(store, &b).await, b_offsets);

    let b_new = vec![committed(&topic, 0, 25, 3), committed(&topic, 1, 26, 3)];
    commit_offsets(store, &b, &b_new).await;
    assert_eq!(
        fetch_offsets(store, &a).await,
        a_offsets,
        "another group's commit of the same partitions changes nothing here"
    );

    let deleted = store
        .delete_offsets(&a, Some(&[(topic.clone(), 0)]), None)
        .await
        .expect("delete one offset");
    assert_eq!(deleted, 1);
    assert_eq!(
        fetch_offsets(store, &b).await,
        b_new,
        "deleting one group's partition leaves other groups"
    );
    let deleted = store
        .delete_offsets(&a, None, None)
        .await
        .expect("delete all");
    assert_eq!(deleted, 1);
    assert_eq!(
        fetch_offsets(store, &b).await,
        b_new,
        "deleting a group leaves other groups"
    );
    assert_eq!(
        store
            .expire_offsets(std::slice::from_ref(&a), i64::MAX, None)
            .await
            .expect("expire"),
        0
    );
    assert_eq!(fetch_offsets(store, &b).await, b_new, "expiry is per group");
}

/// Deleting the listed partitions or all of a group's offsets, with exact counts.
pub(crate) async fn check_offset_delete(store: &dyn MetadataStore) {
    let group = unique("group");
    let other_group = unique("group");
    let base = unique("offsets");
    let (t1, t2) = (format!("{base}-1"), format!("{base}-2"));
    let offsets = vec![
        committed(&t1, 0, 1, 1),
        committed(&t1, 1, 2, 1),
        committed(&t1, 2, 3, 1),
        committed(&t2, 0, 4, 1),
        committed(&t2, 1, 5, 1),
    ];
    commit_offsets(store, &group, &offsets).await;
    commit_offsets(store, &other_group, &offsets).await;

    let deleted = store
        .delete_offsets(
            &group,
            Some(&[
                (t1.clone(), 0),
                (t2.clone(), 1),
                (t2.clone(), 9),        // never committed
                (unique("offsets"), 0), // unknown topic
                (t1.clone(), 0),        // listed twice
            ]),
            None,
        )
        .await
        .expect("delete some offsets");
    assert_eq!(deleted, 2, "only offsets that existed are counted");
    assert_eq!(
        fetch_offsets(store, &group).await,
        vec![offsets[1].clone(), offsets[2].clone(), offsets[3].clone()],
        "exactly the listed partitions are gone"
    );
    assert_eq!(
        fetch_offsets(store, &other_group).await,
        offsets,
        "the same partitions of another group stay"
    );

    let deleted = store
        .delete_offsets(&group, Some(&[]), None)
        .await
        .expect("delete an empty list");
    assert_eq!(deleted, 0);
    assert_eq!(fetch_offsets(store, &group).await.len(), 3);

    let deleted = store
        .delete_offsets(&group, None, None)
        .await
        .expect("delete all offsets");
    assert_eq!(deleted, 3, "deleting all counts every remaining offset");
    assert!(fetch_offsets(store, &group).await.is_empty());
    let deleted = store
        .delete_offsets(&group, None, None)
        .await
        .expect("delete all again");
    assert_eq!(deleted, 0, "nothing left to delete");
    assert_eq!(
        store
            .delete_offsets(&unique("group"), None, None)
            .await
            .expect("delete an unknown group"),
        0
    );
    assert_eq!(fetch_offsets(store, &other_group).await, offsets);
}

/// `offset_groups` lists exactly the groups that have offsets, once each, sorted.
pub(crate) async fn check_offset_groups_listed(store: &dyn MetadataStore) {
    let prefix = unique("group");
    let topic = unique("offsets");
    let (a, b, c, empty) = (
        format!("{prefix}-a"),
        format!("{prefix}-b"),
        format!("{prefix}-c"),
        format!("{prefix}-empty"),
    );
    // Committed out of name order, several offsets per group.
    commit_offsets(store, &c, &[committed(&topic, 0, 1, 1)]).await;
    commit_offsets(
        store,
        &a,
        &[committed(&topic, 0, 1, 1), committed(&topic, 1, 1, 1)],
    )
    .await;
    commit_offsets(store, &b, &[committed(&topic, 0, 1, 1)]).await;
    commit_offsets(store, &b, &[committed(&topic, 5, 1, 1)]).await;
    commit_offsets(store, &empty, &[]).await;
    assert!(
        fetch_offsets(store, &empty).await.is_empty(),
        "committing nothing stores nothing"
    );

    assert_eq!(
        offset_groups_with(store, &prefix).await,
        vec![a.clone(), b.clone(), c.clone()],
        "each group with offsets once, sorted; no group for an empty commit"
    );
    let all = store.offset_groups().await.expect("list offset groups");
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "the whole list is sorted without duplicates"
    );

    store
        .delete_offsets(&b, None, None)
        .await
        .expect("delete group b");
    store
        .delete_offsets(&a, Some(&[(topic.clone(), 0)]), None)
        .await
        .expect("delete one of group a's offsets");
    assert_eq!(
        offset_groups_with(store, &prefix).await,
        vec![a.clone(), c.clone()],
        "a group without offsets is no longer listed"
    );
    store
        .expire_offsets(std::slice::from_ref(&c), i64::MAX, None)
        .await
        .expect("expire group c");
    assert_eq!(offset_groups_with(store, &prefix).await, vec![a]);
}

/// Expiry deletes the listed groups' offsets committed strictly before the cutoff,
/// and nothing of other groups.
pub(crate) async fn check_offset_expiry(store: &dyn MetadataStore) {
    let (a, b, unlisted) = (unique("group"), unique("group"), unique("group"));
    let topic = unique("offsets");
    let a_offsets = vec![
        committed(&topic, 0, 10, 100),
        committed(&topic, 1, 11, 200),
        committed(&topic, 2, 12, 300),
    ];
    let b_offsets = vec![committed(&topic, 0, 20, 100), committed(&topic, 1, 21, 300)];
    let unlisted_offsets = vec![committed(&topic, 0, 30, 100)];
    commit_offsets(store, &a, &a_offsets).await;
    commit_offsets(store, &b, &b_offsets).await;
    commit_offsets(store, &unlisted, &unlisted_offsets).await;

    let expired = store
        .expire_offsets(&[a.clone(), b.clone(), unique("group")], 200, None)
        .await
        .expect("expire before 200");
    assert_eq!(
        expired, 2,
        "one offset of each listed group is older than 200"
    );
    assert_eq!(
        fetch_offsets(store, &a).await,
        a_offsets[1..].to_vec(),
        "an offset committed exactly at the cutoff stays"
    );
    assert_eq!(fetch_offsets(store, &b).await, b_offsets[1..].to_vec());
    assert_eq!(
        fetch_offsets(store, &unlisted).await,
        unlisted_offsets,
        "groups that are not listed are never expired"
    );

    assert_eq!(
        store
            .expire_offsets(&[], i64::MAX, None)
            .await
            .expect("expire no groups"),
        0
    );
    assert_eq!(
        store
            .expire_offsets(std::slice::from_ref(&a), 200, None)
            .await
            .expect("expire again"),
        0,
        "nothing older is left"
    );

    // A later commit renews the timestamp, so the offset survives a later cutoff.
    let renewed = committed(&topic, 1, 11, 1_000);
    commit_offsets(store, &a, std::slice::from_ref(&renewed)).await;
    let expired = store
        .expire_offsets(std::slice::from_ref(&a), 500, None)
        .await
        .expect("expire before 500");
    assert_eq!(
        expired, 1,
        "only the offset committed at 300 is older than 500"
    );
    assert_eq!(fetch_offsets(store, &a).await, vec![renewed]);
    assert_eq!(fetch_offsets(store, &unlisted).await, unlisted_offsets);
}

/// Offsets are keyed by topic name and independent of the store's topics: they may
/// name a topic that does not exist, and deleting a topic leaves them.
pub(crate) async fn check_offsets_independent_of_topics(store: &dyn MetadataStore) {
    let group = unique("group");
    let topic = new_topic(store, 2).await;
    let offsets = vec![
        committed(&topic.name, 0, 3, 1),
        committed(&topic.name, 1, 4, 1),
        committed(&topic.name, 7, 5, 1), // past the partition count
        committed(&unique("missing"), 0, 6, 1), // no such topic
    ];
    commit_offsets(store, &group, &offsets).await;
    assert_eq!(fetch_offsets(store, &group).await, sorted_offsets(&offsets));

    store.delete_topic(&topic.name).await.expect("delete topic");
    assert_eq!(
        fetch_offsets(store, &group).await,
        sorted_offsets(&offsets),
        "deleting a topic leaves its committed offsets (the broker removes them)"
    );
    assert!(offset_groups_with(store, &group).await.contains(&group));

    let recreated = TopicRecord {
        id: crate::clock::unique_id(),
        ..topic
    };
    store.create_topic(&recreated).await.expect("re-create");
    assert_eq!(
        fetch_offsets(store, &group).await,
        sorted_offsets(&offsets),
        "creating a topic does not touch offsets either"
    );
}

/// A thousand partitions commit and read back in one call each, and overwrite as a whole.
pub(crate) async fn check_large_offset_commit(store: &dyn MetadataStore) {
    const TOPICS: usize = 4;
    const PARTITIONS_PER_TOPIC: i32 = 250;
    let group = unique("group");
    let topics: Vec<String> = (0..TOPICS).map(|_| unique("offsets")).collect();
    let make = |round: i64| {
        let mut offsets: Vec<CommittedOffset> = topics
            .iter()
            .flat_map(|topic| {
                (0..PARTITIONS_PER_TOPIC).map(move |partition| {
                    committed(
                        topic,
                        partition,
                        round * 1_000_000 + i64::from(partition),
                        1_700_000_000_000 + round,
                    )
                })
            })
            .collect();
        // Committed in no particular order.
        offsets.reverse();
        let third = offsets.len() / 3;
        offsets.rotate_left(third);
        offsets
    };

    let first = make(1);
    assert_eq!(first.len(), 1000);
    commit_offsets(store, &group, &first).await;
    assert_eq!(
        fetch_offsets(store, &group).await,
        sorted_offsets(&first),
        "all 1000 offsets round trip, sorted"
    );

    let second = make(2);
    commit_offsets(store, &group, &second).await;
    assert_eq!(
        fetch_offsets(store, &group).await,
        sorted_offsets(&second),
        "a second large commit replaces every offset"
    );

    assert_eq!(
        store
            .delete_offsets(&group, None, None)
            .await
            .expect("delete all"),
        1000
    );
}

/// Owners are listed with their epochs; a release clears the owner only under the
/// current epoch, and the next claim still raises the epoch.
pub(crate) async fn check_release_and_owners(store: &dyn MetadataStore) {
    let topic = new_topic(store, 2).await;
    let owner_of = |owners: &[PartitionOwner], k: PartitionKey| {
        owners
            .iter()
            .find(|o| o.key == k)
            .copied()
            .expect("partition listed")
    };
    let owners = store.partition_owners().await.expect("owners");
    assert_eq!(
        owner_of(&owners, key(&topic, 0)),
        PartitionOwner {
            key: key(&topic, 0),
            leader_epoch: 0,
            owner: None
        }
    );
    let first = store
        .claim_partition(key(&topic, 0), 7)
        .await
        .expect("claim");
    let owners = store.partition_owners().await.expect("owners");
    assert_eq!(owner_of(&owners, key(&topic, 0)).owner, Some(7));
    assert_eq!(
        owner_of(&owners, key(&topic, 0)).leader_epoch,
        first.leader_epoch
    );
    assert_eq!(owner_of(&owners, key(&topic, 1)).owner, None);
    // A newer claim fences the release of the older epoch.
    let second = store
        .claim_partition(key(&topic, 0), 8)
        .await
        .expect("claim");
    assert!(matches!(
        store
            .release_partition(key(&topic, 0), first.leader_epoch)
            .await,
        Err(MetaError::Fenced(_))
    ));
    assert_eq!(
        owner_of(
            &store.partition_owners().await.expect("owners"),
            key(&topic, 0)
        )
        .owner,
        Some(8)
    );
    store
        .release_partition(key(&topic, 0), second.leader_epoch)
        .await
        .expect("release");
    let released = owner_of(
        &store.partition_owners().await.expect("owners"),
        key(&topic, 0),
    );
    assert_eq!(released.owner, None);
    assert_eq!(released.leader_epoch, second.leader_epoch);
    let third = store
        .claim_partition(key(&topic, 0), 9)
        .await
        .expect("claim");
    assert_eq!(third.leader_epoch, second.leader_epoch + 1);
    assert!(matches!(
        store.release_partition(key(&topic, 9), 0).await,
        Err(MetaError::PartitionNotFound)
    ));
}

/// A topic whose partition 0 stands in for a coordinator slot, a group, the slot, and
/// a lease (fence) on it at broker 1.
async fn leased_group(store: &dyn MetadataStore) -> (TopicRecord, String, PartitionKey, Fence) {
    let topic = new_topic(store, 1).await;
    let slot = key(&topic, 0);
    let lease = store.claim_partition(slot, 1).await.expect("claim");
    let fence = Fence {
        key: slot,
        leader_epoch: lease.leader_epoch,
    };
    (topic, unique("group"), slot, fence)
}

/// An offset commit under a fence is stored only while the fence's epoch is current.
pub(crate) async fn check_fenced_offset_commit(store: &dyn MetadataStore) {
    let (topic, group, slot, fence) = leased_group(store).await;
    let first = [committed(&topic.name, 0, 10, 1)];
    store
        .commit_offsets(&group, &first, Some(fence))
        .await
        .expect("commit under the current lease");
    store.claim_partition(slot, 2).await.expect("claim again");
    let stale = [committed(&topic.name, 0, 3, 1)];
    assert!(matches!(
        store.commit_offsets(&group, &stale, Some(fence)).await,
        Err(MetaError::Fenced(_))
    ));
    assert_eq!(fetch_offsets(store, &group).await, first.to_vec());
}

/// Deleting and expiring offsets under a fence happen only while the fence's epoch is
/// current: a coordinator that lost the group's slot deletes nothing, even when there is
/// nothing to delete (the answer still says it was fenced).
pub(crate) async fn check_fenced_offset_delete_and_expiry(store: &dyn MetadataStore) {
    let (topic, group, slot, fence) = leased_group(store).await;
    let offsets = [
        committed(&topic.name, 0, 10, 1),
        committed(&topic.name, 1, 11, 1),
    ];
    commit_offsets(store, &group, &offsets).await;
    let one = [(topic.name.clone(), 0)];
    assert_eq!(
        store
            .delete_offsets(&group, Some(&one), Some(fence))
            .await
            .expect("delete under the current lease"),
        1
    );
    store.claim_partition(slot, 2).await.expect("claim again");
    assert!(matches!(
        store.delete_offsets(&group, None, Some(fence)).await,
        Err(MetaError::Fenced(_))
    ));
    assert!(matches!(
        store
            .expire_offsets(std::slice::from_ref(&group), i64::MAX, Some(fence))
            .await,
        Err(MetaError::Fenced(_))
    ));
    assert!(matches!(
        store
            .delete_offsets(&unique("group"), None, Some(fence))
            .await,
        Err(MetaError::Fenced(_))
    ));
    assert_eq!(
        fetch_offsets(store, &group).await,
        vec![offsets[1].clone()],
        "a fenced delete or expiry changes nothing"
    );
    let current = Fence {
        key: slot,
        leader_epoch: fence.leader_epoch + 1,
    };
    assert_eq!(
        store
            .expire_offsets(std::slice::from_ref(&group), i64::MAX, Some(current))
            .await
            .expect("expire under the new lease"),
        1
    );
}

// ---------------------------------------------------------------------------------
// Transactions
// ---------------------------------------------------------------------------------

fn txn_record(id: &str, producer_id: i64, state: TxnState, groups: &[&str]) -> TxnRecord {
    TxnRecord {
        transactional_id: id.to_owned(),
        producer_id,
        producer_epoch: 4,
        last_producer_epoch: 3,
        timeout_ms: 60_000,
        state,
        partitions: vec![("a".to_owned(), 0), ("b".to_owned(), 2)],
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        start_ms: 1_700_000_000_000,
        updated_ms: 1_700_000_000_500,
    }
}

async fn txns_with(store: &dyn MetadataStore, prefix: &str) -> Vec<TxnRecord> {
    let all = store.list_txns().await.expect("list transactions");
    all.into_iter()
        .filter(|t| t.transactional_id.starts_with(prefix))
        .collect()
}

/// Transactional ids' records are stored whole, replaced, listed by id and deleted,
/// each only under the coordinator's current lease.
pub(crate) async fn check_txn_records(store: &dyn MetadataStore) {
    let (_, _, slot, fence) = leased_group(store).await;
    let prefix = unique("txn");
    let (a, b) = (format!("{prefix}-a"), format!("{prefix}-b"));
    let rb = txn_record(&b, 7, TxnState::Empty, &[]);
    let ra = txn_record(&a, 8, TxnState::Ongoing, &["g"]);
    store.put_txn(&rb, fence).await.expect("put b");
    store.put_txn(&ra, fence).await.expect("put a");
    assert_eq!(
        txns_with(store, &prefix).await,
        vec![ra.clone(), rb.clone()]
    );

    let ra2 = TxnRecord {
        state: TxnState::PrepareCommit,
        producer_epoch: 5,
        ..ra.clone()
    };
    store.put_txn(&ra2, fence).await.expect("replace a");
    assert_eq!(
        txns_with(store, &prefix).await,
        vec![ra2.clone(), rb.clone()]
    );

    store.claim_partition(slot, 2).await.expect("claim again");
    assert!(matches!(
        store.put_txn(&ra, fence).await,
        Err(MetaError::Fenced(_))
    ));
    assert!(matches!(
        store.delete_txn(&b, fence).await,
        Err(MetaError::Fenced(_))
    ));
    assert_eq!(
        txns_with(store, &prefix).await,
        vec![ra2.clone(), rb],
        "a fenced write changes nothing"
    );
    let current = Fence {
        key: slot,
        leader_epoch: fence.leader_epoch + 1,
    };
    store.delete_txn(&b, current).await.expect("delete b");
    store
        .delete_txn(&unique("txn"), current)
        .await
        .expect("deleting an unknown id is harmless");
    assert_eq!(txns_with(store, &prefix).await, vec![ra2]);
}

/// Offsets committed in a transaction stay pending (invisible to `fetch_offsets`) until
/// the transaction's record completes: a commit moves the producer's pending offsets of
/// each of its groups into the committed ones, an abort discards them; another
/// producer's pending offsets stay.
pub(crate) async fn check_txn_offsets_settle(store: &dyn MetadataStore) {
    let (topic, group, _, fence) = leased_group(store).await;
    let t = &topic.name;
    let plain = [committed(t, 0, 5, 1), committed(t, 1, 6, 1)];
    commit_offsets(store, &group, &plain).await;
    let pending = |producer_id, partition, offset| TxnOffsetRecord {
        producer_id,
        offset: committed(t, partition, offset, 2),
    };
    let (p1, p2) = (100, 200);
    store
        .commit_txn_offsets(
            &group,
            &[pending(p2, 0, 40), pending(p1, 0, 20)],
            Some(fence),
        )
        .await
        .expect("pending offsets");
    store
        .commit_txn_offsets(
            &group,
            &[pending(p1, 0, 21), pending(p1, 2, 30)],
            Some(fence),
        )
        .await
        .expect("a later commit of the same producer replaces its own");
    assert_eq!(
        store.pending_txn_offsets(&group).await.expect("pending"),
        vec![pending(p1, 0, 21), pending(p2, 0, 40), pending(p1, 2, 30)]
    );
    assert_eq!(fetch_offsets(store, &group).await, plain.to_vec());

    let id = unique("txn");
    let mut record = txn_record(&id, p1, TxnState::PrepareCommit, &[&group]);
    store.put_txn(&record, fence).await.expect("prepare");
    assert_eq!(
        fetch_offsets(store, &group).await,
        plain.to_vec(),
        "a prepared transaction settles nothing"
    );
    record.state = TxnState::CompleteCommit;
    store.put_txn(&record, fence).await.expect("complete");
    assert_eq!(
        fetch_offsets(store, &group).await,
        vec![
            committed(t, 0, 21, 2),
            plain[1].clone(),
            committed(t, 2, 30, 2)
        ]
    );
    assert_eq!(
        store.pending_txn_offsets(&group).await.expect("pending"),
        vec![pending(p2, 0, 40)]
    );

    let other = txn_record(&unique("txn"), p2, TxnState::CompleteAbort, &[&group]);
    store.put_txn(&other, fence).await.expect("abort");
    assert_eq!(
        store.pending_txn_offsets(&group).await.expect("pending"),
        vec![]
    );
    assert_eq!(
        fetch_offsets(store, &group).await[0],
        committed(t, 0, 21, 2)
    );
    assert!(matches!(
        store
            .commit_txn_offsets(
                &group,
                &[pending(p1, 0, 1)],
                Some(Fence {
                    leader_epoch: fence.leader_epoch - 1,
                    ..fence
                })
            )
            .await,
        Err(MetaError::Fenced(_))
    ));
}

/// Aborted transactions commit with their marker's range, come back with the
/// partition's state in marker order, and are forgotten by a trim past their marker.
pub(crate) async fn check_aborted_txns(store: &dyn MetadataStore) {
    let topic = new_topic(store, 1).await;
    let p = key(&topic, 0);
    let epoch = claim(store, p).await.leader_epoch;
    let first = AbortedTxnRecord {
        producer_id: 9,
        first_offset: 2,
        last_offset: 8,
    };
    let second = AbortedTxnRecord {
        producer_id: 10,
        first_offset: 5,
        last_offset: 12,
    };
    let object = unique("wal");
    let mut part = part_commit(p, epoch, range(0, 9, &object), vec![]);
    part.aborted = vec![first];
    let commit = wal_commit(&object, vec![part]);
    store.commit_wal(&commit).await.expect("commit");
    let object = unique("wal");
    let mut part = part_commit(p, epoch, range(9, 13, &object), vec![]);
    part.aborted = vec![second];
    store
        .commit_wal(&wal_commit(&object, vec![part]))
        .await
        .expect("commit");
    assert_eq!(
        store.read_partition(p).await.expect("read").aborted,
        vec![first, second]
    );
    let epoch = claim(store, p).await.leader_epoch;
    store.trim_log(p, epoch, 9, &[]).await.expect("trim");
    assert_eq!(claim(store, p).await.aborted, vec![second]);
}
