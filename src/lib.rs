//! Strata: a Kafka-compatible message broker whose log lives in object storage.
//!
//! The crate is laid out by what each part owns (ARCHITECTURE.md has the table and
//! the layers): `server` (listener and connections), `protocol` (versions, framing,
//! codec), `handlers` (one file per API family), `controller` and `registry` (what
//! this broker serves), `log` (the partition owner and reads), `wal` (the write-ahead
//! flusher), `metadata` (the metadata store, its semantics and backends), `broker`
//! (the wiring of the components) and `config` (every setting). Only `cli`, the
//! command line the `strata` binary runs, is public: nothing outside the crate uses
//! the rest.

mod broker;
pub mod cli;
mod client;
mod clock;
mod cluster;
mod config;
mod controller;
mod disk;
mod group;
mod groups_cli;
mod handlers;
mod health;
mod http;
mod log;
mod markers;
mod membership;
mod metadata;
mod metrics;
mod orphans;
mod ownership;
mod perf;
mod protocol;
mod registry;
mod server;
#[cfg(test)]
mod sim;
mod tasks;
mod txn;
mod txn_cli;
mod wal;
