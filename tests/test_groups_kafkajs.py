"""kafkajs consumer group against Strata: runs tests/js/group.test.js with node.

The node modules are installed with `npm ci` into tests/js/node_modules only when
they are missing or package-lock.json changed since the last install (a stamp in
node_modules records the lock file's hash)."""

import hashlib
import os
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT
from group_helpers import GROUP_ENV

JS_DIR = REPO_ROOT / "tests" / "js"
STAMP = JS_DIR / "node_modules" / ".strata-package-lock.sha256"


@pytest.fixture
def gbroker(broker_factory):
    return broker_factory(env=GROUP_ENV, name="broker")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: the kafkajs tests need Node.js and npm "
                    f"(install Node.js >= 18 with npm)", pytrace=False)
    return path


def ensure_node_modules() -> None:
    npm = tool("npm")
    lock = (JS_DIR / "package-lock.json").read_bytes()
    want = hashlib.sha256(lock).hexdigest()
    have = STAMP.read_text().strip() if STAMP.exists() else None
    if have == want and (JS_DIR / "node_modules" / "kafkajs").is_dir():
        return
    proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS_DIR,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"npm ci in {JS_DIR} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}", pytrace=False)
    STAMP.write_text(want + "\n")


def run_node(script: str, bootstrap: str, timeout: float = 110) -> str:
    """Runs tests/js/`script` against `bootstrap`; fails unless it exits 0 and prints
    `"ok":true`. Returns its stdout."""
    node = tool("node")
    ensure_node_modules()
    env = dict(os.environ)
    env["STRATA_BOOTSTRAP"] = bootstrap
    env["STRATA_JS_TIMEOUT_MS"] = str(int((timeout - 20) * 1000))
    proc = subprocess.Popen([node, script], cwd=JS_DIR, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{script} did not exit within {timeout:.0f}s\nstdout:\n{out[-3000:]}\n"
                    f"stderr:\n{err[-5000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (f"{script} failed (exit {proc.returncode})\n"
                                  f"stdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}")
    assert '"ok":true' in out, out
    return out


def test_kafkajs_group(gbroker):
    run_node("group.test.js", gbroker.bootstrap)
