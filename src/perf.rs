pub fn command() -> clap::Command {
    clap::Command::new("perf").about("load tool (produce/consume throughput and latency)")
}
pub fn run(_m: &clap::ArgMatches) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
