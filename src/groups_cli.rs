//! `strata groups`: list, describe (with lag), reset offsets and delete consumer groups,
//! over the Kafka protocol like `kafka-consumer-groups.sh`, so it works against any
//! broker of the cluster (or any Kafka broker).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Buf;
use clap::{Arg, ArgAction, ArgGroup, ArgMatches, Command};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    BrokerId, ConsumerProtocolAssignment, DeleteGroupsRequest, DescribeGroupsRequest,
    FindCoordinatorRequest, GroupId, ListGroupsRequest, ListOffsetsRequest, MetadataRequest,
    OffsetCommitRequest, OffsetFetchRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use crate::client::Conn;

pub(crate) fn command() -> Command {
    let bootstrap = Arg::new("bootstrap")
        .long("bootstrap")
        .default_value("127.0.0.1:9092")
        .help("broker address");
    let group = Arg::new("group").required(true).help("group id");
    Command::new("groups")
        .about("list, describe, reset offsets of and delete consumer groups")
        .subcommand_required(true)
        .subcommand(Command::new("list").about("list groups and their states").arg(bootstrap.clone()))
        .subcommand(
            Command::new("describe")
                .about("committed offsets, log end offsets, lag and owners of a group's partitions")
                .arg(bootstrap.clone())
                .arg(group.clone()),
        )
        .subcommand(
            Command::new("reset-offsets")
                .about("move a group's committed offsets (the group must have no members); dry run unless --execute")
                .arg(bootstrap.clone())
                .arg(group.clone())
                .arg(Arg::new("topic").long("topic").required(true).help("topic whose partitions to reset"))
                .arg(Arg::new("to-earliest").long("to-earliest").action(ArgAction::SetTrue))
                .arg(Arg::new("to-latest").long("to-latest").action(ArgAction::SetTrue))
                .arg(Arg::new("to-datetime").long("to-datetime").value_name("YYYY-MM-DDTHH:MM:SS[.mmm]Z"))
                .arg(Arg::new("shift-by").long("shift-by").value_name("N").allow_negative_numbers(true).value_parser(clap::value_parser!(i64)))
                .group(ArgGroup::new("to").args(["to-earliest", "to-latest", "to-datetime", "shift-by"]).required(true))
                .arg(Arg::new("execute").long("execute").action(ArgAction::SetTrue).help("apply the plan (default: print it only)")),
        )
        .subcommand(Command::new("delete").about("delete a group without members and its offsets").arg(bootstrap).arg(group))
}

pub(crate) fn run(m: &ArgMatches) -> anyhow::Result<()> {
    run_subcommand(m, |name, sub, cluster| async move {
        let group = sub.get_one::<String>("group").cloned().unwrap_or_default();
        match name.as_str() {
            "list" => list(&cluster).await,
            "describe" => describe(&cluster, &group).await,
            "reset-offsets" => reset(&cluster, &group, &sub).await,
            "delete" => delete(&*cluster.coordinator(&group).await?, &group).await,
            other => bail!("unknown subcommand {other}"),
        }
    })
}

/// Runs an admin command's subcommand on a one-thread runtime, connected to the
/// cluster its `--bootstrap` names.
pub(crate) fn run_subcommand<F, Fut>(m: &ArgMatches, f: F) -> anyhow::Result<()>
where
    F: FnOnce(String, ArgMatches, Cluster) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (name, sub) = m.subcommand().context("a subcommand is required")?;
        let bootstrap = sub
            .get_one::<String>("bootstrap")
            .cloned()
            .unwrap_or_default();
        let cluster = Cluster::connect(&bootstrap).await?;
        f(name.to_owned(), sub.clone(), cluster).await
    })
}

/// The brokers of the cluster, reached through the bootstrap broker: group requests go
/// to the group's coordinator, ListOffsets to each partition's leader, ListGroups to
/// every broker.
pub(crate) struct Cluster {
    bootstrap: Arc<Conn>,
    conns: tokio::sync::Mutex<HashMap<String, Arc<Conn>>>,
}

impl Cluster {
    pub(crate) async fn connect(bootstrap: &str) -> anyhow::Result<Cluster> {
        Ok(Cluster {
            bootstrap: Arc::new(Conn::connect(bootstrap).await?),
            conns: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    pub(crate) async fn to(&self, addr: &str) -> anyhow::Result<Arc<Conn>> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(addr) {
            return Ok(c.clone());
        }
        let c = Arc::new(Conn::connect(addr).await?);
        conns.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Every broker's address, from Metadata.
    pub(crate) async fn brokers(&self) -> anyhow::Result<Vec<String>> {
        let md = self
            .bootstrap
            .call(&MetadataRequest::default().with_topics(Some(Vec::new())), 4)
            .await?;
        Ok(md
            .brokers
            .iter()
            .map(|b| format!("{}:{}", b.host.as_str(), b.port))
            .collect())
    }

    /// The connection to a group's coordinator (FindCoordinator).
    async fn coordinator(&self, group: &str) -> anyhow::Result<Arc<Conn>> {
        self.coordinator_of(group, 0).await
    }

    /// The connection to the coordinator of `key`: a group (key type 0) or a
    /// transactional id (1).
    pub(crate) async fn coordinator_of(
        &self,
        key: &str,
        key_type: i8,
    ) -> anyhow::Result<Arc<Conn>> {
        let req = FindCoordinatorRequest::default()
            .with_key(s(key))
            .with_key_type(key_type);
        let resp = self.bootstrap.call(&req, 3).await?;
        if resp.error_code != 0 {
            bail!(
                "FindCoordinator for {key} failed: {}",
                kafka_error(resp.error_code)
            );
        }
        self.to(&format!("{}:{}", resp.host.as_str(), resp.port))
            .await
    }

    /// Each partition's leader address, from Metadata.
    async fn leaders(
        &self,
        partitions: &[(String, i32)],
    ) -> anyhow::Result<BTreeMap<(String, i32), String>> {
        let mut topics: Vec<&str> = partitions.iter().map(|(t, _)| t.as_str()).collect();
        topics.dedup();
        crate::client::partition_leaders(&self.bootstrap, &topics).await
    }
}

pub(crate) fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

pub(crate) fn kafka_error(code: i16) -> String {
    kafka_protocol::ResponseError::try_from_code(code)
        .map_or_else(|| "NONE".into(), |e| format!("{e:?}"))
}

/// Every broker lists the groups it coordinates.
async fn list(cluster: &Cluster) -> anyhow::Result<()> {
    let mut groups = BTreeMap::new();
    for addr in cluster.brokers().await? {
        let resp = cluster
            .to(&addr)
            .await?
            .call(&ListGroupsRequest::default(), 4)
            .await?;
        if resp.error_code != 0 {
            bail!(
                "ListGroups on {addr} failed: {}",
                kafka_error(resp.error_code)
            );
        }
        for g in resp.groups {
            groups.insert(g.group_id.0.to_string(), g.group_state.to_string());
        }
    }
    println!("{:<40} {:<20}", "GROUP", "STATE");
    for (group, state) in groups {
        println!("{group:<40} {state:<20}");
    }
    Ok(())
}

/// Per partition: committed offset.
async fn committed(conn: &Conn, group: &str) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let resp = conn
        .call(
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(s(group)))
                .with_topics(None),
            7,
        )
        .await?;
    if resp.error_code != 0 {
        bail!("OffsetFetch failed: {}", kafka_error(resp.error_code));
    }
    let mut out = BTreeMap::new();
    for t in resp.topics {
        for p in t.partitions {
            if p.committed_offset >= 0 {
                out.insert(
                    (t.name.0.to_string(), p.partition_index),
                    p.committed_offset,
                );
            }
        }
    }
    Ok(out)
}

/// ListOffsets for the given partitions at `timestamp` (-1 latest, -2 earliest).
async fn offsets_at(
    cluster: &Cluster,
    partitions: &[(String, i32)],
    timestamp: i64,
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let leaders = cluster.leaders(partitions).await?;
    let mut by_leader: BTreeMap<&str, Vec<(String, i32)>> = BTreeMap::new();
    for tp in partitions {
        let leader = leaders
            .get(tp)
            .with_context(|| format!("{}-{} has no leader right now; retry", tp.0, tp.1))?;
        by_leader.entry(leader).or_default().push(tp.clone());
    }
    let mut out = BTreeMap::new();
    for (leader, partitions) in by_leader {
        let conn = cluster.to(leader).await?;
        out.extend(leader_offsets_at(&conn, &partitions, timestamp).await?);
    }
    Ok(out)
}

/// ListOffsets at one leader for partitions it leads.
async fn leader_offsets_at(
    conn: &Conn,
    partitions: &[(String, i32)],
    timestamp: i64,
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in partitions {
        by_topic.entry(t).or_default().push(*p);
    }
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(
            by_topic
                .into_iter()
                .map(|(t, ps)| {
                    ListOffsetsTopic::default()
                        .with_name(TopicName(s(t)))
                        .with_partitions(
                            ps.into_iter()
                                .map(|p| {
                                    ListOffsetsPartition::default()
                                        .with_partition_index(p)
                                        .with_timestamp(timestamp)
                                })
                                .collect(),
                        )
                })
                .collect(),
        );
    let resp = conn.call(&req, 5).await?;
    let mut out = BTreeMap::new();
    for t in resp.topics {
        for p in t.partitions {
            if p.error_code != 0 {
                bail!(
                    "ListOffsets {}-{}: {}",
                    t.name.0.as_str(),
                    p.partition_index,
                    kafka_error(p.error_code)
                );
            }
            out.insert((t.name.0.to_string(), p.partition_index), p.offset);
        }
    }
    Ok(out)
}

async fn describe(cluster: &Cluster, group: &str) -> anyhow::Result<()> {
    let conn = &*cluster.coordinator(group).await?;
    let resp = conn
        .call(
            &DescribeGroupsRequest::default().with_groups(vec![GroupId(s(group))]),
            5,
        )
        .await?;
    let g = resp
        .groups
        .into_iter()
        .next()
        .context("empty DescribeGroups response")?;
    if g.error_code != 0 {
        bail!("DescribeGroups failed: {}", kafka_error(g.error_code));
    }
    // Owner of each partition, from the members' assignments.
    let mut owners: BTreeMap<(String, i32), (String, String, String)> = BTreeMap::new();
    if g.protocol_type.as_str() == "consumer" {
        for m in &g.members {
            let mut buf = m.member_assignment.clone();
            if buf.remaining() < 2 {
                continue;
            }
            let version = buf.get_i16();
            if let Ok(a) = ConsumerProtocolAssignment::decode(&mut buf, version.clamp(0, 3)) {
                for tp in a.assigned_partitions {
                    for p in tp.partitions {
                        owners.insert(
                            (tp.topic.0.to_string(), p),
                            (
                                m.member_id.to_string(),
                                m.client_host.to_string(),
                                m.client_id.to_string(),
                            ),
                        );
                    }
                }
            }
        }
    }
    let committed = committed(conn, group).await?;
    let mut partitions: Vec<(String, i32)> =
        committed.keys().chain(owners.keys()).cloned().collect();
    partitions.sort();
    partitions.dedup();
    let ends = if partitions.is_empty() {
        BTreeMap::new()
    } else {
        offsets_at(cluster, &partitions, -1).await?
    };
    println!(
        "Group {group} is {} with {} member(s).",
        g.group_state.as_str(),
        g.members.len()
    );
    println!(
        "{:<24} {:<24} {:>9} {:>14} {:>14} {:>8} {:<40} {:<16} {:<20}",
        "GROUP",
        "TOPIC",
        "PARTITION",
        "CURRENT-OFFSET",
        "LOG-END-OFFSET",
        "LAG",
        "CONSUMER-ID",
        "HOST",
        "CLIENT-ID"
    );
    for tp in partitions {
        let current = committed.get(&tp).copied();
        let end = ends.get(&tp).copied().unwrap_or(-1);
        let lag = current.map(|c| (end - c).max(0));
        let (member, host, client) =
            owners
                .get(&tp)
                .cloned()
                .unwrap_or(("-".into(), "-".into(), "-".into()));
        println!(
            "{:<24} {:<24} {:>9} {:>14} {:>14} {:>8} {:<40} {:<16} {:<20}",
            group,
            tp.0,
            tp.1,
            current.map_or("-".into(), |c| c.to_string()),
            end,
            lag.map_or("-".into(), |l| l.to_string()),
            member,
            host,
            client
        );
    }
    Ok(())
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.mmm]Z` (UTC) into epoch milliseconds.
pub(crate) fn parse_datetime(text: &str) -> anyhow::Result<i64> {
    let bad = || anyhow::anyhow!("expected YYYY-MM-DDTHH:MM:SS[.mmm]Z, got {text:?}");
    let t = text.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = t.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let (hms, millis) = match time.split_once('.') {
        Some((hms, ms)) => (
            hms,
            format!("{ms:0<3}")[..3].parse::<i64>().map_err(|_| bad())?,
        ),
        None => (time, 0),
    };
    let h: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if d.len() != 3
        || h.len() != 3
        || !(1..=12).contains(&d[1])
        || !(1..=31).contains(&d[2])
        || h[0] > 23
        || h[1] > 59
        || h[2] > 60
    {
        return Err(bad());
    }
    // Days from the civil calendar (Howard Hinnant's algorithm).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Ok(((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000 + millis)
}

async fn reset(cluster: &Cluster, group: &str, m: &ArgMatches) -> anyhow::Result<()> {
    let conn = &*cluster.coordinator(group).await?;
    let topic = m.get_one::<String>("topic").cloned().unwrap_or_default();
    let md = cluster
        .bootstrap
        .call(
            &MetadataRequest::default().with_topics(Some(vec![
                kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
                    .with_name(Some(TopicName(s(&topic)))),
            ])),
            4,
        )
        .await?;
    let t = md
        .topics
        .into_iter()
        .next()
        .context("empty Metadata response")?;
    if t.error_code != 0 {
        bail!("topic {topic}: {}", kafka_error(t.error_code));
    }
    let partitions: Vec<(String, i32)> = t
        .partitions
        .iter()
        .map(|p| (topic.clone(), p.partition_index))
        .collect();
    let current = committed(conn, group).await?;
    let earliest = offsets_at(cluster, &partitions, -2).await?;
    let latest = offsets_at(cluster, &partitions, -1).await?;
    let target: BTreeMap<(String, i32), i64> = if m.get_flag("to-earliest") {
        earliest.clone()
    } else if m.get_flag("to-latest") {
        latest.clone()
    } else if let Some(dt) = m.get_one::<String>("to-datetime") {
        let ts = parse_datetime(dt)?;
        let found = offsets_at(cluster, &partitions, ts).await?;
        // No record at or after the time: the end of the log.
        found
            .into_iter()
            .map(|(k, v)| {
                let end = latest[&k];
                (k, if v < 0 { end } else { v })
            })
            .collect()
    } else {
        let by = *m
            .get_one::<i64>("shift-by")
            .context("--shift-by needs a number")?;
        partitions
            .iter()
            .map(|k| (k.clone(), current.get(k).copied().unwrap_or(latest[k]) + by))
            .collect()
    };
    // Clamp into the retained log, as Kafka does.
    let target: BTreeMap<(String, i32), i64> = target
        .into_iter()
        .map(|(k, v)| {
            let lo = earliest[&k];
            let hi = latest[&k];
            (k, v.clamp(lo, hi))
        })
        .collect();
    println!(
        "{:<24} {:<24} {:>9} {:>14}",
        "GROUP", "TOPIC", "PARTITION", "NEW-OFFSET"
    );
    for ((t, p), o) in &target {
        println!("{group:<24} {t:<24} {p:>9} {o:>14}");
    }
    if !m.get_flag("execute") {
        println!("(dry run: add --execute to apply)");
        return Ok(());
    }
    let req = OffsetCommitRequest::default()
        .with_group_id(GroupId(s(group)))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(vec![OffsetCommitRequestTopic::default()
            .with_name(TopicName(s(&topic)))
            .with_partitions(
                target
                    .iter()
                    .map(|((_, p), o)| {
                        OffsetCommitRequestPartition::default()
                            .with_partition_index(*p)
                            .with_committed_offset(*o)
                    })
                    .collect(),
            )]);
    let resp = conn.call(&req, 7).await?;
    for t in resp.topics {
        for p in t.partitions {
            if p.error_code != 0 {
                bail!(
                    "resetting {}-{} failed: {} (a group with members cannot be reset; stop its consumers first)",
                    t.name.0.as_str(),
                    p.partition_index,
                    kafka_error(p.error_code)
                );
            }
        }
    }
    println!("offsets reset");
    Ok(())
}

async fn delete(conn: &Conn, group: &str) -> anyhow::Result<()> {
    let resp = conn
        .call(
            &DeleteGroupsRequest::default().with_groups_names(vec![GroupId(s(group))]),
            2,
        )
        .await?;
    for r in resp.results {
        if r.error_code != 0 {
            bail!(
                "deleting {} failed: {}",
                r.group_id.0.as_str(),
                kafka_error(r.error_code)
            );
        }
    }
    println!("group {group} deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_datetime;

    #[test]
    fn datetimes_parse_to_epoch_millis() {
        assert_eq!(parse_datetime("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_datetime("2023-11-14T22:13:20Z").unwrap(),
            1_700_000_000_000
        );
        assert_eq!(
            parse_datetime("2000-02-29T12:00:00.5Z").unwrap(),
            951_825_600_500
        );
        assert!(parse_datetime("2023-13-01T00:00:00Z").is_err());
        assert!(parse_datetime("yesterday").is_err());
    }
}
