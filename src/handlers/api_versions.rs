//! ApiVersions: the versions of every API this broker implements (see
//! `protocol::SUPPORTED`).

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::ApiVersionsResponse;

use crate::protocol::{supported_range, SUPPORTED};

pub(crate) fn response() -> ApiVersionsResponse {
    let mut r = ApiVersionsResponse::default();
    r.api_keys = SUPPORTED
        .iter()
        .filter_map(|(k, ..)| {
            let (min, max) = supported_range(*k)?;
            Some(
                ApiVersion::default()
                    .with_api_key(*k as i16)
                    .with_min_version(min)
                    .with_max_version(max),
            )
        })
        .collect();
    r
}
