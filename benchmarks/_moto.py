"""A local S3 API for the benchmarks: ``moto_server`` (the ``moto[server]`` test extra) on a free port of
127.0.0.1, with test credentials in ``os.environ`` while it runs. The benchmarks' own copy, so they import the
``mmt`` package and each other only, never the test suite (whose fixtures in ``tests/`` do the same for tests).
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
from collections.abc import Iterator

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """Run ``moto_server`` until the block ends, the AWS variables pointing at it; yield its endpoint URL.

    Its per-request log goes to a file, never to an undrained pipe (a full pipe stalls the server after ~900
    requests). The variables are restored afterwards.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [*cmd, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(
                        f"moto_server on {endpoint} did not start: {log.read().decode()[-2000:]}"
                    ) from None
                time.sleep(0.1)
        os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
