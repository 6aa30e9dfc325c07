//! The Kafka listener: accepts connections (bounded by `max.connections`) and runs one
//! task per connection. Graceful shutdown: a broadcast tells every connection to stop.

pub(crate) mod connection;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::broker::Broker;

pub(crate) async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(broker.config.max_connections));
    let request_bytes = Arc::new(Semaphore::new(broker.config.queued_max_request_bytes));
    let metrics = crate::metrics::metrics();
    metrics
        .connections_max
        .set(broker.config.max_connections as i64);
    metrics
        .request_bytes_max
        .set(broker.config.queued_max_request_bytes as i64);
    info!(addr = %broker.config.listen, advertise = %broker.config.advertise, "kafka listener ready");
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                let broker = broker.clone();
                let request_bytes = request_bytes.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    connection::run(broker, socket, peer, request_bytes, shutdown).await;
                    drop(permit);
                });
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                crate::clock::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
