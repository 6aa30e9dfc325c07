//! The partition log: record-batch headers, the owner task of each partition, its local
//! segment files, idempotent-producer state, and reads of any retained offset.

pub mod batch;
pub mod local;
pub mod partition;
pub mod producer;
pub mod read;
