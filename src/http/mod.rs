//! The operator HTTP endpoint (`--http`): `/healthz` (the process is alive),
//! `/readyz` (the broker recovered its partitions, its metadata store answers, its cache
//! disk takes writes and it has not stepped down for lack of a store) and
//! `/metrics` (Prometheus text format, see `crate::metrics`), plus the cluster view
//! (`GET /cluster`) and drain (`POST /drain`) behind `strata cluster`. It starts before
//! recovery, so orchestrators see "alive, not ready" while a broker rebuilds its
//! partitions.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::broker::Broker;

mod scrape;

/// Filled in once the broker has started.
pub(crate) type BrokerSlot = Arc<OnceLock<Arc<Broker>>>;

/// How long a readiness probe waits for the metadata store.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) async fn serve(listener: TcpListener, slot: BrokerSlot) {
    info!(addr = ?listener.local_addr().ok(), "http endpoint ready");
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let slot = slot.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| route(req, slot.clone()));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "http connection ended");
            }
        });
    }
}

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// Why the broker should get no new clients now, if it should not.
async fn unready(broker: &Broker) -> Option<&'static str> {
    if !broker.log.disk.writable() {
        return Some("cache disk full: acks=1 produces are refused until it has room\n");
    }
    if let Some(reason) = broker.stepped_down() {
        return Some(reason);
    }
    match tokio::time::timeout(READY_PROBE_TIMEOUT, broker.meta.list_topics()).await {
        Ok(Ok(_)) => None,
        _ => Some("metadata store unreachable\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r
}

async fn route(
    req: Request<Incoming>,
    slot: BrokerSlot,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match slot.get() {
            None => text(StatusCode::SERVICE_UNAVAILABLE, "recovering partitions\n"),
            Some(broker) => match unready(broker).await {
                None => text(StatusCode::OK, "ready\n"),
                Some(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
            },
        },
        "/metrics" => match slot.get() {
            None => text(StatusCode::SERVICE_UNAVAILABLE, "recovering partitions\n"),
            Some(broker) => {
                let body = scrape::render(broker).await;
                let mut r = Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
        },
        "/cluster" => match slot.get() {
            None => text(StatusCode::SERVICE_UNAVAILABLE, "recovering partitions\n"),
            Some(broker) => json(&crate::cluster::view(broker)),
        },
        "/drain" if req.method() == hyper::Method::POST => match slot.get() {
            None => text(StatusCode::SERVICE_UNAVAILABLE, "recovering partitions\n"),
            Some(broker) => {
                broker.controller.hand_off().await;
                json(&serde_json::json!({
                    "broker": broker.config.broker_id,
                    "draining": true,
                    "partitions": broker.local_partition_count(),
                    "coordinator_slots": broker.ownership.held_slots().len(),
                }))
            }
        },
        "/drain" => text(StatusCode::METHOD_NOT_ALLOWED, "POST /drain\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /cluster\n",
        ),
    })
}
