"""A real S3 API for tests: ``moto`` in server mode on 127.0.0.1 (a free port), started once per session.

``moto_s3`` yields the endpoint URL and sets the standard AWS variables (test credentials, region,
``AWS_ENDPOINT_URL``) for the session, so s3fs / boto / the aws CLI in this process and in processes started
afterwards all talk to it. ``s3_bucket`` gives each test a fresh, empty bucket as ``s3://NAME``.

Registered in ``tests/conftest.py`` (``pytest_plugins``): a test asks for ``moto_s3`` / ``s3_bucket`` by name.

Note: DataLoader workers started by a *forkserver* that was already running before the fixture set the
variables do not see them (the forkserver keeps its own environment); use spawn workers there, or pass
credentials explicitly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(port: int) -> list[str]:
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    if exe:
        return [exe, "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run ``moto_server`` on a free port of 127.0.0.1 until the block ends; yield its endpoint URL."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # The server logs a line per request to stderr: into a file, never an undrained pipe (a full 64 KiB pipe
    # blocks the logging thread while it holds the handler lock, and then every request thread: the server stops
    # answering after ~900 requests, its connections left in CLOSE-WAIT).
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        _server_command(port), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"moto_server exited: {log.read().decode()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not answer on {endpoint} within 30 s") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def aws_env(endpoint: str) -> Iterator[None]:
    """Test credentials, region and ``AWS_ENDPOINT_URL`` in ``os.environ`` for the block, restored after."""
    saved = {k: os.environ.get(k) for k in (*AWS_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """Start moto_server, wait until it answers, set the AWS variables; yield the endpoint URL."""
    with moto_server() as endpoint, aws_env(endpoint):
        yield endpoint


@pytest.fixture
def s3_bucket(moto_s3: str) -> str:
    """A new empty bucket on the moto server: ``s3://mmt-test-<random>``."""
    import boto3

    name = f"mmt-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3, region_name=AWS_ENV["AWS_DEFAULT_REGION"]).create_bucket(
        Bucket=name
    )
    return f"s3://{name}"
