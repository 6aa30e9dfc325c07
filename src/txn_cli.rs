//! `strata transactions`: list, describe and abort transactions over the Kafka protocol,
//! like `kafka-transactions.sh`, so it works against any broker of the cluster.
//!
//! `abort` ends a hanging transaction the way a new instance of its producer would:
//! InitProducerId with the transactional id at its coordinator, which fences the
//! producer (a higher epoch) and aborts whatever it had open; the coordinator answers
//! CONCURRENT_TRANSACTIONS until the abort's markers are written, and the command waits.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Arg, ArgMatches, Command};
use kafka_protocol::messages::{
    DescribeTransactionsRequest, InitProducerIdRequest, ListTransactionsRequest, ProducerId,
    TransactionalId,
};
use kafka_protocol::ResponseError;

use crate::groups_cli::{kafka_error, run_subcommand, s, Cluster};

/// Key type of a transactional id in FindCoordinator.
const TRANSACTION: i8 = 1;
/// How long `abort` waits for the coordinator to finish the abort.
const ABORT_WAIT: Duration = Duration::from_secs(60);

pub(crate) fn command() -> Command {
    let bootstrap = Arg::new("bootstrap")
        .long("bootstrap")
        .default_value("127.0.0.1:9092")
        .help("broker address");
    let id = Arg::new("transactional-id")
        .long("transactional-id")
        .required(true)
        .help("the producer's transactional.id");
    Command::new("transactions")
        .about("list, describe and abort transactions")
        .subcommand_required(true)
        .subcommand(
            Command::new("list")
                .about("every transactional id, its producer and state")
                .arg(bootstrap.clone())
                .arg(
                    Arg::new("older-than-ms")
                        .long("older-than-ms")
                        .value_parser(clap::value_parser!(i64))
                        .help("only transactions open longer than this (hanging ones)"),
                ),
        )
        .subcommand(
            Command::new("describe")
                .about("a transaction's state, producer, timeout, age and partitions")
                .arg(bootstrap.clone())
                .arg(id.clone()),
        )
        .subcommand(
            Command::new("abort")
                .about("abort a transactional id's open transaction, fencing its producer")
                .arg(bootstrap)
                .arg(id),
        )
}

pub(crate) fn run(m: &ArgMatches) -> anyhow::Result<()> {
    run_subcommand(m, |name, sub, cluster| async move {
        let id = sub
            .get_one::<String>("transactional-id")
            .cloned()
            .unwrap_or_default();
        match name.as_str() {
            "list" => list(&cluster, sub.get_one::<i64>("older-than-ms").copied()).await,
            "describe" => describe(&cluster, &id).await,
            "abort" => abort(&cluster, &id).await,
            other => bail!("unknown subcommand {other}"),
        }
    })
}

/// Every broker lists the transactional ids it coordinates.
async fn list(cluster: &Cluster, older_than_ms: Option<i64>) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for addr in cluster.brokers().await? {
        let req =
            ListTransactionsRequest::default().with_duration_filter(older_than_ms.unwrap_or(-1));
        let resp = cluster.to(&addr).await?.call(&req, 1).await?;
        if resp.error_code != 0 {
            bail!(
                "ListTransactions on {addr} failed: {}",
                kafka_error(resp.error_code)
            );
        }
        for t in resp.transaction_states {
            rows.push((
                t.transactional_id.0.to_string(),
                t.producer_id.0,
                t.transaction_state.to_string(),
                addr.clone(),
            ));
        }
    }
    rows.sort();
    println!(
        "{:<40} {:>12} {:<15} COORDINATOR",
        "TRANSACTIONAL ID", "PRODUCER ID", "STATE"
    );
    for (id, pid, state, addr) in rows {
        println!("{id:<40} {pid:>12} {state:<15} {addr}");
    }
    Ok(())
}

async fn describe(cluster: &Cluster, id: &str) -> anyhow::Result<()> {
    let conn = cluster.coordinator_of(id, TRANSACTION).await?;
    let req =
        DescribeTransactionsRequest::default().with_transactional_ids(vec![TransactionalId(s(id))]);
    let resp = conn.call(&req, 0).await?;
    let t = resp
        .transaction_states
        .into_iter()
        .next()
        .context("no answer for the transactional id")?;
    if t.error_code != 0 {
        bail!(
            "DescribeTransactions for {id}: {}",
            kafka_error(t.error_code)
        );
    }
    println!("transactional id  {id}");
    println!("state             {}", t.transaction_state.as_str());
    println!(
        "producer          {} epoch {}",
        t.producer_id.0, t.producer_epoch
    );
    println!("timeout           {} ms", t.transaction_timeout_ms);
    if t.transaction_start_time_ms >= 0 {
        let age = crate::clock::now_ms() - t.transaction_start_time_ms;
        println!(
            "open for          {:.1} s (since {} ms)",
            age as f64 / 1000.0,
            t.transaction_start_time_ms
        );
    }
    for topic in t.topics {
        let parts: Vec<String> = topic.partitions.iter().map(i32::to_string).collect();
        println!(
            "partitions        {} [{}]",
            topic.topic.as_str(),
            parts.join(", ")
        );
    }
    Ok(())
}

async fn abort(cluster: &Cluster, id: &str) -> anyhow::Result<()> {
    let started = crate::clock::instant();
    loop {
        let conn = cluster.coordinator_of(id, TRANSACTION).await?;
        let req = InitProducerIdRequest::default()
            .with_transactional_id(Some(TransactionalId(s(id))))
            .with_transaction_timeout_ms(60_000)
            .with_producer_id(ProducerId(-1))
            .with_producer_epoch(-1);
        let resp = conn.call(&req, 4).await?;
        match ResponseError::try_from_code(resp.error_code) {
            None => {
                println!(
                    "{id}: no transaction open any more; its producer is fenced (producer {} now at epoch {})",
                    resp.producer_id.0, resp.producer_epoch
                );
                return Ok(());
            }
            Some(
                ResponseError::ConcurrentTransactions
                | ResponseError::CoordinatorLoadInProgress
                | ResponseError::NotCoordinator
                | ResponseError::CoordinatorNotAvailable,
            ) if started.elapsed() < ABORT_WAIT => {
                crate::clock::sleep(Duration::from_millis(200)).await;
            }
            Some(e) => bail!("aborting {id}: {e:?}"),
        }
    }
}
