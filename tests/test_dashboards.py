"""The observability deliverables: the Grafana dashboards of dashboards/*.json,
dashboards/alerts.yml and docs/metrics.md, checked against a real broker scraped by a real
Prometheus.

Prometheus and promtool come from Debian's `prometheus` package, installed here when
missing (as tests/run installs kcat); a failed install fails the tests, nothing is
skipped.

- promtool accepts the alert rules;
- every dashboard parses, has a unique uid and title, the `datasource` variable, the
  links to the other Strata dashboards (and panel links only to dashboards that exist);
  every panel queries `${datasource}`, every target has an expression, every variable an
  expression uses is defined; docs/metrics.md lists every dashboard; every runbook link
  points at a heading of docs/metrics.md;
- with traffic on a broker (produce; sealed segments uploaded and written through to a
  block cache too small to hold them, then read back from offset 0, so there are hits,
  misses and evictions; a consumer group that commits less than it read; an
  out-of-range fetch, so partition errors exist; the deletion of a topic that does not
  exist, so metadata-store errors exist; planted orphan objects for the orphan
  collector) and Prometheus scraping it every second, every dashboard variable query
  returns values and every dashboard expression parses and returns at least one series.
  The only targets allowed to be empty are those that select nothing but failures (an
  unhealthy outcome such as `outcome=~"error|timeout"`, a filtered counter of failures,
  or a counter that only exists after a failure, ONLY_AFTER_FAILURE); every such empty
  selector's metric must still be served (but ONLY_AFTER_FAILURE), and every panel must
  show at least one series. Alert expressions are empty while nothing is wrong, so for
  them the test asserts that they parse and evaluate without error in Prometheus, and
  that every metric selector inside them returns data, under the same exception; an
  alert whose selectors all have data must match the broker once its thresholds are
  relaxed (so the parts of its condition join). Every
  metric the dashboards and alerts query is documented; every metric documented in
  docs/metrics.md is served (but ONLY_AFTER_FAILURE and OPT_IN), and every metric served
  is documented;
- a copy of StrataBrokerDown with `for: 0s` fires once the broker is killed (and the
  real rule goes pending).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import (REPO_ROOT, admin_client, consume_all, create_topic, free_ports,
                      producer, unique_topic)

# first run on a fresh machine installs Debian's prometheus package
pytestmark = pytest.mark.timeout(300)

DASHBOARDS = REPO_ROOT / "dashboards"
ALERTS = DASHBOARDS / "alerts.yml"
METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"
JOB = "strata"

EXPECTED_ALERTS = {
    "StrataBrokerDown", "StrataProduceLatencyHigh", "StrataObjectStoreErrors",
    "StrataWalFlushFailures", "StrataMetadataStoreErrors", "StrataConsumerLagGrowing",
    "StrataCacheThrash", "StrataConnectionsNearLimit", "StrataRequestBytesSaturated",
    "StrataCacheDiskFull", "StrataBrokerSteppedDown", "StrataCorruptWriteAhead",
    "StrataCompactionLagExceeded", "StrataTransactionHanging",
}

# Grafana's built-in variables, replaced as Grafana would for a short time range
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "${__rate_interval}": "1m",
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range": "5m",
    "${__range}": "5m",
}

# counters with no series until something has failed, which the test's traffic does not
# provoke (documented, not yet served): retries follow failed object-store attempts
ONLY_AFTER_FAILURE = {"strata_object_store_retries_total"}
# Served only with the metrics.partition.labels setting (off in this test).
OPT_IN = {"strata_partition_bytes_in_total", "strata_partition_bytes_out_total"}
# Served only by a fleet with brokers in several zones and consumers naming theirs
# (KIP-392); tests/test_fleet.py::test_consumer_reads_in_its_zone asserts both.
ONLY_IN_ZONED_FLEET = {"strata_zone_fetch_bytes_total", "strata_preferred_replica_redirects_total"}
# Series only while an open transaction holds a partition up;
# tests/test_transactions.py asserts it then.
ONLY_WITH_OPEN_TRANSACTIONS = {"strata_last_stable_offset_lag"}

# Selectors that only match when something is wrong may be empty (their metric must
# still be served): an outcome matcher naming only unhealthy outcomes, or any selector
# of a counter that counts nothing but failures.
UNHEALTHY_OUTCOMES = {"error", "timeout", "write_failed", "commit_failed"}
FAILURE_COUNTERS = {"strata_partition_errors_total", "strata_metadata_store_errors_total",
                    "strata_object_store_retries_total"}
OUTCOME_MATCHER = re.compile(r'\boutcome\s*(=~|=)\s*"([^"]*)"')

# The broker for the traffic test: 64 KiB segments, so the produced data is sealed and
# uploaded within seconds and written through to a 256 KiB memory-only block cache of
# 64 KiB blocks (too small for it: evictions), then read back from offset 0 (misses and
# hits); frequent write-ahead garbage collection (deletes); a quick first rebalance; and
# an orphan collector that runs every 500 ms with a 3 s grace period.
TRAFFIC_SETTINGS = {
    "STRATA_SEGMENT_BYTES": "65536",
    "STRATA_CACHE_MEMORY_BYTES": "262144",
    "STRATA_CACHE_DISK_BYTES": "0",
    "STRATA_CACHE_BLOCK_BYTES": "65536",
    "STRATA_WAL_GC_INTERVAL_MS": "500",
    "STRATA_GROUP_INITIAL_REBALANCE_DELAY_MS": "100",
    "STRATA_ORPHAN_CHECK_INTERVAL_MS": "500",
    "STRATA_ORPHAN_GRACE_MS": "3000",
}


# ---------------------------------------------------------------------------
# Prometheus install and process
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prometheus_tools() -> dict:
    """Paths of promtool and prometheus, installing Debian's package when missing."""
    tools = {n: shutil.which(n) for n in ("promtool", "prometheus")}
    if all(tools.values()):
        return tools
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = []
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]):
        try:
            r = subprocess.run(sudo + cmd, env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=240)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.fail(f"installing Debian's prometheus package failed: {' '.join(cmd)}: {e}")
        out.append(f"$ {' '.join(cmd)} (exit {r.returncode})\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        if r.returncode != 0:
            pytest.fail("installing Debian's prometheus package failed:\n" + "\n".join(out))
    tools = {n: shutil.which(n) for n in ("promtool", "prometheus")}
    if not all(tools.values()):
        pytest.fail(f"prometheus package installed but tools missing: {tools}\n" + "\n".join(out))
    return tools


def http_json(url: str, data: bytes | None = None, timeout: float = 5.0):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
    except urllib.error.HTTPError as e:
        body = e.read().decode()
    return json.loads(body) if body.strip().startswith("{") else body


class Prometheus:
    """One Prometheus process on a free loopback port, scraping one broker every second."""

    def __init__(self, binary: str, base: Path, target_port: int, rule_files: list[Path]):
        self.binary = binary
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        self.config = self.base / "prometheus.yml"
        self.log_path = self.base / "prometheus.log"
        # JSON is YAML: no YAML library needed
        self.config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": JOB,
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }, indent=2))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "Prometheus":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}",
                 f"--storage.tsdb.path={self.base / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--web.enable-lifecycle"],
                cwd=self.base, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus not ready within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError as e:
            return f"<no log: {e}>"

    def query(self, expr: str) -> dict:
        q = urllib.parse.urlencode({"query": expr})
        return http_json(f"{self.url}/api/v1/query?{q}")

    def series(self, expr: str) -> list:
        r = self.query(expr)
        assert r.get("status") == "success", f"query failed: {expr}\n{r}"
        return r["data"]["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        q = urllib.parse.urlencode({"match[]": match})
        r = http_json(f"{self.url}/api/v1/label/{urllib.parse.quote(label)}/values?{q}")
        assert r.get("status") == "success", f"label values of {label} for {match} failed: {r}"
        return r["data"]

    def rules(self) -> list[dict]:
        r = http_json(self.url + "/api/v1/rules")
        assert r["status"] == "success", r
        return [rule for g in r["data"]["groups"] for rule in g["rules"]]

    def alerts(self) -> list[dict]:
        r = http_json(self.url + "/api/v1/alerts")
        assert r["status"] == "success", r
        return r["data"]["alerts"]

    def wait_scraped(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(s["value"][1] == "1" for s in self.series(f'up{{job="{JOB}"}}')):
                return
            time.sleep(0.25)
        raise AssertionError(f"prometheus did not scrape the broker within {timeout}s:\n{self.log_tail()}")


@pytest.fixture
def prometheus_factory(prometheus_tools, tmp_path):
    made: list[Prometheus] = []

    def make(target_port: int, rule_files: list[Path]) -> Prometheus:
        p = Prometheus(prometheus_tools["prometheus"], tmp_path / f"prometheus{len(made)}",
                       target_port, rule_files)
        made.append(p)
        return p.start()

    yield make
    for p in made:
        p.stop()


# ---------------------------------------------------------------------------
# the files
# ---------------------------------------------------------------------------

def dashboard_files() -> list[Path]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files, f"no dashboards in {DASHBOARDS}"
    return files


def all_panels(panels: list) -> list:
    out = []
    for p in panels:
        out.append(p)
        out.extend(all_panels(p.get("panels", [])))  # panels nested in collapsed rows
    return out


def query_variables(d: dict) -> dict[str, dict]:
    """The dashboard's query variables (the datasource variable is not one)."""
    return {v["name"]: v for v in d["templating"]["list"] if v["type"] == "query"}


def variable_query(v: dict) -> str:
    q = v["query"]
    return q["query"] if isinstance(q, dict) else q


VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, variables: dict[str, dict]) -> str:
    """expr as Grafana sends it with every variable at "All" and a short time range."""
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)

    def value(m):
        name = m.group(1) or m.group(2)
        assert name in variables, f"undefined variable ${name} in {expr}"
        return variables[name]["allValue"]
    return VARIABLE.sub(value, expr)


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr with Grafana's and the dashboard's variables
    substituted), for every target of every panel."""
    out = []
    for f in dashboard_files():
        d = json.loads(f.read_text())
        variables = query_variables(d)
        for p in all_panels(d["panels"]):
            for t in p.get("targets", []):
                out.append((f.name, p["title"], substitute(t["expr"], variables)))
    return out


def dashboard_variable_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard, variable, label, series selector) of every label_values() variable."""
    out = []
    for f in dashboard_files():
        d = json.loads(f.read_text())
        variables = query_variables(d)
        for name, v in variables.items():
            m = re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", variable_query(v))
            assert m, f"{f.name}: variable {name}: not a label_values(selector, label) query"
            out.append((f.name, name, m.group(2), substitute(m.group(1), variables)))
    return out


def github_anchor(heading: str) -> str:
    a = heading.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")


def doc_anchors() -> set[str]:
    return {github_anchor(m.group(1))
            for m in re.finditer(r"^#+\s+(.*)$", METRICS_DOC.read_text(), re.M)}


def documented_metrics() -> set[str]:
    """Metric names in the reference tables of docs/metrics.md (first column)."""
    names = set()
    for line in METRICS_DOC.read_text().splitlines():
        m = re.match(r"^\|\s*`([a-z_:][a-z0-9_:]*)`\s*\|", line)
        if m:
            names.add(m.group(1))
    return names


def test_alert_rules_pass_promtool(prometheus_tools):
    r = subprocess.run([prometheus_tools["promtool"], "check", "rules", str(ALERTS)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"promtool check rules failed:\n{r.stdout}\n{r.stderr}"
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in r.stdout, r.stdout


def test_dashboards_are_well_formed():
    boards = {f.name: json.loads(f.read_text()) for f in dashboard_files()}
    uids = [d.get("uid") for d in boards.values()]
    titles = [d.get("title") for d in boards.values()]
    assert all(uids) and len(set(uids)) == len(uids), f"dashboard uids missing or not unique: {uids}"
    assert all(titles) and len(set(titles)) == len(titles), f"titles missing or not unique: {titles}"
    docs = METRICS_DOC.read_text()
    for name, d in boards.items():
        assert d.get("schemaVersion", 0) >= 36, f"{name}: schemaVersion {d.get('schemaVersion')}"
        assert f"dashboards/{name}" in docs, f"{name} is not listed in docs/metrics.md"
        variables = {v["name"]: v for v in d["templating"]["list"]}
        ds = variables.get("datasource")
        assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", \
            f"{name}: no datasource variable of type datasource/prometheus"
        for v in query_variables(d).values():
            assert v.get("datasource", {}).get("uid") == "${datasource}", f"{name}: variable {v['name']}"
            assert v.get("includeAll") and v.get("allValue"), f"{name}: variable {v['name']} needs All"
        # every Strata dashboard links to the others (by tag) and carries the tag itself
        assert "strata" in d.get("tags", []), f"{name}: no strata tag"
        assert any(lk.get("type") == "dashboards" and "strata" in lk.get("tags", [])
                   for lk in d.get("links", [])), f"{name}: no links to the Strata dashboards"
        panels = all_panels(d["panels"])
        assert panels, f"{name}: no panels"
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for p in panels:
            where = f"{name}: panel {p.get('title')!r}"
            pos = p["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, f"{where}: {pos}"
            for lk in p.get("links", []):
                m = re.match(r"/d/([\w-]+)", lk["url"])
                assert m and m.group(1) in uids, f"{where}: link to unknown dashboard {lk['url']}"
            if p["type"] == "row":
                continue
            assert p.get("title"), f"{where}: no title"
            assert p.get("datasource", {}).get("uid") == "${datasource}", f"{where}: datasource {p.get('datasource')}"
            assert p.get("targets"), f"{where}: no targets"
            for t in p["targets"]:
                assert t.get("expr", "").strip(), f"{where}: target {t.get('refId')} has no expr"
                tds = t.get("datasource")
                assert tds is None or tds.get("uid") == "${datasource}", f"{where}: target datasource {tds}"
    # every variable an expression uses is defined (substitute() asserts it)
    dashboard_targets()
    dashboard_variable_queries()


def test_runbooks_exist_for_every_alert():
    text = ALERTS.read_text()
    alerts = re.findall(r"^\s*- alert:\s*(\w+)", text, re.M)
    assert set(alerts) == EXPECTED_ALERTS, alerts
    runbooks = re.findall(r"runbook_url:\s*(\S+)", text)
    assert len(runbooks) == len(alerts), "every alert needs a runbook_url"
    anchors = doc_anchors()
    for url in runbooks:
        path, _, anchor = url.partition("#")
        assert path == "docs/metrics.md", url
        assert anchor in anchors, f"{url}: no heading with anchor #{anchor} in docs/metrics.md"


# ---------------------------------------------------------------------------
# against a real broker and a real Prometheus
# ---------------------------------------------------------------------------

SELECTOR = re.compile(r"(?<![\w$.])(up|strata_\w+|kafka_\w+|foyer_\w+)(\{[^}]*\})?")


def base_metric(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def selects_only_failures(metric: str, matchers: str) -> bool:
    """True when the selector only matches once something has failed."""
    if base_metric(metric) in FAILURE_COUNTERS | ONLY_AFTER_FAILURE:
        return True
    m = OUTCOME_MATCHER.search(matchers)
    return bool(m) and m.group(1) in ("=", "=~") and set(m.group(2).split("|")) <= UNHEALTHY_OUTCOMES


def empty_selectors_excused(prom: "Prometheus", expr: str) -> tuple[bool, list[str]]:
    """(may the expression be empty, its empty selectors): only when it has empty
    selectors, each selecting nothing but failures of a metric that is served (or that
    only exists after a failure)."""
    empty, excused = [], True
    for metric, matchers in SELECTOR.findall(expr):
        if prom.series(metric + matchers):
            continue
        empty.append(metric + matchers)
        if not selects_only_failures(metric, matchers):
            excused = False
        elif base_metric(metric) not in ONLY_AFTER_FAILURE and not prom.series(metric):
            excused = False
    return excused and bool(empty), empty


THRESHOLD = re.compile(r"(?<![=!<>])(>=|<=|>|<)\s*-?[0-9.]+(?:e[+-]?[0-9]+)?")


def relax_thresholds(expr: str) -> str:
    """expr with every comparison against a number made true for any finite value."""
    return THRESHOLD.sub(lambda m: "> -Inf" if m.group(1).startswith(">") else "< +Inf", expr)


def plant_orphans(b) -> list[str]:
    """Objects under segments/ and wal/ that no manifest references, for the orphan
    collector: a segment of a topic that does not exist, a write-ahead object never
    committed."""
    keys = [f"segments/{uuid.uuid4()}/0/00000000000000000000-1.seg",
            "wal/0/000000009999-000000000000.wal"]
    for key in keys:
        if b.s3:
            b.s3.client().put_object(Bucket=b.bucket, Key=f"strata/{key}", Body=b"x" * 100)
        else:
            path = b.objects_dir / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * 100)
    return keys


def scrape(b) -> dict[str, float]:
    """{series line without value: value} of the broker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{b.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def wait_for(what: str, cond, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f}s"
        time.sleep(0.25)
    return got


def generate_traffic(b, topic: str, group: str, planted: list[str]):
    """Produce 3000 records (sealed into segments, uploaded and written through to the
    block cache), read them with a consumer group that commits 200 short of the end of
    each partition, read them again from offset 0 (block cache hits and misses), provoke
    an out-of-range fetch and a metadata-store error. Returns the (still subscribed)
    group consumer and a producer for more traffic."""
    from confluent_kafka import Consumer, TopicPartition

    bootstrap = b.bootstrap
    create_topic(bootstrap, topic, 2)
    # A compacted topic, for the compaction panels and alert.
    create_topic(bootstrap, topic + "-compacted", 1, config={"cleanup.policy": "compact"})
    p = producer(bootstrap)
    for i in range(3000):
        p.produce(topic, value=b"x" * 200, key=str(i).encode(), partition=i % 2)
        if i % 500 == 0:
            p.poll(0)
    assert p.flush(30) == 0
    # 300 KB per partition: both partitions seal a segment and upload it
    wait_for("sealed segments of both partitions uploaded",
             lambda: len({tuple(k.split("/")[1:3]) for k in b.objects("segments", ".seg")
                          if k not in planted}) == 2)

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    last = {}
    deadline = time.monotonic() + 40
    while sum(last.get(i, -1) + 1 for i in range(2)) < 3000:
        assert time.monotonic() < deadline, f"group consumer read only {last}"
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        last[m.partition()] = m.offset()
    c.commit(offsets=[TopicPartition(topic, i, last[i] + 1 - 200) for i in range(2)],
             asynchronous=False)
    reread(bootstrap, topic)
    m = scrape(b)
    for key in ('strata_cache_lookups_total{result="hit"}', 'strata_cache_lookups_total{result="miss"}',
                "strata_cache_evictions_total"):
        assert m.get(key, 0) > 0, f"no {key} after reading the segments back: " + \
            str({k: v for k, v in m.items() if k.startswith("strata_cache")})

    # a fetch beyond the log end: OFFSET_OUT_OF_RANGE, counted in strata_partition_errors_total
    oor = Consumer({"bootstrap.servers": bootstrap, "group.id": group + "-oor",
                    "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    oor.assign([TopicPartition(topic, 0, 10_000_000)])
    deadline = time.monotonic() + 10
    got = False
    while time.monotonic() < deadline and not got:
        m = oor.poll(0.5)
        got = m is not None and not m.error()  # reset to earliest after the error
    oor.close()

    # deleting a topic that does not exist: refused by the metadata store, counted in
    # strata_metadata_store_errors_total{op="delete_topic"}
    admin = admin_client(bootstrap)
    missing = unique_topic("dash-missing")
    with pytest.raises(Exception, match="(?i)unknown topic"):
        admin.delete_topics([missing], operation_timeout=10)[missing].result(15)
    return p, c


def reread(bootstrap: str, topic: str) -> None:
    """Read the topic from offset 0 in small fetches: sealed data comes through the block
    cache (a miss per block not held, hits for the rest of the block)."""
    msgs = consume_all(bootstrap, topic, 2, timeout=30, **{
        "group.id": unique_topic("dash-reread"), "max.partition.fetch.bytes": 16384})
    assert len(msgs) >= 3000, len(msgs)


def test_every_query_returns_data(broker_factory, prometheus_factory):
    b = broker_factory(env=TRAFFIC_SETTINGS, name="broker")
    topic, group = unique_topic("dash"), unique_topic("dash-group")
    prom = prometheus_factory(b.http_port, [ALERTS])
    planted = plant_orphans(b)
    p, c = generate_traffic(b, topic, group, planted)
    prom.wait_scraped()

    # light traffic for ~25 s so every rate() window has samples; the topic is read from
    # offset 0 again halfway, so the block cache sees lookups within the last minute
    start = time.monotonic()
    reread_done = False
    while time.monotonic() - start < 25:
        for i in range(20):
            p.produce(topic, value=b"y" * 100, partition=i % 2)
        p.poll(0)
        c.poll(0.1)  # the group keeps its member; its lag grows (nothing committed)
        if not reread_done and time.monotonic() - start > 10:
            reread(b.bootstrap, topic)
            reread_done = True
        time.sleep(0.4)
    assert p.flush(30) == 0
    wait_for("planted orphans deleted",
             lambda: sum(v for k, v in scrape(b).items()
                         if k.startswith("strata_orphans_deleted_total{")) >= len(planted))
    time.sleep(2)  # the last counters scraped

    problems = []

    # every dashboard variable has values
    for dash, name, label, selector in dashboard_variable_queries():
        if not prom.label_values(label, selector):
            problems.append(f"{dash}: variable {name}: no values of {label} in {selector}")

    # every dashboard expression parses and returns data (but failures-only ones), and
    # every panel shows at least one series
    targets = dashboard_targets()
    assert len(targets) >= 60, targets
    panel_has_data: dict[tuple[str, str], bool] = {}
    for dash, title, expr in targets:
        panel_has_data.setdefault((dash, title), False)
        r = prom.query(expr)
        if r.get("status") != "success":
            problems.append(f"{dash} / {title}: query error {r.get('error')}: {expr}")
        elif r["data"]["result"]:
            panel_has_data[(dash, title)] = True
        else:
            excused, empty = empty_selectors_excused(prom, expr)
            if not excused:
                problems.append(f"{dash} / {title}: no series: {expr} (empty selectors: {empty})")
    for (dash, title), has_data in panel_has_data.items():
        if not has_data:
            problems.append(f"{dash} / {title}: no target of the panel returns a series")

    # every alert rule loaded, evaluates without error, and its selectors have data
    rules = prom.rules()
    assert {r["name"] for r in rules} == EXPECTED_ALERTS, [r["name"] for r in rules]
    for rule in rules:
        name, expr = rule["name"], rule["query"]
        if rule["health"] != "ok":
            problems.append(f"alert {name}: health {rule['health']}: {rule.get('lastError')}")
        if prom.query(expr).get("status") != "success":
            problems.append(f"alert {name}: query error: {expr}")
        selectors = SELECTOR.findall(expr)
        if not selectors:
            problems.append(f"alert {name}: no metric selector found in {expr}")
        for metric, matchers in selectors:
            if prom.series(metric + matchers):
                continue
            if selects_only_failures(metric, matchers) and (
                    base_metric(metric) in ONLY_AFTER_FAILURE or prom.series(metric)):
                continue  # only present when something fails; the metric itself is served
            problems.append(f"alert {name}: selector {metric}{matchers} has no series")
        # with every threshold relaxed, an alert whose selectors all have data matches the
        # broker: the parts of its condition join (by clauses, and/or matching)
        relaxed = relax_thresholds(expr)
        if relaxed != expr and all(prom.series(m + mt) for m, mt in selectors) \
                and not prom.series(relaxed):
            problems.append(f"alert {name}: no series even with relaxed thresholds: {relaxed}")

    # docs/metrics.md, the queries and what the broker serves agree
    served = {s["metric"]["__name__"] for s in prom.series(f'count by (__name__) ({{job="{JOB}"}})')}
    documented = documented_metrics()
    assert len(documented) >= 20, f"docs/metrics.md reference table looks empty: {documented}"
    queried = {base_metric(m) for _, _, e in targets for m, _ in SELECTOR.findall(e)}
    queried |= {base_metric(m) for r in rules for m, _ in SELECTOR.findall(r["query"])}
    for name in sorted(queried - documented - {"up"}):
        problems.append(f"metric {name} is queried by a dashboard or alert but not in docs/metrics.md")
    # Prometheus's own series: scrape health, and ALERTS from the loaded rules
    internal = {n for n in served if n in ("up", "ALERTS", "ALERTS_FOR_STATE")
                or n.startswith("scrape_")}
    for name in sorted(served - internal):
        if name not in documented and base_metric(name) not in documented:
            problems.append(f"served metric {name} is not in docs/metrics.md")
    for name in sorted(documented - ONLY_AFTER_FAILURE - OPT_IN - ONLY_IN_ZONED_FLEET
                       - ONLY_WITH_OPEN_TRANSACTIONS):
        if not (name in served or any(s in served for s in (name + "_bucket", name + "_count"))):
            problems.append(f"documented metric {name} is not served")

    c.close()
    assert not problems, "\n".join(problems)


def test_broker_down_alert_fires(broker, prometheus_factory, tmp_path):
    """A copy of StrataBrokerDown with `for: 0s` fires within 30 s of the broker dying."""
    test_rules = tmp_path / "test-rules.yml"
    test_rules.write_text(json.dumps({"groups": []}))
    prom = prometheus_factory(broker.http_port, [ALERTS, test_rules])
    prom.wait_scraped()

    real = [r for r in prom.rules() if r["name"] == "StrataBrokerDown"]
    assert len(real) == 1, prom.rules()
    # JSON is YAML: the same expression, no `for`
    test_rules.write_text(json.dumps({"groups": [{"name": "strata-test", "rules": [{
        "alert": "StrataBrokerDownTest", "expr": real[0]["query"], "for": "0s",
        "labels": {"severity": "test"}}]}]}))
    r = http_json(prom.url + "/-/reload", data=b"")
    deadline = time.monotonic() + 15
    while not any(x["name"] == "StrataBrokerDownTest" and x.get("lastEvaluation", "").startswith("2")
                  and x["health"] == "ok" for x in prom.rules()):
        assert time.monotonic() < deadline, f"test rule not loaded after reload ({r}):\n{prom.log_tail()}"
        time.sleep(0.25)
    # before the first scrape absent(strata_build_info) holds: wait for the rules to see the broker
    deadline = time.monotonic() + 15
    while active := [a for a in prom.alerts() if a["labels"]["alertname"].startswith("StrataBrokerDown")]:
        assert time.monotonic() < deadline, f"broker-down alerts active while the broker is up: {active}"
        time.sleep(0.25)

    broker.kill9()
    deadline = time.monotonic() + 30
    while True:
        alerts = prom.alerts()
        firing = [a for a in alerts if a["labels"]["alertname"] == "StrataBrokerDownTest"
                  and a["state"] == "firing"]
        real = [a for a in alerts if a["labels"]["alertname"] == "StrataBrokerDown"]
        if firing and real:
            break
        assert time.monotonic() < deadline, f"StrataBrokerDownTest not firing 30 s after the kill: {alerts}"
        time.sleep(0.25)
    # the scrape failure itself (up == 0) names the dead broker
    assert any(a["labels"].get("instance") == f"127.0.0.1:{broker.http_port}" for a in firing), firing
    # the real rule (for: 1m) has seen the same condition
    assert all(a["state"] in ("pending", "firing") for a in real), real
