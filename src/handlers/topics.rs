//! CreateTopics, DeleteTopics and CreatePartitions.

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{
    CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, TopicName,
};
use kafka_protocol::ResponseError;
use uuid::Uuid;

use super::{errors, str_bytes};
use crate::broker::Broker;

pub(crate) async fn create_topics(
    broker: &Arc<Broker>,
    req: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let mut resp = CreateTopicsResponse::default();
    for t in req.topics {
        let name = t.name.0.to_string();
        let mut result = CreatableTopicResult::default().with_name(t.name.clone());
        let partitions = if t.num_partitions == -1 && !t.assignments.is_empty() {
            t.assignments.len() as i32
        } else {
            t.num_partitions
        };
        // Durability comes from object storage, so every replication factor is accepted
        // and the log is kept once.
        if t.replication_factor == 0 || t.replication_factor < -1 {
            resp.topics.push(
                result
                    .with_error_code(ResponseError::InvalidReplicationFactor.code())
                    .with_error_message(Some(str_bytes(
                        "replication factor must be -1 or at least 1",
                    ))),
            );
            continue;
        }
        let configs: BTreeMap<String, String> = t
            .configs
            .iter()
            .filter_map(|c| {
                c.value
                    .as_ref()
                    .map(|v| (c.name.to_string(), v.to_string()))
            })
            .collect();
        match broker
            .controller
            .create_topic(&name, partitions, configs, req.validate_only)
            .await
        {
            Ok(topic) => {
                result = result
                    .with_topic_id(if req.validate_only {
                        Uuid::nil()
                    } else {
                        topic.id
                    })
                    .with_num_partitions(if req.validate_only {
                        partitions.max(1)
                    } else {
                        topic.partitions.len() as i32
                    })
                    .with_replication_factor(1);
                if version >= 5 {
                    result.configs = Some(
                        super::configs::topic_entries(broker, &topic.overrides)
                            .into_iter()
                            .map(|(name, value, is_default)| {
                                CreatableTopicConfigs::default()
                                    .with_name(str_bytes(name))
                                    .with_value(Some(str_bytes(value)))
                                    .with_config_source(if is_default { 5 } else { 1 })
                            })
                            .collect(),
                    );
                }
            }
            Err(e) => {
                result = result
                    .with_error_code(errors::topic_error(&e).code())
                    .with_error_message(Some(str_bytes(e.to_string())))
                    .with_num_partitions(-1)
                    .with_replication_factor(-1);
            }
        }
        resp.topics.push(result);
    }
    resp
}

pub(crate) async fn delete_topics(
    broker: &Arc<Broker>,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let mut targets: Vec<(Option<String>, Uuid)> = req
        .topic_names
        .iter()
        .map(|n| (Some(n.0.to_string()), Uuid::nil()))
        .collect();
    if version >= 6 {
        targets = req
            .topics
            .iter()
            .map(|t| (t.name.as_ref().map(|n| n.0.to_string()), t.topic_id))
            .collect();
    }
    let mut resp = DeleteTopicsResponse::default();
    for (name, id) in targets {
        let resolved = match &name {
            Some(n) => Some(n.clone()),
            None => broker.topic_by_id(&id).map(|t| t.name.to_string()),
        };
        let mut result = DeletableTopicResult::default()
            .with_name(name.clone().map(|n| TopicName(str_bytes(n))))
            .with_topic_id(id);
        match resolved {
            None => {
                result = result.with_error_code(ResponseError::UnknownTopicId.code());
            }
            Some(n) => match broker.controller.delete_topic(&n).await {
                Ok(deleted) => {
                    result = result
                        .with_topic_id(deleted)
                        .with_name(Some(TopicName(str_bytes(n))));
                }
                Err(e) => {
                    result = result
                        .with_error_code(errors::topic_error(&e).code())
                        .with_error_message(Some(str_bytes(e.to_string())));
                }
            },
        }
        resp.responses.push(result);
    }
    resp
}

pub(crate) async fn create_partitions(
    broker: &Arc<Broker>,
    req: CreatePartitionsRequest,
) -> CreatePartitionsResponse {
    let mut resp = CreatePartitionsResponse::default();
    for t in req.topics {
        let mut result = CreatePartitionsTopicResult::default().with_name(t.name.clone());
        if let Err(e) = broker
            .controller
            .create_partitions(&t.name.0, t.count, req.validate_only)
            .await
        {
            result = result
                .with_error_code(errors::topic_error(&e).code())
                .with_error_message(Some(str_bytes(e.to_string())));
        }
        resp.results.push(result);
    }
    resp
}
