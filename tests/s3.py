"""A real S3-compatible server for the tests: moto's standalone server (`moto_server`,
installed from PyPI into the test venv) on a free loopback port.

One server per pytest process, started on first use and stopped at exit by PID. Every
broker gets its own bucket, so tests never see each other's objects.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ACCESS_KEY = "strata-test"
SECRET_KEY = "strata-test-secret"
REGION = "us-east-1"


class S3Server:
    def __init__(self, port: int, log_dir: Path):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"moto-{port}.log"
        exe = Path(sys.executable).parent / "moto_server"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(exe), "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.client().list_buckets()
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start; see {self.log_path}")
                time.sleep(0.1)

    def client(self):
        import boto3
        from botocore.config import Config
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name=REGION,
            config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=60))

    def new_bucket(self) -> str:
        name = f"strata-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def environment(self, endpoint: str | None = None) -> dict:
        """The standard AWS variables a broker reads to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """key -> size of every object under prefix."""
        out = {}
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for o in page.get("Contents", []):
                out[o["Key"]] = o["Size"]
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


_SERVER: S3Server | None = None


def s3_server() -> S3Server:
    """The process-wide S3 server, started on first use."""
    global _SERVER
    if _SERVER is None or _SERVER.proc.poll() is not None:
        from conftest import free_ports
        _SERVER = S3Server(free_ports(1)[0], Path(os.environ.get("TMPDIR", "/tmp")) / "strata-s3-logs")
    return _SERVER
