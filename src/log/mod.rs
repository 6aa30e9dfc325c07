//! The partition log: record-batch headers, the owner task of each partition, its local
//! segment files, idempotent-producer and transaction state, transaction markers, reads of any retained offset, and zone-local
//! reads of partitions other brokers own, and compaction of compacted topics.

pub(crate) mod appender;
pub(crate) mod batch;
pub(crate) mod codec;
pub(crate) mod compact;
pub(crate) mod local;
pub(crate) mod marker;
pub(crate) mod partition;
pub(crate) mod producer;
pub(crate) mod read;
pub(crate) mod records;
pub(crate) mod segments;
pub(crate) mod tail;
pub(crate) mod zone;
