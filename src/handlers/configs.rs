//! DescribeConfigs, AlterConfigs and IncrementalAlterConfigs for topics (Kafka's topic
//! config names) and, read-only, for the broker.

use std::collections::BTreeMap;
use std::sync::Arc;

use kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse as IncrementalResult;
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
};
use kafka_protocol::ResponseError;

use super::{errors, str_bytes};
use crate::broker::{Broker, TopicError};
use crate::config::SETTINGS;

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const SOURCE_DYNAMIC_TOPIC: i8 = 1;
const SOURCE_STATIC_BROKER: i8 = 4;
const SOURCE_DEFAULT: i8 = 5;
const TYPE_STRING: i8 = 2;
const TYPE_LONG: i8 = 5;

/// Every topic-level setting with its effective value: (name, value, is_default).
pub(crate) fn topic_entries(
    broker: &Broker,
    overrides: &BTreeMap<String, String>,
) -> Vec<(String, String, bool)> {
    SETTINGS
        .iter()
        .filter(|d| d.topic)
        .map(|d| match overrides.get(d.name) {
            Some(v) => (d.name.to_string(), v.clone(), false),
            None => (
                d.name.to_string(),
                broker.config.values[d.name].clone(),
                true,
            ),
        })
        .collect()
}

fn config_type(value: &str) -> i8 {
    if value.parse::<i64>().is_ok() {
        TYPE_LONG
    } else {
        TYPE_STRING
    }
}

pub(crate) fn describe_configs(
    broker: &Arc<Broker>,
    req: DescribeConfigsRequest,
    version: i16,
) -> DescribeConfigsResponse {
    let mut resp = DescribeConfigsResponse::default();
    for res in req.resources {
        let mut result = DescribeConfigsResult::default()
            .with_resource_type(res.resource_type)
            .with_resource_name(res.resource_name.clone());
        let wanted = |name: &str| {
            res.configuration_keys
                .as_ref()
                .is_none_or(|keys| keys.is_empty() || keys.iter().any(|k| k.as_str() == name))
        };
        let entries: Vec<(String, String, i8, bool)> = match res.resource_type {
            RESOURCE_TOPIC => match broker.topic(res.resource_name.as_str()) {
                Some(t) => topic_entries(broker, &t.overrides)
                    .into_iter()
                    .map(|(n, v, is_default)| {
                        let source = if !is_default {
                            SOURCE_DYNAMIC_TOPIC
                        } else if broker.config.values[&n]
                            != crate::config::setting(&n).map_or("", |d| d.default)
                        {
                            SOURCE_STATIC_BROKER
                        } else {
                            SOURCE_DEFAULT
                        };
                        (n, v, source, false)
                    })
                    .collect(),
                None => {
                    resp.results.push(
                        result
                            .with_error_code(ResponseError::UnknownTopicOrPartition.code())
                            .with_error_message(Some(str_bytes("topic does not exist"))),
                    );
                    continue;
                }
            },
            RESOURCE_BROKER
                if res.resource_name.as_str() == broker.config.broker_id.to_string()
                    || res.resource_name.is_empty() =>
            {
                SETTINGS
                    .iter()
                    .map(|d| {
                        let v = broker.config.values[d.name].clone();
                        let source = if v == d.default {
                            SOURCE_DEFAULT
                        } else {
                            SOURCE_STATIC_BROKER
                        };
                        (d.name.to_string(), v, source, true)
                    })
                    .collect()
            }
            RESOURCE_BROKER => {
                resp.results.push(
                    result
                        .with_error_code(ResponseError::InvalidRequest.code())
                        .with_error_message(Some(str_bytes("unknown broker id"))),
                );
                continue;
            }
            _ => {
                resp.results.push(
                    result
                        .with_error_code(ResponseError::InvalidRequest.code())
                        .with_error_message(Some(str_bytes("unsupported resource type"))),
                );
                continue;
            }
        };
        result.configs = entries
            .into_iter()
            .filter(|(n, ..)| wanted(n))
            .map(|(name, value, source, read_only)| {
                let doc = crate::config::setting(&name).map(|d| d.doc).unwrap_or("");
                let mut c = DescribeConfigsResourceResult::default()
                    .with_name(str_bytes(name.clone()))
                    .with_value(Some(str_bytes(value.clone())))
                    .with_read_only(read_only)
                    .with_config_source(source)
                    .with_is_sensitive(false);
                if version >= 3 {
                    c = c.with_config_type(config_type(&value));
                    if req.include_documentation {
                        c = c.with_documentation(Some(str_bytes(doc)));
                    }
                }
                if req.include_synonyms {
                    c.synonyms = vec![DescribeConfigsSynonym::default()
                        .with_name(str_bytes(name))
                        .with_value(Some(str_bytes(value)))
                        .with_source(source)];
                }
                c
            })
            .collect();
        resp.results.push(result);
    }
    resp
}

fn alter_error(e: &TopicError) -> (i16, Option<kafka_protocol::protocol::StrBytes>) {
    (
        errors::topic_error(e).code(),
        Some(str_bytes(e.to_string())),
    )
}

pub(crate) async fn alter_configs(
    broker: &Arc<Broker>,
    req: AlterConfigsRequest,
) -> AlterConfigsResponse {
    let mut resp = AlterConfigsResponse::default();
    for res in req.resources {
        let mut out = AlterConfigsResourceResponse::default()
            .with_resource_type(res.resource_type)
            .with_resource_name(res.resource_name.clone());
        if res.resource_type != RESOURCE_TOPIC {
            out = out
                .with_error_code(ResponseError::InvalidRequest.code())
                .with_error_message(Some(str_bytes(
                    "broker settings are static: set them in the config file, environment or flags",
                )));
            resp.responses.push(out);
            continue;
        }
        // AlterConfigs replaces the whole set of overrides.
        let overrides: BTreeMap<String, String> = res
            .configs
            .iter()
            .filter_map(|c| {
                c.value
                    .as_ref()
                    .map(|v| (c.name.to_string(), v.to_string()))
            })
            .collect();
        if let Err(e) = broker
            .controller
            .set_topic_configs(res.resource_name.as_str(), overrides, req.validate_only)
            .await
        {
            let (code, msg) = alter_error(&e);
            out = out.with_error_code(code).with_error_message(msg);
        }
        resp.responses.push(out);
    }
    resp
}

pub(crate) async fn incremental_alter_configs(
    broker: &Arc<Broker>,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut resp = IncrementalAlterConfigsResponse::default();
    for res in req.resources {
        let mut out = IncrementalResult::default()
            .with_resource_type(res.resource_type)
            .with_resource_name(res.resource_name.clone());
        if res.resource_type != RESOURCE_TOPIC {
            out = out
                .with_error_code(ResponseError::InvalidRequest.code())
                .with_error_message(Some(str_bytes(
                    "broker settings are static: set them in the config file, environment or flags",
                )));
            resp.responses.push(out);
            continue;
        }
        let Some(topic) = broker.topic(res.resource_name.as_str()) else {
            out = out
                .with_error_code(ResponseError::UnknownTopicOrPartition.code())
                .with_error_message(Some(str_bytes("topic does not exist")));
            resp.responses.push(out);
            continue;
        };
        let mut overrides = topic.overrides.clone();
        let mut bad = None;
        for c in &res.configs {
            match (c.config_operation, &c.value) {
                (0, Some(v)) => {
                    overrides.insert(c.name.to_string(), v.to_string());
                }
                (1, _) => {
                    overrides.remove(c.name.as_str());
                }
                (0, None) => bad = Some(format!("{}: SET needs a value", c.name)),
                _ => {
                    bad = Some(format!(
                        "{}: APPEND and SUBTRACT apply only to list settings",
                        c.name
                    ))
                }
            }
        }
        let result = match bad {
            Some(msg) => Err((ResponseError::InvalidConfig.code(), Some(str_bytes(msg)))),
            None => broker
                .controller
                .set_topic_configs(res.resource_name.as_str(), overrides, req.validate_only)
                .await
                .map_err(|e| alter_error(&e)),
        };
        if let Err((code, msg)) = result {
            out = out.with_error_code(code).with_error_message(msg);
        }
        resp.responses.push(out);
    }
    resp
}
