//! The cluster view for operators: every broker with its zone, lease and what it owns,
//! served as JSON at `/cluster` on the HTTP endpoint, and `strata cluster`, the CLI
//! that prints it and drains a broker (`POST /drain`: the broker registers as draining,
//! hands every partition and coordinator slot off, and keeps taking none until it
//! restarts).
//!
//! The view is the answering broker's: the live list and owners it read at its last
//! ownership pass (at most `ownership.check.interval.ms` old).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Arg, ArgAction, ArgMatches, Command};
use serde::{Deserialize, Serialize};

use crate::broker::Broker;
use crate::clock::now_ms;

/// One broker as the cluster view shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BrokerView {
    pub id: i32,
    pub host: String,
    pub port: i32,
    pub zone: Option<String>,
    /// `false` for a broker that still owns partitions but whose lease expired.
    pub live: bool,
    pub draining: bool,
    /// Milliseconds until the lease expires (negative once expired).
    pub lease_ms_left: i64,
    /// `topic/partition@epoch`, sorted.
    pub partitions: Vec<String>,
    /// Coordinator slots held.
    pub coordinator_slots: Vec<i32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ClusterView {
    /// The broker that answered.
    pub answered_by: i32,
    pub brokers: Vec<BrokerView>,
    /// Partitions no broker owns right now (between a release and the next claim).
    pub unowned: Vec<String>,
}

/// Builds the view from this broker's membership and ownership caches.
pub(crate) fn view(broker: &Broker) -> ClusterView {
    let now = now_ms();
    let mut brokers: BTreeMap<i32, BrokerView> = broker
        .membership
        .live()
        .into_iter()
        .map(|b| {
            let lease_ms_left = if b.broker_id == broker.config.broker_id {
                broker.membership.lease().as_millis() as i64
            } else {
                b.lease_expires_ms - now
            };
            (
                b.broker_id,
                BrokerView {
                    id: b.broker_id,
                    host: b.host,
                    port: b.port,
                    zone: b.zone,
                    live: true,
                    draining: b.draining,
                    lease_ms_left,
                    partitions: Vec::new(),
                    coordinator_slots: Vec::new(),
                },
            )
        })
        .collect();
    let names: BTreeMap<uuid::Uuid, String> = broker
        .topics()
        .iter()
        .map(|t| (t.id, t.name.to_string()))
        .collect();
    let mut unowned = Vec::new();
    let mut owners: Vec<_> = broker.ownership.owners().into_values().collect();
    owners.sort_by_key(|o| (names.get(&o.key.topic_id).cloned(), o.key.partition));
    for o in owners {
        let slot = broker.ownership.is_slot(&o.key);
        let Some(name) = names.get(&o.key.topic_id).filter(|_| !slot) else {
            if slot {
                if let Some(id) = o.owner {
                    entry(&mut brokers, id)
                        .coordinator_slots
                        .push(o.key.partition);
                }
            }
            continue;
        };
        let label = format!("{name}/{}@{}", o.key.partition, o.leader_epoch);
        match o.owner {
            Some(id) => entry(&mut brokers, id).partitions.push(label),
            None => unowned.push(label),
        }
    }
    ClusterView {
        answered_by: broker.config.broker_id,
        brokers: brokers.into_values().collect(),
        unowned,
    }
}

/// A broker's entry, made (as not live) for an owner missing from the live list.
fn entry(brokers: &mut BTreeMap<i32, BrokerView>, id: i32) -> &mut BrokerView {
    brokers.entry(id).or_insert_with(|| BrokerView {
        id,
        host: String::new(),
        port: -1,
        zone: None,
        live: false,
        draining: false,
        lease_ms_left: 0,
        partitions: Vec::new(),
        coordinator_slots: Vec::new(),
    })
}

pub(crate) fn command() -> Command {
    let http = Arg::new("http")
        .long("http")
        .default_value("127.0.0.1:9644")
        .help("operator HTTP address (HOST:PORT) of any broker");
    Command::new("cluster")
        .about("show the brokers of the cluster and what each owns; drain a broker")
        .subcommand_required(true)
        .subcommand(
            Command::new("status")
                .about("brokers with zone, state, lease and owned partitions")
                .arg(http.clone())
                .arg(
                    Arg::new("partitions")
                        .long("partitions")
                        .action(ArgAction::SetTrue)
                        .help("list each broker's partitions (topic/partition@epoch)"),
                )
                .arg(
                    Arg::new("json")
                        .long("json")
                        .action(ArgAction::SetTrue)
                        .help("print the view as JSON"),
                ),
        )
        .subcommand(
            Command::new("drain")
                .about("move every partition and group off the broker at --http (it stays drained until restarted)")
                .arg(http),
        )
}

pub(crate) fn run(m: &ArgMatches) -> anyhow::Result<()> {
    match m.subcommand() {
        Some(("status", m)) => {
            let addr = m.get_one::<String>("http").expect("has a default");
            let body = http(addr, "GET", "/cluster")?;
            if m.get_flag("json") {
                println!("{body}");
                return Ok(());
            }
            let view: ClusterView = serde_json::from_str(&body).context("reading /cluster")?;
            print!("{}", render(&view, m.get_flag("partitions")));
            Ok(())
        }
        Some(("drain", m)) => {
            let addr = m.get_one::<String>("http").expect("has a default");
            let body = http(addr, "POST", "/drain")?;
            print!("{body}");
            Ok(())
        }
        _ => bail!("a subcommand is required"),
    }
}

/// The view as a table, brokers by id.
pub(crate) fn render(view: &ClusterView, partitions: bool) -> String {
    let mut out = format!(
        "{:<8} {:<22} {:<12} {:<9} {:>9} {:>10} {:>6}\n",
        "BROKER", "ADDRESS", "ZONE", "STATE", "LEASE", "PARTITIONS", "SLOTS"
    );
    for b in &view.brokers {
        let state = match (b.live, b.draining) {
            (false, _) => "expired",
            (true, true) => "draining",
            (true, false) => "live",
        };
        let address = if b.port < 0 {
            "-".to_owned()
        } else {
            format!("{}:{}", b.host, b.port)
        };
        out.push_str(&format!(
            "{:<8} {:<22} {:<12} {:<9} {:>8.1}s {:>10} {:>6}\n",
            b.id,
            address,
            b.zone.as_deref().unwrap_or("-"),
            state,
            b.lease_ms_left as f64 / 1000.0,
            b.partitions.len(),
            b.coordinator_slots.len()
        ));
        if partitions && !b.partitions.is_empty() {
            out.push_str(&format!("    {}\n", b.partitions.join(" ")));
        }
    }
    if !view.unowned.is_empty() {
        out.push_str(&format!("unowned: {}\n", view.unowned.join(" ")));
    }
    out
}

/// One HTTP/1.1 request with no body; returns the response body (error on non-2xx).
fn http(addr: &str, method: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)
        .with_context(|| format!("connecting to the broker's HTTP endpoint {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .take(64 << 20)
        .read_to_string(&mut response)
        .context("reading the answer")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("{method} {path} answered {status}: {}", body.trim());
    }
    Ok(body.to_owned())
}
