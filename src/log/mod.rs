//! The partition log: record-batch headers, the owner task of each partition, its local
//! segment files, idempotent-producer state, reads of any retained offset, and zone-local
//! reads of partitions other brokers own.

pub mod appender;
pub mod batch;
pub mod local;
pub mod partition;
pub mod producer;
pub mod read;
pub mod segments;
pub mod tail;
pub mod zone;
