//! The one mapping from internal errors to Kafka error codes.

use kafka_protocol::ResponseError;

use crate::broker::TopicError;
use crate::log::batch::BatchError;
use crate::log::partition::{AppendError, DeleteRecordsError};
use crate::log::producer::{MarkerError, SeqError};
use crate::log::read::ReadError;
use crate::metadata::MetaError;

pub(crate) fn topic_error(e: &TopicError) -> ResponseError {
    match e {
        TopicError::Exists => ResponseError::TopicAlreadyExists,
        TopicError::NotFound => ResponseError::UnknownTopicOrPartition,
        TopicError::InvalidConfig(_) => ResponseError::InvalidConfig,
        TopicError::InvalidTopic(_) => ResponseError::InvalidTopicException,
        TopicError::InvalidPartitions(_) => ResponseError::InvalidPartitions,
        TopicError::Meta(m) => meta_error(m),
        TopicError::Internal(_) => ResponseError::UnknownServerError,
    }
}

pub(crate) fn meta_error(e: &MetaError) -> ResponseError {
    match e {
        MetaError::TopicExists => ResponseError::TopicAlreadyExists,
        MetaError::TopicNotFound | MetaError::PartitionNotFound => {
            ResponseError::UnknownTopicOrPartition
        }
        // Both mean another broker (or a newer incarnation of this one) is in charge.
        // The writer's view is stale: it steps down to read it again.
        MetaError::Fenced(_) | MetaError::Superseded | MetaError::Conflict(_) => {
            ResponseError::NotLeaderOrFollower
        }
        MetaError::Unavailable(_) => ResponseError::RequestTimedOut,
        MetaError::Corrupt(_) => ResponseError::UnknownServerError,
    }
}

pub(crate) fn batch_error(e: &BatchError) -> ResponseError {
    match e {
        BatchError::Corrupt | BatchError::CrcMismatch | BatchError::Empty => {
            ResponseError::CorruptMessage
        }
        BatchError::UnsupportedMagic(_) => ResponseError::UnsupportedForMessageFormat,
        BatchError::TooLarge(_) => ResponseError::MessageTooLarge,
    }
}

pub(crate) fn append_error(e: &AppendError) -> ResponseError {
    match e {
        AppendError::Sequence(SeqError::OutOfOrder) => ResponseError::OutOfOrderSequenceNumber,
        AppendError::Sequence(SeqError::InvalidEpoch) => ResponseError::InvalidProducerEpoch,
        AppendError::Sequence(SeqError::InvalidTxnState) => ResponseError::InvalidTxnState,
        AppendError::NotDurable | AppendError::DiskFull => ResponseError::KafkaStorageError,
        AppendError::NotLeader => ResponseError::NotLeaderOrFollower,
        AppendError::Marker(MarkerError::InvalidEpoch) => ResponseError::InvalidProducerEpoch,
        // Retriable: the producer sends again and is verified afresh (Kafka answers a
        // verification it could not finish the same way).
        AppendError::NotVerified => ResponseError::NotEnoughReplicas,
        AppendError::Marker(MarkerError::CoordinatorFenced) => {
            ResponseError::TransactionCoordinatorFenced
        }
    }
}

pub(crate) fn read_error(e: &ReadError) -> ResponseError {
    match e {
        ReadError::OffsetOutOfRange => ResponseError::OffsetOutOfRange,
        ReadError::Storage(_) => ResponseError::KafkaStorageError,
    }
}

pub(crate) fn zone_read_error(e: &crate::log::zone::ZoneReadError) -> ResponseError {
    match e {
        crate::log::zone::ZoneReadError::Read(e) => read_error(e),
        crate::log::zone::ZoneReadError::NotYetVisible => ResponseError::OffsetNotAvailable,
    }
}

pub(crate) fn delete_records_error(e: &DeleteRecordsError) -> ResponseError {
    match e {
        DeleteRecordsError::OffsetOutOfRange => ResponseError::OffsetOutOfRange,
        DeleteRecordsError::Unavailable => ResponseError::RequestTimedOut,
        DeleteRecordsError::NotLeader => ResponseError::NotLeaderOrFollower,
    }
}
