//! End-to-end use of the formats through an object store, the way the broker
//! reads them: write an object, fetch only its tail, decode, then read ranges.

use bytes::Bytes;
use tiering::{
    build_segment_object, build_wal_object, decode_wal_footer, segment_object_key, wal_object_key,
    BatchEntry, Class, Error, SegmentIndex, Store, StoreOptions, WalChunk, SEGMENT_FOOTER_LEN,
    WAL_TRAILER_LEN,
};

fn stores() -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = Store::open(
        &format!("file://{}", dir.path().display()),
        &StoreOptions::default(),
    )
    .expect("file");
    let memory = Store::open("memory://", &StoreOptions::default()).expect("memory");
    vec![(file, Some(dir)), (memory, None)]
}

/// Reads the tail a decoder needs: first a guess, then exactly what it asks for.
async fn read_tail<T>(
    store: &Store,
    key: &object_store::path::Path,
    size: u64,
    guess: u64,
    decode: impl Fn(&[u8]) -> Result<T, Error>,
) -> T {
    let tail = store
        .get_range(key, size - guess.min(size)..size, Class::Read, None)
        .await
        .expect("tail");
    match decode(&tail) {
        Ok(value) => value,
        Err(Error::Truncated { needed, .. }) => {
            let tail = store
                .get_range(key, size - needed..size, Class::Read, None)
                .await
                .expect("tail");
            decode(&tail).expect("decode after refetch")
        }
        Err(e) => panic!("decode failed: {e}"),
    }
}

#[tokio::test]
async fn wal_object_through_a_store() {
    for (store, _dir) in stores() {
        let chunks = vec![
            WalChunk {
                stream: "3f2a-uuid/0".into(),
                base_offset: 100,
                end_offset: 103,
                max_timestamp: 1_700_000_000_000,
                data: vec![Bytes::from(vec![1u8; 300]), Bytes::from(vec![2u8; 50])],
            },
            WalChunk {
                stream: "3f2a-uuid/1".into(),
                base_offset: 7,
                end_offset: 8,
                max_timestamp: 1_700_000_000_001,
                data: vec![Bytes::from(vec![3u8; 20])],
            },
        ];
        let (payload, locations) = build_wal_object(chunks);
        let key = wal_object_key(1, 2, 3);
        store.put_new(&key, payload, None).await.expect("put");
        let size = store.head(&key).await.expect("head").size;

        let decoded = read_tail(
            &store,
            &key,
            size,
            WAL_TRAILER_LEN as u64,
            decode_wal_footer,
        )
        .await;
        assert_eq!(decoded, locations);
        let first = store
            .get_range(&key, decoded[0].range(), Class::Read, None)
            .await
            .expect("chunk 0");
        assert_eq!(first.len(), 350);
        assert!(first[..300].iter().all(|&b| b == 1) && first[300..].iter().all(|&b| b == 2));
        let second = store
            .get_range(&key, decoded[1].range(), Class::Read, None)
            .await
            .expect("chunk 1");
        assert_eq!(&second[..], &[3u8; 20][..]);
    }
}

#[tokio::test]
async fn segment_object_through_a_store() {
    for (store, _dir) in stores() {
        // 50 batches of 100 bytes, two offsets each, timestamps rising by 10.
        let entries: Vec<BatchEntry> = (0..50)
            .map(|i| BatchEntry {
                base_offset: 1000 + 2 * i,
                last_offset: 1001 + 2 * i,
                max_timestamp: 10 * i,
                position: 100 * i as u64,
                len: 100,
            })
            .collect();
        let data: Vec<Bytes> = (0..50u8).map(|i| Bytes::from(vec![i; 100])).collect();
        let (payload, index) = build_segment_object(data, &entries, 1000);
        let key = segment_object_key("3f2a-uuid/0", 1000, 4);
        store.put_new(&key, payload, None).await.expect("put");
        let size = store.head(&key).await.expect("head").size;
        assert_eq!(size, index.data_len() + index.encoded_len());

        let decoded = read_tail(
            &store,
            &key,
            size,
            SEGMENT_FOOTER_LEN as u64,
            SegmentIndex::decode,
        )
        .await;
        assert_eq!(decoded, index);
        assert_eq!((decoded.base_offset(), decoded.end_offset()), (1000, 1100));
        assert_eq!(decoded.data_len(), 5000);

        // Offset 1057 is in batch 28 (position 2800); the index has every
        // 10th batch, so the scan starts at batch 20.
        let start = decoded.position_for_offset(1057);
        assert_eq!(start, 2000);
        let scanned = store
            .get_range(&key, start..decoded.data_len(), Class::Read, None)
            .await
            .expect("scan");
        assert_eq!(scanned[800], 28);

        // Timestamp 285 first reached by batch 29.
        assert_eq!(decoded.position_for_timestamp(285), Some(2000));
        assert_eq!(decoded.position_for_timestamp(491), None);
    }
}
