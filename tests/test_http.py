"""The operator HTTP endpoint: liveness, readiness and unknown paths."""

import urllib.error
import urllib.request


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_health_and_readiness(broker):
    assert get(broker.http_port, "/healthz") == (200, "ok\n")
    assert get(broker.http_port, "/readyz") == (200, "ready\n")
    status, _ = get(broker.http_port, "/nope")
    assert status == 404
