"""The observability deliverables: dashboards/strata-overview.json, dashboards/alerts.yml
and docs/metrics.md, checked against a real broker scraped by a real Prometheus.

Prometheus and promtool come from Debian's `prometheus` package, installed here when
missing (as tests/run installs kcat); a failed install fails the tests, nothing is
skipped.

- promtool accepts the alert rules;
- every dashboard parses, every panel queries `${datasource}` and every target has an
  expression; every runbook link points at a heading of docs/metrics.md;
- with traffic on a broker (produce, a consumer group that commits less than it read,
  an out-of-range fetch so partition errors exist) and Prometheus scraping it every
  second, every dashboard expression parses and returns at least one series. Alert
  expressions are empty while nothing is wrong, so for them the test asserts that they
  parse and evaluate without error in Prometheus, and that every metric selector inside
  them returns data. The only selectors allowed to be empty are those that select an
  unhealthy outcome (`outcome="error"`, `outcome="write_failed"`): for those the bare
  metric name must have data. Every metric documented in docs/metrics.md is served
  (but counters of failures, ONLY_AFTER_FAILURE), and every metric served is documented;
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
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO_ROOT, create_topic, free_ports, producer, unique_topic

# first run on a fresh machine installs Debian's prometheus package
pytestmark = pytest.mark.timeout(300)

DASHBOARDS = REPO_ROOT / "dashboards"
ALERTS = DASHBOARDS / "alerts.yml"
METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"
JOB = "strata"

EXPECTED_ALERTS = {
    "StrataBrokerDown", "StrataProduceLatencyHigh", "StrataObjectStoreErrors",
    "StrataWalFlushFailures", "StrataConsumerLagGrowing", "StrataConnectionsNearLimit",
    "StrataRequestBytesSaturated",
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

# counters with no series until something has failed (documented, not yet served)
ONLY_AFTER_FAILURE = {"strata_metadata_store_errors_total"}
# Served only with the metrics.partition.labels setting (off in this test).
OPT_IN = {"strata_partition_bytes_in_total", "strata_partition_bytes_out_total"}

# selectors that only match when something is wrong
UNHEALTHY_MATCHERS = ('outcome="error"', 'outcome="write_failed"', 'outcome=~"write_failed|commit_failed"')


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


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr with Grafana variables substituted)."""
    out = []
    for f in dashboard_files():
        d = json.loads(f.read_text())
        for p in all_panels(d["panels"]):
            for t in p.get("targets", []):
                e = t["expr"]
                for k, v in GRAFANA_VARS.items():
                    e = e.replace(k, v)
                out.append((f.name, p["title"], e))
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
    for f in dashboard_files():
        d = json.loads(f.read_text())
        assert d.get("schemaVersion", 0) >= 36, f"{f.name}: schemaVersion {d.get('schemaVersion')}"
        variables = {v["name"]: v for v in d["templating"]["list"]}
        ds = variables.get("datasource")
        assert ds and ds["type"] == "datasource" and ds["query"] == "prometheus", \
            f"{f.name}: no datasource variable of type datasource/prometheus"
        panels = all_panels(d["panels"])
        assert panels, f"{f.name}: no panels"
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), f"{f.name}: duplicate panel ids"
        for p in panels:
            if p["type"] == "row":
                continue
            where = f"{f.name}: panel {p.get('title')!r}"
            assert p.get("title"), f"{where}: no title"
            assert p.get("datasource", {}).get("uid") == "${datasource}", f"{where}: datasource {p.get('datasource')}"
            assert p.get("targets"), f"{where}: no targets"
            for t in p["targets"]:
                assert t.get("expr", "").strip(), f"{where}: target {t.get('refId')} has no expr"
                tds = t.get("datasource")
                assert tds is None or tds.get("uid") == "${datasource}", f"{where}: target datasource {tds}"


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

SELECTOR = re.compile(r"(?<![\w$.])(up|strata_\w+|kafka_\w+)(\{[^}]*\})?")


def generate_traffic(bootstrap: str, topic: str, group: str):
    """Produce 3000 records, read them with a consumer group that commits 200 short of
    the end of each partition, and provoke an out-of-range fetch. Returns the
    (still subscribed) group consumer and a producer for more traffic."""
    from confluent_kafka import Consumer, TopicPartition

    create_topic(bootstrap, topic, 2)
    p = producer(bootstrap)
    for i in range(3000):
        p.produce(topic, value=b"x" * 200, key=str(i).encode(), partition=i % 2)
        if i % 500 == 0:
            p.poll(0)
    assert p.flush(30) == 0

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
    return p, c


def test_every_query_returns_data(broker, prometheus_factory):
    topic, group = unique_topic("dash"), unique_topic("dash-group")
    prom = prometheus_factory(broker.http_port, [ALERTS])
    p, c = generate_traffic(broker.bootstrap, topic, group)
    prom.wait_scraped()

    # light traffic for ~25 s so every rate() window has samples
    end = time.monotonic() + 25
    while time.monotonic() < end:
        for i in range(20):
            p.produce(topic, value=b"y" * 100, partition=i % 2)
        p.poll(0)
        c.poll(0.1)  # the group keeps its member; its lag grows (nothing committed)
        time.sleep(0.4)
    assert p.flush(30) == 0

    problems = []

    # every dashboard expression parses and returns data
    exprs = dashboard_exprs()
    assert len(exprs) >= 20, exprs
    for dash, title, expr in exprs:
        r = prom.query(expr)
        if r.get("status") != "success":
            problems.append(f"{dash} / {title}: query error {r.get('error')}: {expr}")
        elif not r["data"]["result"]:
            problems.append(f"{dash} / {title}: no series: {expr}")

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
            if any(u in matchers for u in UNHEALTHY_MATCHERS) and prom.series(metric):
                continue  # only present when something fails; the metric itself is served
            problems.append(f"alert {name}: selector {metric}{matchers} has no series")

    # docs/metrics.md and what the broker serves agree
    served = {s["metric"]["__name__"] for s in prom.series(f'count by (__name__) ({{job="{JOB}"}})')}
    documented = documented_metrics()
    assert len(documented) >= 20, f"docs/metrics.md reference table looks empty: {documented}"
    # Prometheus's own series: scrape health, and ALERTS from the loaded rules
    internal = {n for n in served if n in ("up", "ALERTS", "ALERTS_FOR_STATE")
                or n.startswith("scrape_")}
    for name in sorted(served - internal):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in documented and base not in documented:
            problems.append(f"served metric {name} is not in docs/metrics.md")
    for name in sorted(documented - ONLY_AFTER_FAILURE - OPT_IN):
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
