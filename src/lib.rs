//! Strata: a Kafka-compatible message broker whose log lives in object storage.
//!
//! The crate is laid out by what each part owns: [`server`] (listener and connections),
//! [`protocol`] (versions, framing, dispatch), [`handlers`] (one file per API family),
//! [`log`] (the partition owner task and reads), [`wal`] (the write-ahead flusher),
//! [`metadata`] (the metadata store trait and its backends), [`broker`] (the topic
//! registry that ties them together) and [`config`] (every setting).

pub mod broker;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod disk;
pub mod group;
pub mod groups_cli;
pub mod handlers;
pub mod health;
pub mod http;
pub mod log;
pub mod membership;
pub mod metadata;
pub mod metrics;
pub mod orphans;
pub mod ownership;
pub mod perf;
pub mod protocol;
pub mod registry;
pub mod server;
#[cfg(test)]
mod sim;
pub mod tasks;
pub mod wal;
