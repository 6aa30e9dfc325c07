"""The deploy artifacts (deploy/, terraform/, docs/deploy.md) checked offline with the
real tools, and the broker started exactly as the image, the chart and the compose file
configure it.

Tools come from tests/deploy-tools.sh (its own venv, pinned deploy/requirements.txt):
the STRATA_DEPLOY_* variables it prints, or the script itself when they are unset.
Chart rendering, Kubernetes schemas, Terraform and YAML/HCL parsing run in that venv
through tests/deploy_helper.py, which answers in JSON.

- configuration: the README's configuration reference equals `strata serve --help`;
  every STRATA_* variable and every `strata serve` flag that the chart, the compose
  file, the Dockerfile, terraform/ and docs/deploy.md use is a real one; the chart's
  values schema admits exactly the settings the chart does not set itself;
- Dockerfile: hadolint; a multi-stage build that copies every workspace member and
  path dependency, none of them dropped by .dockerignore; a non-root numeric USER; the
  data directory a VOLUME; a HEALTHCHECK on /readyz; `strata serve` as entrypoint;
- shell: shellcheck on every shell script of the repository and the scripts embedded
  in the chart and the compose file;
- compose: `docker-compose config`; three brokers with distinct ids, zones and
  advertised addresses that are published ports; the S3 store, PostgreSQL, Prometheus
  (`promtool check config`, every broker scraped under a strata* job, the alert rules
  mounted) and Grafana (data source and dashboards provisioned) wired to each other;
- chart: `helm lint --strict` and an offline render for every ci/*-values.yaml; every
  manifest valid against the Kubernetes 1.29 and 1.37 schemas (strict); the
  Prometheus Operator resources checked by shape and promtool; Services, the
  PodDisruptionBudget, the NetworkPolicy, HPAs and the ServiceMonitor select the broker
  pods and name ports that exist; zones, advertised address, probes, data volume,
  security context and autoscaling behaviour as documented; the copies of
  dashboards/ inside the chart identical to the originals; bad values refused;
- terraform: `terraform fmt -check -recursive`; Terraform loads the example root and
  every module (init installs the modules, providers cannot be downloaded here); every
  variable has a type and a description, every output a description; module calls pass
  only declared variables and every required one; references name declared variables,
  locals and module outputs;
- checkov: terraform/, the rendered chart (every ci values file) and the Dockerfile pass;
  the chart's skips (deploy/checkov-skips.yaml) are exactly the checks that fail without
  them; every inline skip has a reason; docs/deploy.md lists every skip;
- running: the broker started with the image's ENTRYPOINT/CMD/ENV, with the chart's
  rendered container (command, args, env incl. the downward API, volumes, probes) for
  every ci values file, and with the compose file's broker-1, substituting only
  addresses (loopback ports, the test PostgreSQL, a local S3 server or, while the
  broker has no s3:// store, a directory) and paths (temp dirs); each becomes ready,
  answers its probes, reports the broker id, zone and advertised address it was given,
  serves a real producer and consumer, and exits 0 on SIGTERM.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import (REPO_ROOT, Broker, can_connect, consume_all, create_topic,
                      free_ports, producer, unique_topic)

pytestmark = pytest.mark.timeout(300)

DEPLOY = REPO_ROOT / "deploy"
CHART = DEPLOY / "helm" / "strata"
CI_VALUES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
TERRAFORM = REPO_ROOT / "terraform"
EXAMPLE_ROOT = TERRAFORM / "examples" / "aws"
DOCS = REPO_ROOT / "docs" / "deploy.md"
SKIPS = DEPLOY / "checkov-skips.yaml"
RELEASE, NAMESPACE = "strata", "strata"
K8S_VERSIONS = ("1.29.0", "1.37.0")
# settings the chart sets itself (values.yaml has a dedicated value for each)
CHART_MANAGED = {"listen", "advertise", "http", "data-dir", "zone", "object-store", "metadata"}
# real STRATA_* variables that are not settings: the log filter and the config file
NON_SETTING_VARS = {"STRATA_LOG", "STRATA_CONFIG"}
# the node label the chart reads the zone from, set on the pod as Kubernetes >= 1.35
# (PodTopologyLabelsAdmission) does; the value the simulated node has
SIMULATED_ZONE = "zone-test"
POD_IP = "127.0.0.1"


# ---------------------------------------------------------------------------
# tools
# ---------------------------------------------------------------------------

TOOL_VARS = ("STRATA_DEPLOY_PYTHON", "STRATA_DEPLOY_HADOLINT", "STRATA_DEPLOY_SHELLCHECK",
             "STRATA_DEPLOY_CHECKOV", "STRATA_DEPLOY_COMPOSE", "STRATA_DEPLOY_MOTO_SERVER",
             "STRATA_DEPLOY_PROMTOOL")


@pytest.fixture(scope="session")
def tools() -> dict:
    """Paths of the deploy tools: from the environment (tests/run evals
    tests/deploy-tools.sh), else from running that script here."""
    found = {k: os.environ.get(k) for k in TOOL_VARS}
    if not all(found.values()):
        proc = subprocess.run(["bash", str(REPO_ROOT / "tests" / "deploy-tools.sh")],
                              capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"tests/deploy-tools.sh failed:\n{proc.stderr}"
        for line in proc.stdout.splitlines():
            m = re.fullmatch(r"export (STRATA_DEPLOY_\w+)=(.*)", line.strip())
            if m:
                found[m.group(1)] = shlex.split(m.group(2))[0]
    missing = [k for k in TOOL_VARS if not found.get(k) or not Path(found[k]).exists()]
    assert not missing, f"deploy tools missing: {missing}"
    return found


def helper(tools: dict, *args: str, stdin: str | None = None, timeout: float = 180):
    proc = subprocess.run([tools["STRATA_DEPLOY_PYTHON"], str(REPO_ROOT / "tests" / "deploy_helper.py"),
                           *args], input=stdin, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"deploy_helper {args[0]} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def load_yaml(tools: dict, path: Path) -> list:
    return helper(tools, "yaml", str(path))


# ---------------------------------------------------------------------------
# the broker's own settings
# ---------------------------------------------------------------------------

def run_help(strata_bin: Path) -> str:
    return subprocess.run([str(strata_bin), "serve", "--help"], capture_output=True, text=True,
                          check=True, timeout=30).stdout


@pytest.fixture(scope="module")
def settings(strata_bin) -> dict:
    """`strata serve --help` as {setting: {flag, env, default}} plus the other flags."""
    out = {}
    flags = set()
    help_text = run_help(strata_bin)
    for m in re.finditer(r"^\s+(--[a-z0-9-]+)(?: <[A-Z]+>)?\n\s+(.*?)(?=^\s+(?:-|$))", help_text,
                         re.S | re.M):
        flag, text = m.group(1), " ".join(m.group(2).split())
        flags.add(flag)
        s = re.search(r"\[setting ([^;\]]+)(?:; default ([^\]]*))?\]", text)
        e = re.search(r"\[env: (STRATA_[A-Z0-9_]+)=", text)
        if s:
            out[s.group(1)] = {"flag": flag, "env": e.group(1) if e else None,
                               "default": s.group(2)}
    assert len(out) >= 40, f"could not parse settings out of `strata serve --help`:\n{help_text}"
    return {"settings": out, "flags": flags | {"--help", "-h"},
            "envs": {v["env"] for v in out.values()}, "help": help_text}


def broker_supports_s3(settings: dict) -> bool:
    return "s3://" in settings["help"]


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------

def parse_dockerfile(path: Path) -> list[dict]:
    """Stages of a Dockerfile: [{from, name, instructions: [(INSTR, text)]}]."""
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[dict] = []
    for line in logical:
        instr, _, rest = line.strip().partition(" ")
        instr = instr.upper()
        rest = rest.strip()
        if instr == "FROM":
            parts = rest.split()
            parts = [p for p in parts if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"from": parts[0], "name": name, "instructions": []})
        else:
            assert stages, f"{instr} before FROM in {path}"
            stages[-1]["instructions"].append((instr, rest))
    return stages


def exec_form(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)
    return ["/bin/sh", "-c", text]


def dockerfile_runtime(path: Path = DOCKERFILE) -> dict:
    """What the final stage configures: env, entrypoint, cmd, user, workdir, volumes,
    exposed ports, health check, and the files COPYed from the build context."""
    stages = parse_dockerfile(path)
    final = stages[-1]
    rt = {"stages": stages, "from": final["from"], "env": {}, "entrypoint": [], "cmd": [],
          "user": None, "workdir": "/", "volumes": [], "expose": [], "healthcheck": None,
          "context_copies": {}}
    for instr, rest in final["instructions"]:
        if instr == "ENV":
            for tok in shlex.split(rest):
                k, _, v = tok.partition("=")
                rt["env"][k] = v
        elif instr == "ENTRYPOINT":
            rt["entrypoint"] = exec_form(rest)
            rt["cmd"] = []  # ENTRYPOINT resets CMD
        elif instr == "CMD":
            rt["cmd"] = exec_form(rest)
        elif instr == "USER":
            rt["user"] = rest
        elif instr == "WORKDIR":
            rt["workdir"] = rest
        elif instr == "VOLUME":
            rt["volumes"] += json.loads(rest) if rest.startswith("[") else rest.split()
        elif instr == "EXPOSE":
            rt["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif instr == "HEALTHCHECK":
            opts, _, cmd = rest.partition("CMD ")
            rt["healthcheck"] = {"options": opts.split(), "cmd": exec_form(cmd)}
        elif instr == "COPY":
            toks = shlex.split(rest)
            if any(t.startswith("--from") for t in toks):
                continue
            toks = [t for t in toks if not t.startswith("--")]
            for src in toks[:-1]:
                rt["context_copies"][toks[-1]] = src
    return rt


def dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its
    parent directories decides."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip().rstrip("/").lstrip("/")
        if not p:
            continue
        rx = "^" + re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*") \
            .replace(r"\*", "[^/]*").replace(r"\?", "[^/]") + "$"
        if any(re.match(rx, c) for c in candidates):
            excluded = not neg
    return excluded


def test_dockerfile_hadolint_and_shape(tools):
    proc = subprocess.run([tools["STRATA_DEPLOY_HADOLINT"], str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip(), f"hadolint:\n{proc.stdout}{proc.stderr}"

    rt = dockerfile_runtime()
    stages = rt["stages"]
    assert len(stages) >= 2, "a multi-stage build: the toolchain stays out of the runtime image"
    builder = stages[0]
    assert builder["from"].startswith("rust:1.95"), builder["from"]
    runs = " ".join(t for i, t in builder["instructions"] if i == "RUN")
    assert "cargo build --release --locked" in runs
    for stage in stages:
        image = stage["from"]
        if any(image == s["name"] for s in stages):
            continue
        assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"
    assert not rt["from"].startswith("rust"), "the runtime stage must not be the toolchain image"

    # the builder copies everything the workspace needs, and .dockerignore keeps it
    copied = set()
    for instr, rest in builder["instructions"]:
        if instr == "COPY":
            toks = [t for t in shlex.split(rest) if not t.startswith("--")]
            copied |= {t.rstrip("/") for t in toks[:-1]}
    cargo = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())
    needed = {"Cargo.toml", "Cargo.lock", "rust-toolchain.toml", "src"}
    needed |= {m for m in cargo["workspace"]["members"] if m != "."}
    needed |= {d["path"] for d in cargo.get("dependencies", {}).values()
               if isinstance(d, dict) and "path" in d}
    for patches in cargo.get("patch", {}).values():
        needed |= {d["path"] for d in patches.values() if "path" in d}
    uncovered = [n for n in needed if not any(n == c or n.startswith(c + "/") for c in copied)]
    assert not uncovered, f"the builder stage does not COPY {uncovered}"
    ignore = [ln.strip() for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
              if ln.strip() and not ln.strip().startswith("#")]
    sources = set(copied) | set(rt["context_copies"].values())
    for src in sorted(sources):
        path = REPO_ROOT / src
        assert path.exists(), f"COPY source {src} does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                               and "target" not in p.relative_to(REPO_ROOT).parts]
        dropped = [str(f.relative_to(REPO_ROOT)) for f in files
                   if dockerignore_excludes(str(f.relative_to(REPO_ROOT)), ignore)]
        assert not dropped, f".dockerignore drops files the build copies: {dropped[:5]}"
    assert dockerignore_excludes("target/release/strata", ignore)
    assert dockerignore_excludes(".git/HEAD", ignore)

    # runtime: non-root numeric user, data dir a volume, health check, entrypoint
    uid = (rt["user"] or "").split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"USER must be a numeric non-root id, not {rt['user']!r}"
    data_dir = rt["env"].get("STRATA_DATA_DIR")
    assert data_dir and data_dir in rt["volumes"], "the data directory must be a VOLUME"
    assert rt["workdir"] == data_dir
    assert rt["entrypoint"][:2] == ["/usr/local/bin/strata", "serve"], rt["entrypoint"]
    for var in ("STRATA_LISTEN", "STRATA_HTTP"):
        host, _, port = rt["env"][var].rpartition(":")
        assert host == "0.0.0.0", f"{var} must listen on every interface in a container"
        assert int(port) in rt["expose"], f"{var} port {port} is not EXPOSEd"
    hc = rt["healthcheck"]
    assert hc and hc["cmd"], "HEALTHCHECK missing"
    script = rt["context_copies"].get(hc["cmd"][0])
    assert script, f"the health check command {hc['cmd'][0]} is not COPYed from the repository"
    assert "/readyz" in (REPO_ROOT / script).read_text()


# ---------------------------------------------------------------------------
# configuration names
# ---------------------------------------------------------------------------

def readme_reference() -> dict:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = {"flag": cells[1].strip("`"), "env": cells[2].strip("`"),
                                         "default": cells[3].strip("`")}
    return rows


def test_config_reference_matches_the_broker(settings):
    """The README's configuration reference is the broker's: same settings, flags,
    variables and defaults as `strata serve --help`."""
    readme = readme_reference()
    code = settings["settings"]
    assert set(readme) == set(code), (
        f"README configuration reference and `strata serve --help` differ: only in README "
        f"{sorted(set(readme) - set(code))}, only in the broker {sorted(set(code) - set(readme))}")
    for name, row in code.items():
        r = readme[name]
        assert (r["flag"], r["env"]) == (row["flag"], row["env"]), f"{name}: README {r} vs broker {row}"
        want = row["default"] if row["default"] is not None else "(derived)"
        assert r["default"] == want, f"{name}: README default {r['default']!r}, broker {want!r}"


STRATA_VAR = re.compile(r"\bSTRATA_[A-Z0-9_]+\b")
SERVE_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")


def test_every_strata_variable_and_flag_is_real(tools, settings, rendered, compose):
    """No deployment file or doc names a STRATA_* variable or a `strata serve` flag that
    the broker does not have."""
    real = settings["envs"] | NON_SETTING_VARS
    used: dict[str, set] = {}

    def note(var, where):
        used.setdefault(var, set()).add(where)

    for var in dockerfile_runtime()["env"]:
        note(var, "deploy/Dockerfile ENV")
    for name, r in rendered.items():
        for d in deployments(r):
            for e in broker_container(d)["env"]:
                if e["name"].startswith("STRATA_"):
                    note(e["name"], f"chart ({name})")
    for svc_name, svc in compose["services"].items():
        for var in (svc.get("environment") or {}):
            if var.startswith("STRATA_"):
                note(var, f"compose service {svc_name}")
    texts = {p: p.read_text() for p in [DOCS, *CHART.rglob("*.yaml"), *CHART.rglob("*.tpl"),
                                        *CHART.rglob("*.txt"), COMPOSE_FILE, DOCKERFILE,
                                        *TERRAFORM.rglob("*.tf"), *DEPLOY.glob("*.md")]}
    for path, text in texts.items():
        for var in STRATA_VAR.findall(text):
            note(var, str(path.relative_to(REPO_ROOT)))
    unknown = {v: sorted(w) for v, w in used.items() if v not in real}
    assert not unknown, f"STRATA_* variables that are not broker settings: {unknown}"
    assert {"STRATA_LISTEN", "STRATA_HTTP", "STRATA_DATA_DIR", "STRATA_ADVERTISE", "STRATA_ZONE",
            "STRATA_OBJECT_STORE", "STRATA_METADATA"} <= set(used)

    # flags: compose commands, chart extraArgs, and `strata serve` lines of the docs
    flags = {}
    for svc_name, svc in compose["services"].items():
        if svc_name.startswith("broker"):
            for f in SERVE_FLAG.findall(" ".join(svc.get("command") or [])):
                flags.setdefault(f, set()).add(f"compose {svc_name}")
    for name, r in rendered.items():
        for d in deployments(r):
            for f in SERVE_FLAG.findall(" ".join(broker_container(d).get("args") or [])):
                flags.setdefault(f, set()).add(f"chart ({name})")
    for line in DOCS.read_text().splitlines():
        if "strata serve" in line:
            for f in SERVE_FLAG.findall(line.split("strata serve", 1)[1]):
                flags.setdefault(f, set()).add("docs/deploy.md")
    unknown = {f: sorted(w) for f, w in flags.items() if f not in settings["flags"]}
    assert not unknown, f"`strata serve` flags that do not exist: {unknown}"


def test_chart_values_schema_admits_exactly_the_settings(tools, settings):
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["config"]["propertyNames"]["enum"])
    want = set(settings["settings"]) - CHART_MANAGED
    assert allowed == want, (
        "deploy/helm/strata/values.schema.json config keys differ from the broker's settings "
        f"(minus those the chart sets): add {sorted(want - allowed)}, remove {sorted(allowed - want)}")
    # the chart's guard names the same managed settings
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    guarded = set(re.search(r'has \$key \(list ([^)]*)\)', helpers).group(1).replace('"', "").split())
    assert guarded == CHART_MANAGED


# ---------------------------------------------------------------------------
# shell scripts
# ---------------------------------------------------------------------------

def shell_scripts() -> list[Path]:
    skip = {".git", "target", "node_modules"}
    out = []
    for p in REPO_ROOT.rglob("*"):
        if not p.is_file() or skip & set(p.relative_to(REPO_ROOT).parts):
            continue
        if p.suffix in (".sh", ".bash"):
            out.append(p)
            continue
        try:
            with open(p, "rb") as f:
                first = f.readline(200)
        except OSError:
            continue
        if re.match(rb"#!\s*\S*(/|env\s+)(ba|da|k)?sh\b", first):
            out.append(p)
    return sorted(out)


def test_shellcheck(tools, rendered, compose, tmp_path):
    scripts = shell_scripts()
    names = {str(p.relative_to(REPO_ROOT)) for p in scripts}
    assert {"tests/run", "tests/postgres.sh", ".ci/run", "tests/deploy-tools.sh",
            "deploy/healthcheck.sh"} <= names, names
    # scripts embedded in the chart (as the container runs them: $$ is Kubernetes' escape)
    # and in the compose file (as compose hands them over)
    embedded = []
    for name, r in rendered.items():
        for d in deployments(r):
            cmd = broker_container(d).get("command") or []
            if cmd[:2] in (["/bin/bash", "-c"], ["/bin/sh", "-c"]):
                p = tmp_path / f"chart-{name}-{d['metadata']['name']}.sh"
                p.write_text(f"#!{cmd[0]}\n" + k8s_expand(cmd[2], {}) + "\n")
                embedded.append(p)
    for svc_name, svc in compose["services"].items():
        if (svc.get("entrypoint") or [])[:2] == ["/bin/sh", "-c"]:
            p = tmp_path / f"compose-{svc_name}.sh"
            p.write_text("#!/bin/sh\n" + " ".join(svc["command"]).replace("$$", "$") + "\n")
            embedded.append(p)
    assert embedded, "no embedded script found (the chart's broker-id wrapper, the compose bucket job)"
    proc = subprocess.run([tools["STRATA_DEPLOY_SHELLCHECK"], *map(str, scripts), *map(str, embedded)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"shellcheck:\n{proc.stdout}{proc.stderr}"


# ---------------------------------------------------------------------------
# compose
# ---------------------------------------------------------------------------

def compose_config(tools, path: Path, *args: str) -> subprocess.CompletedProcess:
    """`docker-compose -f path config ARGS`, failing on any complaint: the Compose v2
    wrapper exits 0 on a schema error and only prints it."""
    env = {k: v for k, v in os.environ.items() if k not in ("ADVERTISE_HOST", "BROKER_IMAGE")}
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"  # no engine, none needed
    proc = subprocess.run([tools["STRATA_DEPLOY_COMPOSE"], "-f", str(path), "config", *args],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), \
        f"docker-compose config {' '.join(args)} on {path.name}:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def compose(tools) -> dict:
    compose_config(tools, COMPOSE_FILE, "--quiet")
    return json.loads(compose_config(tools, COMPOSE_FILE, "--format", "json").stdout)


def test_compose_check_fails_on_a_schema_error(tools, tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  broker:\n    image: strata\n    ports: {wrong: [9092]}\n")
    with pytest.raises(AssertionError, match="must be a"):
        compose_config(tools, bad, "--quiet")


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def test_compose_file(tools, compose):
    services = compose["services"]
    brokers = {n: s for n, s in services.items() if n.startswith("broker")}
    assert len(brokers) == 3, sorted(services)
    image = dockerfile_runtime()
    kafka_port = int(image["env"]["STRATA_LISTEN"].rpartition(":")[2])
    http_port = int(image["env"]["STRATA_HTTP"].rpartition(":")[2])
    ids, zones, adverts = set(), set(), set()
    for name, svc in brokers.items():
        build = svc["build"]
        assert Path(build["context"]).resolve() == REPO_ROOT
        assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE
        args = svc["command"]
        ids.add(flag_value(args, "--broker-id"))
        zones.add(flag_value(args, "--zone"))
        advert = flag_value(args, "--advertise")
        adverts.add(advert)
        host, _, port = advert.rpartition(":")
        published = [p for p in svc["ports"] if int(p["target"]) == kafka_port]
        assert published and int(published[0]["published"]) == int(port) \
            and published[0].get("host_ip") == host, \
            f"{name} advertises {advert} but publishes {svc['ports']}"
        deps = svc["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["bucket"]["condition"] == "service_completed_successfully"
        env = svc["environment"]
        # object store: the bucket the bucket job creates, on the S3 service, with its keys
        store = urllib.parse.urlparse(env["STRATA_OBJECT_STORE"])
        assert store.scheme == "s3"
        bucket_cmd = " ".join(services["bucket"]["command"])
        assert f"mb --ignore-existing local/{store.netloc}" in bucket_cmd
        endpoint = urllib.parse.urlparse(env["AWS_ENDPOINT_URL"])
        assert endpoint.hostname in services and endpoint.scheme == "http" \
            and env["AWS_ALLOW_HTTP"] == "true"
        s3 = services[endpoint.hostname]
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == \
            (s3["environment"]["MINIO_ROOT_USER"], s3["environment"]["MINIO_ROOT_PASSWORD"])
        assert f"http://{endpoint.hostname}:{endpoint.port}" in bucket_cmd
        # metadata: the postgres service, its user, password and database
        meta = urllib.parse.urlparse(env["STRATA_METADATA"])
        pg = services[meta.hostname]["environment"]
        assert (meta.username, meta.password, meta.path.lstrip("/"), meta.port) == \
            (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"], 5432)
        vols = [v for v in svc["volumes"] if v["target"] == image["env"]["STRATA_DATA_DIR"]]
        assert vols and vols[0]["type"] == "volume", f"{name}: the cache needs its own volume"
    assert len(ids) == len(zones) == len(adverts) == 3, (ids, zones, adverts)

    # every bind mount exists
    for name, svc in services.items():
        for v in svc.get("volumes") or []:
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), f"{name} mounts missing {v['source']}"

    # Prometheus scrapes every broker under a strata* job, with the alert rules mounted
    prom_svc = services["prometheus"]
    mounts = {v["target"]: Path(v["source"]) for v in prom_svc["volumes"] if v["type"] == "bind"}
    cfg_path = mounts["/etc/prometheus/prometheus.yml"]
    assert cfg_path == COMPOSE_DIR / "prometheus.yml"
    proc = subprocess.run([tools["STRATA_DEPLOY_PROMTOOL"], "check", "config", "--syntax-only",
                           str(cfg_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"promtool check config:\n{proc.stdout}{proc.stderr}"
    cfg = load_yaml(tools, cfg_path)[0]
    targets = set()
    for job in cfg["scrape_configs"]:
        assert job["job_name"].startswith("strata"), "the alert rules select job=~\"strata.*\""
        for sc in job["static_configs"]:
            targets |= set(sc["targets"])
    assert targets == {f"{n}:{http_port}" for n in brokers}, targets
    rule_globs = cfg["rule_files"]
    rules_mounted = [t for t, src in mounts.items() if src == REPO_ROOT / "dashboards" / "alerts.yml"]
    assert rules_mounted and any(fnmatch.fnmatch(rules_mounted[0], g) for g in rule_globs)

    # Grafana: Prometheus as default data source, the dashboards folder provisioned
    graf = services["grafana"]
    gm = {v["target"]: Path(v["source"]) for v in graf["volumes"] if v["type"] == "bind"}
    prov = gm["/etc/grafana/provisioning"]
    ds = load_yaml(tools, prov / "datasources" / "prometheus.yml")[0]["datasources"]
    default = [d for d in ds if d.get("isDefault")]
    assert len(default) == 1 and default[0]["type"] == "prometheus"
    url = urllib.parse.urlparse(default[0]["url"])
    assert url.hostname == "prometheus" and url.port == 9090
    providers = load_yaml(tools, prov / "dashboards" / "strata.yml")[0]["providers"]
    path = providers[0]["options"]["path"]
    # every dashboard of dashboards/ provisioned: the folder mounted at the provider's
    # path (or files mounted inside it); Grafana's file provider loads the *.json files
    provisioned = {}
    for target, src in gm.items():
        if target == path and src.is_dir():
            provisioned.update({f.name: f for f in src.glob("*.json")})
        elif target.startswith(path + "/") and src.suffix == ".json":
            provisioned[target[len(path) + 1:]] = src
    expected = {f.name: f for f in (REPO_ROOT / "dashboards").glob("*.json")}
    assert expected and {n: f.resolve() for n, f in provisioned.items()} == \
        {n: f.resolve() for n, f in expected.items()}, sorted(provisioned)
    # the home dashboard is the provisioned overview
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/strata-overview.json" and "strata-overview.json" in provisioned, home


# ---------------------------------------------------------------------------
# chart
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(tools) -> dict:
    out = {}
    for name in CI_VALUES:
        r = helper(tools, "helm-render", str(CHART), str(CHART / "ci" / name), RELEASE, NAMESPACE)
        assert r["error"] is None, f"rendering ci/{name}: {r['error']}"
        r["values"] = load_yaml(tools, CHART / "ci" / name)[0]
        out[name] = r
    assert {"default-values.yaml", "full-values.yaml"} <= set(out), CI_VALUES
    return out


def objs(r: dict, kind: str) -> list[dict]:
    return [d["doc"] for d in r["docs"] if d["doc"]["kind"] == kind]


def deployments(r: dict) -> list[dict]:
    return objs(r, "Deployment")


def broker_container(dep: dict) -> dict:
    cs = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "broker"]
    assert len(cs) == 1
    return cs[0]


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels/matchExpressions, or a plain map) matches."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return False  # an empty selector is not what any of these objects should carry
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        op, key, vals = e["operator"], e["key"], e.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def values_of(r: dict) -> dict:
    """The chart's values.yaml merged with the ci file (enough for what the tests read)."""
    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: merge(a.get(k), b[k]) if k in b else a[k] for k in set(a) | set(b)}
        return b
    return merge(CHART_DEFAULTS, r["values"])


CHART_DEFAULTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def chart_defaults(tools):
    CHART_DEFAULTS.clear()
    CHART_DEFAULTS.update(load_yaml(tools, CHART / "values.yaml")[0])


@pytest.mark.parametrize("values", CI_VALUES)
def test_helm_lint_strict(tools, values):
    report = helper(tools, "helm-lint", str(CHART), str(CHART / "ci" / values))
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], f"helm lint --strict ci/{values}: {problems} {report['errors']}"


def test_helm_lint_strict_chart_defaults(tools):
    report = helper(tools, "helm-lint", str(CHART), "-")
    assert not [m for m in report["messages"] if m["severity"] >= 2] and not report["errors"], report


DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
SERVICEMONITOR_ENDPOINT_KEYS = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
                                "metricRelabelings", "honorLabels", "tlsConfig"}


def check_servicemonitor_shape(sm: dict) -> None:
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    spec = sm["spec"]
    assert set(spec) <= {"jobLabel", "namespaceSelector", "selector", "endpoints", "targetLabels",
                         "podTargetLabels", "sampleLimit"}, set(spec)
    assert spec["selector"].get("matchLabels"), "a ServiceMonitor without a selector scrapes everything"
    assert set(spec["namespaceSelector"]) <= {"matchNames", "any"}
    assert spec["endpoints"]
    for ep in spec["endpoints"]:
        assert set(ep) <= SERVICEMONITOR_ENDPOINT_KEYS, set(ep)
        assert isinstance(ep["port"], str) and ep["path"].startswith("/")
        assert ep.get("scheme", "http") in ("http", "https")
        for k in ("interval", "scrapeTimeout"):
            if k in ep:
                assert DURATION.match(ep[k]), f"{k}={ep[k]!r} is not a Prometheus duration"


def seconds(d: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", d))


def check_prometheusrule_shape(rule: dict) -> None:
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    for g in rule["spec"]["groups"]:
        assert set(g) <= {"name", "rules", "interval", "limit"} and g["name"] and g["rules"]
        for r in g["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels",
                              "annotations"}, set(r)
            assert ("alert" in r) != ("record" in r)
            assert isinstance(r["expr"], str) and r["expr"].strip()
            if "for" in r:
                assert DURATION.match(r["for"])
            for k in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in (r.get(k) or {}).values())


@pytest.mark.parametrize("values", CI_VALUES)
def test_chart_manifests_validate(tools, rendered, values, tmp_path):
    r = rendered[values]
    docs = [d["doc"] for d in r["docs"]]
    crds = [d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")]
    core = [d for d in docs if d not in crds]
    for version in K8S_VERSIONS:
        errors = helper(tools, "k8s-validate", version, stdin=json.dumps(core))
        bad = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d, e in zip(core, errors) if e]
        assert not bad, f"ci/{values} against Kubernetes {version}:\n" + "\n".join(bad)
    for d in docs:
        assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"
    for sm in objs(r, "ServiceMonitor"):
        check_servicemonitor_shape(sm)
    for rule in objs(r, "PrometheusRule"):
        check_prometheusrule_shape(rule)
        rules_file = tmp_path / "rules.yml"
        rules_file.write_text(json.dumps({"groups": rule["spec"]["groups"]}))  # JSON is YAML
        proc = subprocess.run([tools["STRATA_DEPLOY_PROMTOOL"], "check", "rules", str(rules_file)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"promtool check rules (PrometheusRule):\n{proc.stdout}{proc.stderr}"
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service"} <= kinds


def k8s_expand(text: str, env: dict) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ is a literal $,
    anything else stays as written."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "$" and i + 1 < len(text):
            n = text[i + 1]
            if n == "$":
                out.append("$")
                i += 2
                continue
            if n == "(":
                j = text.find(")", i + 2)
                if j != -1:
                    name = text[i + 2:j]
                    out.append(env[name] if name in env else text[i:j + 1])
                    i = j + 1
                    continue
        out.append(c)
        i += 1
    return "".join(out)


@pytest.mark.parametrize("values", CI_VALUES)
def test_chart_wiring(tools, settings, rendered, values):
    """What selects what, which ports are named, and how each broker learns its zone,
    address, id, data directory and settings."""
    r = rendered[values]
    v = values_of(r)
    # every `config` entry becomes its setting's own variable, the value as written
    for d in deployments(r):
        env = {e["name"]: e.get("value") for e in broker_container(d)["env"]}
        for key, val in (v.get("config") or {}).items():
            want = {True: "true", False: "false"}.get(val, str(val)) if isinstance(val, bool) else str(val)
            var = settings["settings"][key]["env"]
            assert env.get(var) == want, f"config.{key}={val!r} rendered as {var}={env.get(var)!r}"
    deps = deployments(r)
    image = dockerfile_runtime()
    zones = v.get("zones") or []
    assert len(deps) == max(1, len(zones))
    pods = []
    for d in deps:
        tmpl = d["spec"]["template"]
        labels = tmpl["metadata"]["labels"]
        pods.append((d["metadata"]["name"], labels))
        assert selects(d["spec"]["selector"], labels), f"{d['metadata']['name']} does not select its pods"
    # no Deployment's selector matches another Deployment's pods
    for d in deps:
        for name, labels in pods:
            if name != d["metadata"]["name"]:
                assert not selects(d["spec"]["selector"], labels), f"{d['metadata']['name']} selects {name}'s pods"

    def select_all_brokers(selector, what):
        for name, labels in pods:
            assert selects(selector, labels), f"{what} does not select the pods of {name}"

    for d in deps:
        spec = d["spec"]["template"]["spec"]
        c = broker_container(d)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"kafka": v["ports"]["kafka"], "http": v["ports"]["http"]}
        env_list = c["env"]
        env = {e["name"]: e for e in env_list}
        # probes on the HTTP port
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path and get["port"] in ("http", ports["http"]), (probe, get)
        assert env["STRATA_HTTP"]["value"].endswith(f":{ports['http']}")
        assert env["STRATA_LISTEN"]["value"] == f"0.0.0.0:{ports['kafka']}"
        # per-pod advertised address from the downward API (POD_IP defined before use)
        names = [e["name"] for e in env_list]
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["STRATA_ADVERTISE"]["value"] == f"$(POD_IP):{ports['kafka']}"
        assert names.index("POD_IP") < names.index("STRATA_ADVERTISE")
        # the data directory: a volume of the selected cache type, where the image has it
        data_dir = env["STRATA_DATA_DIR"]["value"]
        assert data_dir == image["env"]["STRATA_DATA_DIR"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        vol = {x["name"]: x for x in spec["volumes"]}[mounts[data_dir]]
        if v["cache"]["type"] == "ephemeral":
            claim = vol["ephemeral"]["volumeClaimTemplate"]["spec"]
            assert claim["resources"]["requests"]["storage"] == v["cache"]["size"]
            if v["cache"].get("storageClassName"):
                assert claim["storageClassName"] == v["cache"]["storageClassName"]
        else:
            assert vol["emptyDir"]["sizeLimit"] == v["cache"]["size"]
        # zone: per-zone Deployments pin the zone and name it; otherwise the pod's label
        zone = d["metadata"]["labels"].get("strata-zone")
        if zones:
            assert zone in zones and env["STRATA_ZONE"]["value"] == zone
            terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            for t in terms:
                assert {"key": v["zoneLabel"], "operator": "In", "values": [zone]} in t["matchExpressions"]
        else:
            ref = env["STRATA_ZONE"]["valueFrom"]["fieldRef"]["fieldPath"]
            assert ref == f"metadata.labels['{v['zoneLabel']}']"
            keys = [t["topologyKey"] for t in spec["topologySpreadConstraints"]]
            assert v["zoneLabel"] in keys, "brokers must spread across zones"
        for t in spec["topologySpreadConstraints"]:
            assert selects(t["labelSelector"], d["spec"]["template"]["metadata"]["labels"])
        # the image's user, a long graceful shutdown
        uid = int(image["user"].split(":")[0])
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == uid
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert spec["terminationGracePeriodSeconds"] >= 60
        # secrets and service account exist (rendered) or are declared external in values
        rendered_secrets = {s["metadata"]["name"] for s in objs(r, "Secret")}
        for e in env_list:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                sec = [s for s in objs(r, "Secret") if s["metadata"]["name"] == ref["name"]]
                if sec:
                    assert ref["key"] in sec[0]["data"]
                else:
                    assert ref["name"] == v["metadata"]["existingSecret"], ref
        for ef in c.get("envFrom") or []:
            name = ef["secretRef"]["name"]
            assert name in rendered_secrets or name in (v["objectStore"]["credentialsSecret"],
                                                        *[x.get("secretRef", {}).get("name") for x in v["extraEnvFrom"]])
        sa = spec["serviceAccountName"]
        if v["serviceAccount"]["create"]:
            assert sa in {s["metadata"]["name"] for s in objs(r, "ServiceAccount")}
        else:
            assert sa == v["serviceAccount"]["name"]
        assert ("replicas" in d["spec"]) == (not v["autoscaling"]["enabled"])

    container_ports = {p["name"] for p in broker_container(deps[0])["ports"]}
    # Services select every broker pod; their targetPorts name container ports
    services = objs(r, "Service")
    assert {s["metadata"]["labels"]["strata-service"] for s in services} == {"bootstrap", "headless"}
    for s in services:
        select_all_brokers(s["spec"]["selector"], f"Service {s['metadata']['name']}")
        for p in s["spec"]["ports"]:
            assert p["targetPort"] in container_ports, p
        if s["metadata"]["labels"]["strata-service"] == "headless":
            assert s["spec"]["clusterIP"] == "None"
    for pdb in objs(r, "PodDisruptionBudget"):
        select_all_brokers(pdb["spec"]["selector"], "PodDisruptionBudget")
        assert pdb["spec"]["maxUnavailable"] == 1
    assert bool(objs(r, "PodDisruptionBudget")) == v["podDisruptionBudget"]["enabled"]
    for np in objs(r, "NetworkPolicy"):
        select_all_brokers(np["spec"]["podSelector"], "NetworkPolicy")
        allowed = {p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]}
        assert allowed == container_ports
    # one HPA per Deployment, CPU and (optionally) bytes in, slow scale-down
    hpas = objs(r, "HorizontalPodAutoscaler")
    if v["autoscaling"]["enabled"]:
        assert sorted(h["spec"]["scaleTargetRef"]["name"] for h in hpas) == sorted(d["metadata"]["name"] for d in deps)
        for h in hpas:
            assert h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            kinds = {(m["type"], (m.get("resource") or {}).get("name")) for m in h["spec"]["metrics"]}
            assert ("Resource", "cpu") in kinds
            assert any(m["type"] == "Pods" for m in h["spec"]["metrics"]) == v["autoscaling"]["bytesInPerBroker"]["enabled"]
            down = h["spec"]["behavior"]["scaleDown"]
            assert down["stabilizationWindowSeconds"] >= 300
            assert all(p["type"] == "Pods" and p["value"] <= 1 and p["periodSeconds"] >= 60
                       for p in down["policies"]), down
        for d in deps:
            assert d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"], \
                "CPU utilization needs a CPU request"
    else:
        assert not hpas
    # ServiceMonitor: exactly the headless Service, a port it has, a strata* job
    for sm in objs(r, "ServiceMonitor"):
        chosen = [s for s in services if selects(sm["spec"]["selector"], s["metadata"]["labels"])]
        assert [s["metadata"]["labels"]["strata-service"] for s in chosen] == ["headless"]
        svc_ports = {p["name"]: p for p in chosen[0]["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            assert ep["port"] in svc_ports and svc_ports[ep["port"]]["targetPort"] == "http"
            assert ep["path"] == "/metrics"
            assert seconds(ep["scrapeTimeout"]) <= seconds(ep["interval"])
        job = chosen[0]["metadata"]["labels"][sm["spec"]["jobLabel"]]
        assert job.startswith("strata"), f"job {job!r}: the alert rules select job=~\"strata.*\""
        assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    assert bool(objs(r, "ServiceMonitor")) == v["serviceMonitor"]["enabled"]
    # PrometheusRule and dashboard ConfigMap carry dashboards/ as it is
    alerts = load_yaml(tools, REPO_ROOT / "dashboards" / "alerts.yml")[0]
    for rule in objs(r, "PrometheusRule"):
        assert rule["spec"]["groups"] == alerts["groups"]
    assert bool(objs(r, "PrometheusRule")) == v["prometheusRule"]["enabled"]
    expected = {f.name: json.loads(f.read_text()) for f in (REPO_ROOT / "dashboards").glob("*.json")}
    dashboards = [c for c in objs(r, "ConfigMap")
                  if any(k.endswith(".json") for k in c.get("data") or {})]
    carried = {}
    for cm in dashboards:
        assert cm["metadata"]["labels"].get("grafana_dashboard") == "1"
        for name, text in cm["data"].items():
            assert name not in carried, f"{name} in two ConfigMaps"
            carried[name] = json.loads(text)
    if v["grafanaDashboard"]["enabled"]:
        assert carried == expected, f"dashboard ConfigMaps carry {sorted(carried)}, not {sorted(expected)}"
    else:
        assert not dashboards


def test_chart_copies_of_dashboards_are_identical():
    originals = ["alerts.yml"] + sorted(f.name for f in (REPO_ROOT / "dashboards").glob("*.json"))
    copies = sorted(f.name for f in (CHART / "files").iterdir())
    assert copies == sorted(originals), \
        f"deploy/helm/strata/files/ holds {copies}, dashboards/ has {sorted(originals)}"
    for name in originals:
        assert (CHART / "files" / name).read_bytes() == (REPO_ROOT / "dashboards" / name).read_bytes(), \
            f"deploy/helm/strata/files/{name} differs from dashboards/{name}: copy it again"


def test_chart_refuses_bad_values(tools, tmp_path):
    def render(values: dict | None):
        if values is None:
            return helper(tools, "helm-render", str(CHART), "-", RELEASE, NAMESPACE)["error"]
        p = tmp_path / f"v-{uuid.uuid4().hex[:6]}.yaml"
        p.write_text(json.dumps(values))
        return helper(tools, "helm-render", str(CHART), str(p), RELEASE, NAMESPACE)["error"]

    base = {"objectStore": {"url": "s3://b/p"}, "metadata": {"url": "postgres://u:p@h:5432/d"}}
    assert render(base) is None
    assert "objectStore.url is required" in (render(None) or "")
    assert "metadata.url" in (render({"objectStore": {"url": "s3://b/p"}}) or "")
    assert "wal.flush.intervl.ms" in (render({**base, "config": {"wal.flush.intervl.ms": 5}}) or "")
    assert "listen" in (render({**base, "config": {"listen": "0.0.0.0:1"}}) or "")
    assert "brokerIdFromPodIP" in (render({**base, "config": {"broker-id": 3}}) or "")
    assert render({**base, "config": {"broker-id": 3}, "brokerIdFromPodIP": False}) is None
    assert "cache" in (render({**base, "cache": {"type": "hostPath", "size": "1Gi"}}) or "")
    assert "not both" in (render({**base, "metadata": {"url": "postgres://a@b/c", "existingSecret": "s"}}) or "")


# ---------------------------------------------------------------------------
# terraform
# ---------------------------------------------------------------------------

def tf_dirs() -> list[Path]:
    return sorted({p.parent for p in TERRAFORM.rglob("*.tf") if ".terraform" not in p.parts})


def test_terraform_fmt(tools, tmp_path):
    r = helper(tools, "tf-fmt", str(TERRAFORM), str(tmp_path))
    assert r["retcode"] == 0 and not r["files"], f"terraform fmt -check -recursive: {r['files']}\n{r['error']}"


def test_terraform_configuration_loads(tools, tmp_path):
    r = helper(tools, "tf-load", str(EXAMPLE_ROOT), str(tmp_path))
    init_errors = re.findall(r"Error: (.*)", r["init"]["err"] + r["init"]["out"])
    # the modules install; only the providers cannot (nothing is downloaded here)
    assert init_errors and set(init_errors) == {"Failed to query available provider packages"}, \
        f"terraform init:\n{r['init']['out']}\n{r['init']['err']}"
    modules = {m["Key"] for m in r["modules"]}
    assert modules == {"", "network", "storage", "metadata", "fleet"}, modules
    assert r["providers"]["retcode"] == 0, f"terraform providers:\n{r['providers']['err']}"
    tree = r["providers"]["out"]
    for m in ("network", "storage", "metadata", "fleet"):
        assert f"module.{m}" in tree


def strip_hcl_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(re.sub(r"(^|\s)(#|//).*$", "", line) for line in text.splitlines())


def hcl_attrs(block: dict) -> dict:
    """A parsed HCL block's attributes (the parser wraps each value in a list and adds
    line numbers)."""
    return {k: (v[0] if isinstance(v, list) and len(v) == 1 else v)
            for k, v in block.items() if not k.startswith("__")}


def test_terraform_interfaces(tools):
    """What `terraform validate` would check about the modules' interfaces, without
    providers: declared and documented variables and outputs, module calls, references."""
    parsed = {d: helper(tools, "hcl", str(d)) for d in tf_dirs()}
    assert set(parsed) >= {TERRAFORM / "modules" / m for m in ("network", "storage", "metadata", "fleet")} | {EXAMPLE_ROOT}
    interface = {}
    for d, files in parsed.items():
        variables, outputs, locals_, modules = {}, {}, set(), {}
        for f, body in files.items():
            for block in body.get("variable", []):
                for name, attrs in block.items():
                    attrs = hcl_attrs(attrs)
                    where = f"{d.relative_to(REPO_ROOT)}/{f}: variable {name}"
                    assert attrs.get("type"), f"{where} has no type"
                    assert str(attrs.get("description", "")).strip(), f"{where} has no description"
                    variables[name] = attrs
            for block in body.get("output", []):
                for name, attrs in block.items():
                    attrs = hcl_attrs(attrs)
                    assert str(attrs.get("description", "")).strip(), \
                        f"{d.relative_to(REPO_ROOT)}/{f}: output {name} has no description"
                    outputs[name] = attrs
            for block in body.get("locals", []):
                locals_ |= set(hcl_attrs(block))
            for block in body.get("module", []):
                modules.update({name: hcl_attrs(call) for name, call in block.items()})
        interface[d] = {"variables": variables, "outputs": outputs, "locals": locals_, "modules": modules}
    for d, i in interface.items():
        text = "\n".join(strip_hcl_comments(p.read_text()) for p in d.glob("*.tf"))
        for ref in set(re.findall(r"\bvar\.([A-Za-z_][\w-]*)", text)):
            assert ref in i["variables"], f"{d.relative_to(REPO_ROOT)}: var.{ref} is not declared"
        for ref in set(re.findall(r"\blocal\.([A-Za-z_][\w-]*)", text)):
            assert ref in i["locals"], f"{d.relative_to(REPO_ROOT)}: local.{ref} is not declared"
        for name, call in i["modules"].items():
            target = (d / call["source"]).resolve()
            assert target in interface, f"module {name}: source {call['source']} is not a module here"
            t = interface[target]
            args = set(call) - {"source", "version", "providers", "depends_on", "count", "for_each"}
            extra = args - set(t["variables"])
            assert not extra, f"{d.relative_to(REPO_ROOT)}: module {name} passes undeclared {sorted(extra)}"
            required = {n for n, a in t["variables"].items() if "default" not in a}
            missing = required - args
            assert not missing, f"{d.relative_to(REPO_ROOT)}: module {name} misses required {sorted(missing)}"
        for mod, out in set(re.findall(r"\bmodule\.([A-Za-z_][\w-]*)\.([A-Za-z_][\w-]*)", text)):
            assert mod in i["modules"], f"{d.relative_to(REPO_ROOT)}: module.{mod} is not called"
            target = (d / i["modules"][mod]["source"]).resolve()
            assert out in interface[target]["outputs"], f"{d.relative_to(REPO_ROOT)}: module.{mod}.{out} is not an output"
    # the example installs this repository's chart
    fleet_call = interface[EXAMPLE_ROOT]["modules"]["fleet"]
    chart_path = fleet_call["chart_path"].replace("${path.module}", str(EXAMPLE_ROOT))
    assert (Path(chart_path).resolve() / "Chart.yaml").exists(), chart_path


# ---------------------------------------------------------------------------
# checkov
# ---------------------------------------------------------------------------

CHECK_ID = re.compile(r"\bCKV2?_[A-Z0-9]+_\d+\b")


def test_checkov(tools, rendered, tmp_path):
    scan = tmp_path / "scan"
    shutil.copytree(TERRAFORM, scan / "terraform", ignore=shutil.ignore_patterns(".terraform"))
    for name, r in rendered.items():
        d = scan / "chart" / name.removesuffix(".yaml")
        d.mkdir(parents=True)
        (d / "manifests.yaml").write_text("\n---\n".join(r["texts"].values()))
    (scan / "image").mkdir()
    shutil.copy(DOCKERFILE, scan / "image" / "Dockerfile")
    proc = subprocess.run(
        [tools["STRATA_DEPLOY_CHECKOV"], "-d", str(scan), "--framework", "terraform", "kubernetes",
         "dockerfile", "--skip-download", "--output", "json", "--compact"],
        capture_output=True, text=True, timeout=240)
    assert proc.stdout.strip(), f"checkov printed nothing:\n{proc.stderr[-2000:]}"
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    by_type = {rep["check_type"]: rep for rep in reports if "check_type" in rep}
    assert {"terraform", "kubernetes", "dockerfile"} <= set(by_type), set(by_type)
    for t, rep in by_type.items():
        assert rep["summary"]["passed"] > 0, f"checkov ran no {t} check"

    skips = load_yaml(tools, SKIPS)[0]
    k8s_skips = skips["kubernetes"]
    assert all(str(reason).strip() for reason in k8s_skips.values())
    failed = {}
    for t, rep in by_type.items():
        for c in rep["results"]["failed_checks"]:
            failed.setdefault(t, {}).setdefault(c["check_id"], set()).add(f"{c['file_path']}:{c['resource']}")
    assert not failed.get("terraform"), f"checkov fails on terraform/: {failed['terraform']}"
    assert not failed.get("dockerfile"), f"checkov fails on the Dockerfile: {failed['dockerfile']}"
    k8s_failed = set(failed.get("kubernetes", {}))
    assert k8s_failed <= set(k8s_skips), \
        f"checkov fails on the chart: {({k: failed['kubernetes'][k] for k in k8s_failed - set(k8s_skips)})}"
    assert set(k8s_skips) <= k8s_failed, \
        f"deploy/checkov-skips.yaml skips checks that pass now; drop {sorted(set(k8s_skips) - k8s_failed)}"

    inline = set()
    for t, rep in by_type.items():
        for c in rep["results"]["skipped_checks"]:
            reason = (c.get("check_result") or {}).get("suppress_comment") or ""
            assert reason.strip() not in ("", "No comment provided"), \
                f"checkov skip without a reason: {c['check_id']} at {c['file_path']}"
            inline.add(c["check_id"])
    docs = DOCS.read_text()
    section = docs.split("## Skipped checkov checks", 1)
    assert len(section) == 2, "docs/deploy.md needs a '## Skipped checkov checks' section"
    listed = set(CHECK_ID.findall(section[1].split("\n## ", 1)[0]))
    every = inline | set(k8s_skips)
    assert listed == every, (f"docs/deploy.md skip list differs: missing {sorted(every - listed)}, "
                             f"stale {sorted(listed - every)}")


# ---------------------------------------------------------------------------
# running the broker as deployed
# ---------------------------------------------------------------------------

class ContainerBroker(Broker):
    """A broker process started from a container's argv and environment (already
    substituted), with the Kafka and HTTP ports it was mapped to."""

    def __init__(self, base_dir, argv: list[str], env: dict, cwd: Path, kafka_port: int,
                 http_port: int, name: str, binary: Path):
        # Broker's own __init__ picks ports, dirs and an object store; all of that is the
        # container's here, so only the state its lifecycle methods use is set
        import conftest
        self.binary = Path(binary)
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.name, self.zero_config, self.extra_env = name, False, {}
        self.host, self.port, self.http_port = "127.0.0.1", kafka_port, http_port
        self.cwd, self.data_dir = cwd, cwd
        self.log_path = self.base_dir / f"{name}.stderr.log"
        self.s3 = self.bucket = None
        self.proc = None
        self.starts, self.closed = 0, False
        self.nodeid = getattr(conftest, "_CURRENT_TEST", {}).get("nodeid")
        Broker.instances.append(self)
        self.argv, self.env = argv, env

    def args(self) -> list[str]:
        return self.argv

    def environment(self) -> dict:
        return dict(self.env)


def http_get(port: int, path: str, timeout: float = 3.0) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def wait_http(port: int, path: str, want: int = 200, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = http_get(port, path)
        if status == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"GET {path} on port {port}: {status}, wanted {want}")


@pytest.fixture(scope="module")
def postgres():
    """PostgreSQL for the metadata store: the one tests/run started
    (STRATA_TEST_POSTGRES_URL, a superuser), else a throwaway one from tests/postgres.sh."""
    started = None
    admin = os.environ.get("STRATA_TEST_POSTGRES_URL")
    if not admin:
        proc = subprocess.run(["bash", str(REPO_ROOT / "tests" / "postgres.sh")], capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, f"tests/postgres.sh:\n{proc.stderr}"
        env = dict(re.findall(r"export (\w+)=(\S+)", proc.stdout))
        admin, started = env["STRATA_TEST_POSTGRES_URL"], env["STRATA_TEST_POSTGRES_DIR"]
    url = urllib.parse.urlparse(admin)
    psql = shutil.which("psql") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))), None)
    try:
        assert psql, "psql not found"
        yield {"host": url.hostname, "port": url.port, "psql": str(psql), "admin": admin}
    finally:
        if started:
            subprocess.run(["bash", str(REPO_ROOT / "tests" / "postgres.sh"), "stop", started],
                           capture_output=True, timeout=120)


def postgres_database(pg: dict, user: str) -> str:
    """A fresh database owned by `user` (the role is created when missing)."""
    db = f"strata_{uuid.uuid4().hex[:10]}"
    sql = (f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{user}') THEN "
           f"CREATE ROLE \"{user}\" LOGIN; END IF; END $$;")
    for stmt in (sql, f'CREATE DATABASE "{db}" OWNER "{user}"'):
        proc = subprocess.run([pg["psql"], pg["admin"], "-v", "ON_ERROR_STOP=1", "-q", "-c", stmt],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    return db


@pytest.fixture(scope="module")
def s3_server(tools, settings, tmp_path_factory):
    """A local S3 server (moto) while the broker has s3:// stores; None before that,
    and the runs substitute a directory for the bucket."""
    if not broker_supports_s3(settings):
        yield None
        return
    port = free_ports(1)[0]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([tools["STRATA_DEPLOY_MOTO_SERVER"], "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not can_connect("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
        yield {"endpoint": f"http://127.0.0.1:{port}"}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def create_bucket(endpoint: str, bucket: str) -> None:
    req = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


class Substitutions:
    """Address and path substitutions from a container to this machine."""

    def __init__(self, tmp: Path, strata_bin: Path):
        self.paths: dict[str, str] = {}
        self.addrs: dict[str, str] = {}
        self.tmp = tmp
        self.strata_bin = strata_bin

    def path(self, container_path: str, local: Path | str) -> None:
        self.paths[container_path.rstrip("/")] = str(local)

    def addr(self, container_addr: str, local: str) -> None:
        self.addrs[container_addr] = local

    def apply(self, text: str) -> str:
        for a in sorted(self.addrs, key=len, reverse=True):
            text = re.sub(rf"(?<![\w.-]){re.escape(a)}(?![\w.-]|:\d)", self.addrs[a], text)
        for p in sorted(self.paths, key=len, reverse=True):
            text = re.sub(rf"(?<![\w.-]){re.escape(p)}(?![\w.-])", self.paths[p], text)
        return text


def rewrite_store_urls(env: dict, subs: Substitutions, s3: dict | None, pg: dict, metadata_user: str,
                       tmp: Path) -> dict:
    """The object store and metadata store of a container, pointed at this machine:
    the PostgreSQL here (a fresh database), and the S3 server here (or, before the
    broker has s3://, a directory standing in for the bucket)."""
    env = dict(env)
    store = urllib.parse.urlparse(env["STRATA_OBJECT_STORE"])
    if store.scheme == "s3":
        if s3:
            create_bucket(s3["endpoint"], store.netloc)
            env["AWS_ENDPOINT_URL"] = s3["endpoint"]
            env["AWS_ALLOW_HTTP"] = "true"
            env.setdefault("AWS_ACCESS_KEY_ID", "test")
            env.setdefault("AWS_SECRET_ACCESS_KEY", "test")
            env.setdefault("AWS_REGION", "us-east-1")
        else:
            objects = tmp / "bucket" / store.netloc / store.path.strip("/")
            objects.mkdir(parents=True)
            env["STRATA_OBJECT_STORE"] = f"file://{objects}"
    meta = urllib.parse.urlparse(env["STRATA_METADATA"])
    assert meta.scheme == "postgres", env["STRATA_METADATA"]
    db = postgres_database(pg, meta.username or metadata_user)
    netloc = f"{meta.username}" + (f":{meta.password}" if meta.password else "") + f"@{pg['host']}:{pg['port']}"
    env["STRATA_METADATA"] = urllib.parse.urlunparse(meta._replace(netloc=netloc, path=f"/{db}"))
    return env


def serve_a_client(b: ContainerBroker, want_id: int, want_zone: str | None, want_advertised: str) -> None:
    """Ready, alive, the identity it was configured with, and a real producer and consumer."""
    wait_http(b.http_port, "/readyz")
    assert http_get(b.http_port, "/healthz") == 200
    from confluent_kafka.admin import AdminClient
    admin = AdminClient({"bootstrap.servers": b.bootstrap})
    cluster = admin.describe_cluster(request_timeout=15).result(30)
    nodes = {n.id: n for n in cluster.nodes}
    assert list(nodes) == [want_id], f"broker ids {list(nodes)}, configured {want_id}"
    node = nodes[want_id]
    assert f"{node.host}:{node.port}" == want_advertised
    assert node.rack == want_zone, f"rack {node.rack!r}, configured zone {want_zone!r}"
    topic = unique_topic("deploy")
    create_topic(b.bootstrap, topic, 2)
    leaders = {p: part.leader for p, part in admin.list_topics(topic, timeout=10).topics[topic].partitions.items()}
    assert set(leaders.values()) == {want_id}, (
        f"Metadata names {leaders} as the partitions' leaders, but this broker is {want_id}: "
        "clients cannot find the leader")
    p = producer(b.bootstrap)
    errors = []
    for i in range(50):
        p.produce(topic, key=str(i).encode(), value=f"v{i}".encode(), partition=i % 2,
                  on_delivery=lambda err, msg: errors.append(err) if err else None)
    assert p.flush(20) == 0 and not errors, errors
    got = consume_all(b.bootstrap, topic, 2, timeout=30)
    assert sorted(m.value() for m in got) == sorted(f"v{i}".encode() for i in range(50))


def stop_cleanly(b: ContainerBroker) -> None:
    rc = b.stop(grace=30)
    assert rc == 0, f"the broker exited {rc} on SIGTERM\n{b.log_tail()}"
    assert not can_connect("127.0.0.1", b.port), "something still listens after the broker exited"


def run_healthcheck(rt: dict, env: dict, subs: Substitutions) -> int:
    cmd = [subs.apply(a) for a in rt["healthcheck"]["cmd"]]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=15).returncode


def base_env(home: Path) -> dict:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "NO_COLOR": "1"}


def test_image_runs_the_broker(strata_bin, tmp_path):
    """`docker run IMAGE`: ENTRYPOINT + CMD with the image's ENV, its WORKDIR and VOLUME
    as temp dirs, its ports on loopback; the HEALTHCHECK command judges it healthy."""
    rt = dockerfile_runtime()
    kport, hport = free_ports(2)
    data = tmp_path / "volume"
    data.mkdir()
    subs = Substitutions(tmp_path, strata_bin)
    subs.path("/usr/local/bin/strata", strata_bin)
    for dest, src in rt["context_copies"].items():
        subs.path(dest, REPO_ROOT / src)
    for v in rt["volumes"]:
        subs.path(v, data)
    listen_port = rt["env"]["STRATA_LISTEN"].rpartition(":")[2]
    http_port = rt["env"]["STRATA_HTTP"].rpartition(":")[2]
    subs.addr(f"0.0.0.0:{listen_port}", f"127.0.0.1:{kport}")
    subs.addr(f"0.0.0.0:{http_port}", f"127.0.0.1:{hport}")
    env = base_env(tmp_path)
    env.update({k: subs.apply(v) for k, v in rt["env"].items()})
    argv = [subs.apply(a) for a in rt["entrypoint"] + rt["cmd"]]
    assert argv[0] == str(strata_bin)
    b = ContainerBroker(tmp_path / "run", argv, env, Path(subs.apply(rt["workdir"])), kport, hport,
                        "image", strata_bin)
    try:
        assert run_healthcheck(rt, env, subs) != 0, "healthy before the broker started"
        b.start()
        serve_a_client(b, 0, None, f"127.0.0.1:{kport}")
        assert run_healthcheck(rt, env, subs) == 0, "the image's HEALTHCHECK does not pass on a ready broker"
        # the defaults keep everything in the volume
        assert (data / "metadata.db").exists() and (data / "objects").is_dir()
        stop_cleanly(b)
        assert run_healthcheck(rt, env, subs) != 0, "healthy after the broker stopped"
    finally:
        b.close()


def resolve_pod_env(container: dict, pod_labels: dict, secrets: dict, pod_name: str) -> dict:
    """The variables a container's spec defines, as the kubelet resolves them: envFrom
    secrets, then env in order (downward API and secret references resolved, $(VAR)
    expanded against what is defined so far)."""
    env: dict = {}  # what the kubelet defines (and expands $(VAR) with)
    for ef in container.get("envFrom") or []:
        env.update(secrets[ef["secretRef"]["name"]])
    fields = {"status.podIP": POD_IP, "metadata.name": pod_name, "metadata.namespace": NAMESPACE}
    for e in container.get("env") or []:
        if "value" in e:
            env[e["name"]] = k8s_expand(e["value"], env)
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            m = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
            env[e["name"]] = pod_labels.get(m.group(1), "") if m else fields[path]
        elif "secretKeyRef" in src:
            ref = src["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            raise AssertionError(f"unsupported env source {src}")
    return env


def chart_secrets(r: dict, v: dict, pg_url: str) -> dict:
    """Secrets as the cluster has them: the chart's own, plus the external ones the ci
    values name (filled in the way an operator would)."""
    import base64
    secrets = {s["metadata"]["name"]: {k: base64.b64decode(x).decode() for k, x in s["data"].items()}
               for s in objs(r, "Secret")}
    if v["metadata"].get("existingSecret"):
        secrets[v["metadata"]["existingSecret"]] = {v["metadata"]["existingSecretKey"]: pg_url}
    if v["objectStore"].get("credentialsSecret"):
        secrets[v["objectStore"]["credentialsSecret"]] = {"AWS_ACCESS_KEY_ID": "test",
                                                          "AWS_SECRET_ACCESS_KEY": "test"}
    return secrets


@pytest.mark.parametrize("values", CI_VALUES)
def test_chart_runs_the_broker(strata_bin, rendered, values, postgres, s3_server, tmp_path):
    """The rendered pod of the first broker Deployment, run here: its command and args
    (or the image's ENTRYPOINT/CMD), its environment with the downward API and secrets
    resolved, its volumes as temp dirs; the pod's IP is loopback."""
    r = rendered[values]
    v = values_of(r)
    rt = dockerfile_runtime()
    dep = deployments(r)[0]
    tmpl = dep["spec"]["template"]
    c = broker_container(dep)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    kport, hport = free_ports(2)
    subs = Substitutions(tmp_path, strata_bin)
    subs.path("/usr/local/bin/strata", strata_bin)
    vols = {x["name"] for x in tmpl["spec"]["volumes"]}
    for m in c["volumeMounts"]:
        assert m["name"] in vols
        local = tmp_path / "volumes" / m["name"]
        local.mkdir(parents=True, exist_ok=True)
        subs.path(m["mountPath"], local)
    subs.addr(f"0.0.0.0:{ports['kafka']}", f"127.0.0.1:{kport}")
    subs.addr(f"{POD_IP}:{ports['kafka']}", f"127.0.0.1:{kport}")
    subs.addr(f"0.0.0.0:{ports['http']}", f"127.0.0.1:{hport}")

    # the zone label Kubernetes >= 1.35 copies from the node onto the pod
    labels = {**tmpl["metadata"]["labels"], v["zoneLabel"]: SIMULATED_ZONE}
    meta_url = "postgres://strata@strata-postgres.strata.svc:5432/strata"
    container_env = resolve_pod_env(c, labels, chart_secrets(r, v, meta_url),
                                    f"{dep['metadata']['name']}-0")
    command = c.get("command") or rt["entrypoint"]
    args = c.get("args") if "args" in c else ([] if "command" in c else rt["cmd"])
    argv = [subs.apply(k8s_expand(a, container_env)) for a in command + (args or [])]
    # the process sees the image's ENV under the container's
    env = rewrite_store_urls({**rt["env"], **container_env}, subs, s3_server, postgres, "strata", tmp_path)
    env = {**base_env(tmp_path), **{k: subs.apply(val) for k, val in env.items()}}
    b = ContainerBroker(tmp_path / "run", argv, env, tmp_path, kport, hport, f"chart-{values}", strata_bin)
    try:
        b.start()
        # the kubelet's probes, as declared
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
            assert port == ports["http"]
            wait_http(hport, get["path"])
        zone = env.get("STRATA_ZONE") or None
        if v.get("zones"):
            assert zone == v["zones"][0]
        else:
            assert zone == SIMULATED_ZONE
        if v["brokerIdFromPodIP"]:
            a, b2, c2, d = map(int, POD_IP.split("."))
            want_id = ((a << 24) | (b2 << 16) | (c2 << 8) | d) & 0x7FFFFFFF
        else:
            want_id = int(v["config"]["broker-id"])
        serve_a_client(b, want_id, zone, f"127.0.0.1:{kport}")
        stop_cleanly(b)
    finally:
        b.close()


def test_compose_broker_runs(strata_bin, compose, postgres, s3_server, tmp_path):
    """broker-1 of the compose file: the image's entrypoint and ENV, the service's
    command and environment; PostgreSQL and S3 addresses pointed at this machine."""
    svc = compose["services"]["broker-1"]
    rt = dockerfile_runtime()
    kport, hport = free_ports(2)
    subs = Substitutions(tmp_path, strata_bin)
    subs.path("/usr/local/bin/strata", strata_bin)
    for vol in svc["volumes"]:
        local = tmp_path / "volumes" / vol["source"]
        local.mkdir(parents=True)
        subs.path(vol["target"], local)
    for p in svc["ports"]:
        local = kport if int(p["target"]) == 9092 else hport
        subs.addr(f"{p.get('host_ip') or '0.0.0.0'}:{p['published']}", f"127.0.0.1:{local}")
        subs.addr(f"0.0.0.0:{p['target']}", f"127.0.0.1:{local}")
    env = {**rt["env"], **svc["environment"]}
    if s3_server:
        endpoint = urllib.parse.urlparse(env["AWS_ENDPOINT_URL"])
        subs.addr(endpoint.netloc, s3_server["endpoint"].removeprefix("http://"))
    env = {k: subs.apply(val) for k, val in env.items()}
    env = rewrite_store_urls(env, subs, s3_server and {"endpoint": env["AWS_ENDPOINT_URL"]}, postgres,
                             "strata", tmp_path)
    env = {**base_env(tmp_path), **env}
    argv = [subs.apply(a) for a in (svc.get("entrypoint") or rt["entrypoint"]) + (svc.get("command") or rt["cmd"])]
    b = ContainerBroker(tmp_path / "run", argv, env, Path(subs.apply(rt["workdir"])), kport, hport,
                        "compose-broker-1", strata_bin)
    try:
        b.start()
        serve_a_client(b, int(flag_value(svc["command"], "--broker-id")), flag_value(svc["command"], "--zone"),
                       f"127.0.0.1:{kport}")
        stop_cleanly(b)
    finally:
        b.close()
