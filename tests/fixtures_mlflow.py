"""A real `mlflow server` for tests: sqlite backend and artifact folder in a tmp dir, 127.0.0.1, free port.

Registered in ``tests/conftest.py``: a test module asks for ``mlflow_server`` by name.
The server is started once per test module: it takes several seconds to become healthy on 2 cores (its
first start also migrates the sqlite schema). It runs in its own process group and is stopped with SIGINT to
that group, which also stops the workers it spawns (SIGTERM to the parent alone leaves them running).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class MlflowServer:
    """Where the test server listens (`uri`) and where it keeps its data."""

    uri: str
    backend_uri: str
    artifacts_dir: Path
    log_path: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the whole process group, then SIGKILL whatever is left after STOP_TIMEOUT_S."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
    try:  # the group may outlive its leader (spawned workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=STOP_TIMEOUT_S)


def start_mlflow_server(
    root: Path, admin: tuple[str, str] | None = None
) -> tuple[MlflowServer, subprocess.Popen]:
    """Start `mlflow server` with its data under `root` and wait until /health answers.

    ``admin=(user, password)``: MLflow's basic-auth app (``--app-name basic-auth``, users in ``root/auth.db``);
    every request then needs credentials, ``user`` being its administrator."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = MlflowServer(
        uri=f"http://127.0.0.1:{port}",
        backend_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifacts_dir=root / "artifacts",
        log_path=root / "server.log",
    )
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        server.backend_uri,
        "--artifacts-destination",
        str(server.artifacts_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    auth_env = {}
    if admin is not None:
        ini = root / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = {admin[0]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        cmd += ["--app-name", "basic-auth"]
        auth_env = {
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "mmt-tests",
        }
    # The job runner (huey consumers for GenAI jobs) is not needed to track runs; it doubles start-up time.
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **auth_env,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(server.log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    log.close()  # the child holds its own copy of the descriptor
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not _healthy(server.uri):
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {proc.returncode} before becoming healthy; "
                f"log {server.log_path}:\n{_log_tail(server.log_path)}"
            )
        if time.monotonic() > deadline:
            _stop(proc)
            raise RuntimeError(
                f"mlflow server at {server.uri} not healthy after {STARTUP_TIMEOUT_S:.0f} s; "
                f"log {server.log_path}:\n{_log_tail(server.log_path)}"
            )
        time.sleep(0.25)
    return server, proc


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A running `mlflow server` (module scope); yields an `MlflowServer`."""
    server, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server
    finally:
        _stop(proc)
