//! The command line: `strata serve` (the broker) and `strata perf` (the load tool).
//! Settings come from the table in [`crate::config`]: each is a flag, an environment
//! variable and a TOML key, applied in the order file < environment < flag.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

use crate::config::{Config, SETTINGS};

fn serve_command() -> Command {
    let mut cmd = Command::new("serve")
        .about("run the broker (zero configuration: 127.0.0.1:9092, data under ./data)")
        .arg(
            Arg::new("config")
                .long("config")
                .env("STRATA_CONFIG")
                .value_name("FILE")
                .help("TOML file with settings (keys as named below, dotted or nested)"),
        );
    for def in SETTINGS {
        let help = if def.default.is_empty() {
            format!("{} [setting {}]", def.doc, def.name)
        } else {
            format!(
                "{} [setting {}; default {}]",
                def.doc, def.name, def.default
            )
        };
        cmd = cmd.arg(
            Arg::new(def.name)
                .long(def.flag())
                .env(def.env())
                .value_name("VALUE")
                .action(ArgAction::Set)
                .help(help),
        );
    }
    cmd
}

pub fn command() -> Command {
    Command::new("strata")
        .about("A Kafka-compatible message broker whose log lives in object storage")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .subcommand(serve_command())
        .subcommand(crate::perf::command())
        .subcommand(crate::groups_cli::command())
        .subcommand(crate::txn_cli::command())
        .subcommand(crate::cluster::command())
}

/// Builds the configuration from a file, the environment and flags.
pub fn config_from(matches: &ArgMatches) -> anyhow::Result<Config> {
    let mut values: BTreeMap<String, String> = match matches.get_one::<String>("config") {
        Some(path) => Config::read_toml(std::path::Path::new(path))?,
        None => BTreeMap::new(),
    };
    for def in SETTINGS {
        if matches!(
            matches.value_source(def.name),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            if let Some(v) = matches.get_one::<String>(def.name) {
                values.insert(def.name.to_string(), v.clone());
            }
        }
    }
    Config::from_values(values)
}

pub fn main() -> ExitCode {
    let matches = command().get_matches();
    let result = match matches.subcommand() {
        Some(("serve", m)) => config_from(m).and_then(run_serve),
        Some(("perf", m)) => crate::perf::run(m),
        Some(("groups", m)) => crate::groups_cli::run(m),
        Some(("transactions", m)) => crate::txn_cli::run(m),
        Some(("cluster", m)) => crate::cluster::run(m),
        _ => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run_serve(config: Config) -> anyhow::Result<()> {
    init_logging(config.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("binding kafka listener {}: {e}", config.listen))?;
        let http = tokio::net::TcpListener::bind(&config.http)
            .await
            .map_err(|e| anyhow::anyhow!("binding http endpoint {}: {e}", config.http))?;
        let slot = crate::http::BrokerSlot::default();
        tokio::spawn(crate::http::serve(http, slot.clone()));
        let components = crate::broker::Components::open(&config).await?;
        let broker = crate::broker::Broker::start(config, components).await?;
        let _ = slot.set(broker.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(crate::server::serve(broker.clone(), listener, stop_rx));
        shutdown_signal().await;
        tracing::info!("shutting down: handing partitions and groups off");
        // The listener keeps answering during the hand-off: in-flight produces complete
        // and clients learn the new owners from this broker's own Metadata answers.
        broker.controller.hand_off().await;
        tracing::info!("hand-off done; closing connections");
        let _ = stop_tx.send(true);
        let _ = server.await;
        broker.shutdown().await;
        Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
