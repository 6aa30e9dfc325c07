//! One client connection: size-prefixed frames in, responses out in request order.
//!
//! Requests are decoded and handled concurrently (clients pipeline up to
//! `max.in.flight.requests.per.connection`); a writer task sends the responses in the
//! order the requests arrived. Memory is bounded by the frame size limit, the number of
//! requests in flight per connection, and a broker-wide budget of request bytes. A
//! malformed or oversized frame closes the connection with a log line naming the peer.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, info, warn};

use crate::broker::Broker;
use crate::protocol::{self, Frame};

const PRODUCE: i16 = 0;

pub(crate) async fn run(
    broker: Arc<Broker>,
    socket: TcpStream,
    peer: SocketAddr,
    request_bytes: Arc<Semaphore>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    debug!(%peer, "connection opened");
    let metrics = crate::metrics::metrics();
    metrics.connections.inc();
    let (mut rd, mut wr) = socket.into_split();
    let max_inflight = broker.config.max_inflight_per_connection;
    let (tx, mut rx) = mpsc::channel::<oneshot::Receiver<Option<Bytes>>>(max_inflight);
    let writer = tokio::spawn(async move {
        while let Some(pending) = rx.recv().await {
            match pending.await {
                Ok(Some(frame)) => {
                    if let Err(e) = wr.write_all(&frame).await {
                        debug!(%peer, error = %e, "write failed");
                        return;
                    }
                }
                Ok(None) => {}
                // The handler decided to close the connection.
                Err(_) => return,
            }
        }
        let _ = wr.shutdown().await;
    });
    let max_frame = broker.config.request_max_bytes;
    let mut produce_chain: Option<oneshot::Receiver<()>> = None;
    let reason: String = loop {
        let mut len_buf = [0u8; 4];
        let read = tokio::select! {
            r = rd.read_exact(&mut len_buf) => r,
            _ = shutdown.changed() => break "broker shutting down".into(),
        };
        if let Err(e) = read {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                debug!(%peer, "connection closed by peer");
                break String::new();
            }
            break format!("read error: {e}");
        }
        let len = i32::from_be_bytes(len_buf);
        if len < 8 || len as usize > max_frame {
            break format!("frame length {len} outside 8..={max_frame} (socket.request.max.bytes)");
        }
        let len = len as usize;
        // The broker-wide request-bytes budget bounds memory across all connections.
        let permit = match request_bytes
            .clone()
            .acquire_many_owned(len.min(u32::MAX as usize) as u32)
            .await
        {
            Ok(p) => p,
            Err(_) => break "shutting down".into(),
        };
        let started = crate::clock::instant();
        metrics.request_bytes_in_flight.add(len as i64);
        // Read straight into uninitialised capacity, never past this frame.
        let mut buf = BytesMut::with_capacity(len);
        let read = {
            let mut body = (&mut rd).take(len as u64);
            loop {
                match body.read_buf(&mut buf).await {
                    Ok(0) => break Err(std::io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) if buf.len() == len => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            }
        };
        if let Err(e) = read {
            metrics.request_bytes_in_flight.sub(len as i64);
            break format!("truncated frame: {e}");
        }
        let frame = match Frame::parse(buf.freeze()) {
            Ok(f) => f,
            Err(e) => break format!("bad request: {e}"),
        };
        let (done_tx, done_rx) = oneshot::channel();
        if tx.send(done_rx).await.is_err() {
            break "writer stopped".into();
        }
        // Produce requests hand their batches to the partitions in request order (a
        // pipelining idempotent producer depends on it); the rest runs concurrently.
        let order = (frame.api_key == PRODUCE).then(|| {
            let (done, next) = oneshot::channel();
            protocol::ProduceOrder {
                after: produce_chain.replace(next),
                done,
            }
        });
        let ctx = protocol::RequestContext {
            peer,
            arrived: started,
            order,
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            let api_key = frame.api_key;
            let version = frame.api_version;
            let api = protocol::api_name(api_key);
            match crate::handlers::handle(&broker, ctx, frame).await {
                Ok(response) => {
                    metrics.requests.with_label_values(&[api]).inc();
                    metrics
                        .request_seconds
                        .with_label_values(&[api])
                        .observe(started.elapsed().as_secs_f64());
                    let _ = done_tx.send(response);
                }
                Err(e) => {
                    metrics.requests.with_label_values(&[api]).inc();
                    metrics
                        .request_seconds
                        .with_label_values(&[api])
                        .observe(started.elapsed().as_secs_f64());
                    warn!(%peer, api_key, version, error = %e, "closing connection: request could not be handled");
                    drop(done_tx);
                }
            }
            metrics.request_bytes_in_flight.sub(len as i64);
            drop(permit);
        });
    };
    if !reason.is_empty() {
        info!(%peer, reason = %reason, "closing connection");
    }
    drop(tx);
    let _ = writer.await;
    metrics.connections.dec();
}
