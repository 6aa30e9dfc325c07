//! A minimal pipelined Kafka client for the broker's own tools (`strata perf`,
//! `strata groups`): requests go out in order on one connection and responses are
//! matched to them in order. Encoding and decoding are the `kafka-protocol` crate's.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex};

/// Largest response frame the tools accept.
const MAX_RESPONSE_BYTES: usize = 256 << 20;

/// A pipelined client connection: requests go out in order, responses are matched FIFO.
pub(crate) struct Conn {
    tx: mpsc::Sender<(Bytes, Option<oneshot::Sender<Bytes>>)>,
    next_id: std::sync::atomic::AtomicI32,
}

impl Conn {
    pub(crate) async fn connect(addr: &str) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<(Bytes, Option<oneshot::Sender<Bytes>>)>(64);
        let waiting: Arc<Mutex<VecDeque<oneshot::Sender<Bytes>>>> = Arc::default();
        let w2 = waiting.clone();
        tokio::spawn(async move {
            while let Some((frame, reply)) = rx.recv().await {
                if let Some(r) = reply {
                    w2.lock().await.push_back(r);
                }
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            loop {
                let mut len = [0u8; 4];
                if rd.read_exact(&mut len).await.is_err() {
                    return;
                }
                let len = i32::from_be_bytes(len).max(0) as usize;
                if len > MAX_RESPONSE_BYTES {
                    return;
                }
                let mut buf = BytesMut::zeroed(len);
                if rd.read_exact(&mut buf).await.is_err() {
                    return;
                }
                if let Some(r) = waiting.lock().await.pop_front() {
                    let _ = r.send(buf.freeze());
                }
            }
        });
        Ok(Conn {
            tx,
            next_id: std::sync::atomic::AtomicI32::new(1),
        })
    }

    /// Sends a request; the returned receiver yields the response body.
    pub(crate) async fn send<R: Request>(
        &self,
        req: &R,
        version: i16,
        expect_response: bool,
    ) -> anyhow::Result<Option<oneshot::Receiver<Bytes>>> {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[0; 4]);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.next_id.fetch_add(1, Ordering::Relaxed))
            .with_client_id(Some(StrBytes::from_static_str("strata-perf")));
        header.encode(&mut buf, R::header_version(version))?;
        req.encode(&mut buf, version)?;
        let len = (buf.len() - 4) as i32;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        let (reply, rx) = if expect_response {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        self.tx
            .send((buf.freeze(), reply))
            .await
            .map_err(|_| anyhow::anyhow!("connection closed"))?;
        Ok(rx)
    }

    pub(crate) async fn call<R: Request>(
        &self,
        req: &R,
        version: i16,
    ) -> anyhow::Result<R::Response> {
        let rx = self
            .send(req, version, true)
            .await?
            .context("no response")?;
        decode_response::<R>(rx.await.context("connection closed")?, version)
    }
}

pub(crate) fn decode_response<R: Request>(
    mut body: Bytes,
    version: i16,
) -> anyhow::Result<R::Response> {
    ResponseHeader::decode(&mut body, R::Response::header_version(version))?;
    R::Response::decode(&mut body, version)
}

/// Each partition's leader address (`host:port`) from a Metadata request for `topics`;
/// partitions without a live leader are left out. The tools send each request to the
/// broker that serves it, so they work against a fleet.
pub(crate) async fn partition_leaders(
    conn: &Conn,
    topics: &[&str],
) -> anyhow::Result<std::collections::BTreeMap<(String, i32), String>> {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::{MetadataRequest, TopicName};
    let req = MetadataRequest::default().with_topics(Some(
        topics
            .iter()
            .map(|t| {
                MetadataRequestTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_string(t.to_string()))))
            })
            .collect(),
    ));
    let md = conn.call(&req, 4).await?;
    let addr: std::collections::BTreeMap<i32, String> = md
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
        .collect();
    let mut out = std::collections::BTreeMap::new();
    for t in md.topics {
        let name = t.name.map(|n| n.0.to_string()).unwrap_or_default();
        for p in t.partitions {
            if let Some(a) = addr.get(&p.leader_id.0) {
                out.insert((name.clone(), p.partition_index), a.clone());
            }
        }
    }
    Ok(out)
}
