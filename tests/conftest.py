"""Shared fixtures: one local Ray for the whole session, small models, temp caches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DELIBERATE_RAY_CACHE", str(ROOT / ".cache" / "deliberate-ray"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A real S3-compatible server (moto in server mode) on loopback for the s3:// run_dir tests.
# Its address is fixed here, before any Ray starts, so Ray's workers inherit the endpoint
# and the (fake) credentials from this process; the server itself starts on first use.
S3_PORT = _free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{S3_PORT}",
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a subprocess, as a real store would be)."""
    import socket
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), 0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto S3 server did not start") from None
            time.sleep(0.2)
    yield os.environ["AWS_ENDPOINT_URL"]
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the loopback S3 server; returns `s3://<bucket>`."""
    import re
    import uuid

    import fsspec

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{name}-{uuid.uuid4().hex[:6]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by all tests that need one (~8 s to start, once)."""
    import ray

    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=512 * 1024**2,
        runtime_env={"env_vars": {"DELIBERATE_RAY_CACHE": os.environ["DELIBERATE_RAY_CACHE"]}},
    )
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Path of the tiny random Llama (same tokenizer as the embedded model)."""
    from deliberate_ray.models import TINY, resolve_model

    return resolve_model(TINY)


@pytest.fixture(scope="session")
def spec():
    from deliberate_ray.spec import load_spec

    return load_spec(ROOT / "specs" / "default.yaml")
