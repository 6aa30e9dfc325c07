//! The topic registry: the cluster's topics as this broker knows them (a cache of the
//! metadata store's, re-read every ownership pass) and, per partition, the owner task
//! this broker runs for it, if any.
//!
//! Request handlers only read it; the controller task is its one writer, so a topic appears, grows, changes or goes in one place.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use kafka_protocol::ResponseError;
use tracing::warn;
use uuid::Uuid;

use crate::config::TopicConfig;
use crate::log::partition::{PartitionCmd, PartitionHandle};
use crate::metadata::{MetaError, PartitionKey};

/// One partition as this broker sees it: the owner task's handle while this broker
/// owns the partition, nothing otherwise.
#[derive(Debug, Default)]
pub(crate) struct PartitionSlot(RwLock<Option<PartitionHandle>>);

impl PartitionSlot {
    /// The local owner task, if any (serving, handing off, or fenced).
    pub(crate) fn get(&self) -> Option<PartitionHandle> {
        self.0.read().expect("partition slot lock poisoned").clone()
    }

    /// Replaces the task (the controller only).
    pub(crate) fn set(&self, handle: Option<PartitionHandle>) -> Option<PartitionHandle> {
        std::mem::replace(
            &mut *self.0.write().expect("partition slot lock poisoned"),
            handle,
        )
    }
}

/// A topic of the cluster; this broker serves the partitions whose slot holds a task.
#[derive(Debug)]
pub(crate) struct Topic {
    pub name: Arc<str>,
    pub id: Uuid,
    /// Topic-level overrides (Kafka names).
    pub overrides: BTreeMap<String, String>,
    pub config: TopicConfig,
    pub partitions: Vec<Arc<PartitionSlot>>,
}

impl Topic {
    pub(crate) fn partition_count(&self) -> i32 {
        self.partitions.len() as i32
    }

    pub(crate) fn key(&self, index: i32) -> PartitionKey {
        PartitionKey {
            topic_id: self.id,
            partition: index,
        }
    }

    /// The partition's owner task if this broker leads it now: UNKNOWN_TOPIC_OR_PARTITION
    /// for an index the topic lacks, NOT_LEADER_OR_FOLLOWER when another broker owns it
    /// (or this one is handing it off).
    pub(crate) fn partition(&self, index: i32) -> Result<PartitionHandle, ResponseError> {
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.partitions.get(i))
            .ok_or(ResponseError::UnknownTopicOrPartition)?;
        match slot.get() {
            Some(h) if h.shared.is_serving() => Ok(h),
            _ => Err(ResponseError::NotLeaderOrFollower),
        }
    }

    /// Every partition task this broker runs for the topic.
    pub(crate) fn local_partitions(&self) -> Vec<PartitionHandle> {
        self.partitions.iter().filter_map(|s| s.get()).collect()
    }
}

/// The partition of an optional topic (a missing topic is UNKNOWN_TOPIC_OR_PARTITION).
pub(crate) fn serve(
    topic: Option<&Arc<Topic>>,
    index: i32,
) -> Result<PartitionHandle, ResponseError> {
    topic
        .ok_or(ResponseError::UnknownTopicOrPartition)?
        .partition(index)
}

#[derive(Debug, Default)]
struct Maps {
    by_name: HashMap<Arc<str>, Arc<Topic>>,
    by_id: HashMap<Uuid, Arc<Topic>>,
}

/// The registry; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct TopicRegistry(RwLock<Maps>);

impl TopicRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        self.0.read().expect("registry lock poisoned")
    }

    pub(crate) fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.read().by_name.get(name).cloned()
    }

    pub(crate) fn topic_by_id(&self, id: &Uuid) -> Option<Arc<Topic>> {
        self.read().by_id.get(id).cloned()
    }

    /// Every topic, by name.
    pub(crate) fn topics(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<_> = self.read().by_name.values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Partition tasks this broker runs.
    pub(crate) fn local_partition_count(&self) -> usize {
        self.topics()
            .iter()
            .map(|t| t.local_partitions().len())
            .sum()
    }

    /// Adds or replaces a topic (the controller only).
    pub(crate) fn insert(&self, topic: Topic) {
        let topic = Arc::new(topic);
        let mut maps = self.0.write().expect("registry lock poisoned");
        maps.by_name.insert(topic.name.clone(), topic.clone());
        maps.by_id.insert(topic.id, topic);
    }

    /// Removes the topic with this id (and its name, if the name is still its own);
    /// returns it (the controller only).
    pub(crate) fn remove(&self, id: &Uuid) -> Option<Arc<Topic>> {
        let mut maps = self.0.write().expect("registry lock poisoned");
        let topic = maps.by_id.remove(id)?;
        if maps.by_name.get(&topic.name).is_some_and(|t| t.id == *id) {
            maps.by_name.remove(&topic.name);
        }
        Some(topic)
    }
}

/// Stops a partition task this broker no longer owns: it takes no more writes at once,
/// and the stop itself waits at most a few seconds for room in the task's queue.
pub(crate) async fn stop_task(h: &PartitionHandle) {
    h.shared
        .fenced
        .store(true, std::sync::atomic::Ordering::Release);
    let stop = h.cmd.send(PartitionCmd::Stop);
    if tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .is_err()
    {
        warn!(topic = %h.topic, partition = h.partition, "partition task did not take its stop in time; it takes no writes");
    }
}

/// Why a topic operation failed; the handlers map each to a Kafka error code.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TopicError {
    #[error("topic already exists")]
    Exists,
    #[error("topic does not exist")]
    NotFound,
    #[error(transparent)]
    InvalidConfig(#[from] crate::config::InvalidConfig),
    #[error("invalid topic: {0}")]
    InvalidTopic(String),
    #[error("invalid partition count: {0}")]
    InvalidPartitions(String),
    #[error("metadata store: {0}")]
    Meta(#[from] MetaError),
    #[error("{0}")]
    Internal(String),
}

/// Kafka's topic name rules: 1..=249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub(crate) fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > 249 || !ok_chars || name == "." || name == ".." {
        return Err(TopicError::InvalidTopic(format!(
            "topic name {name:?} must be 1 to 249 characters of [a-zA-Z0-9._-] and not '.' or '..'"
        )));
    }
    Ok(())
}
