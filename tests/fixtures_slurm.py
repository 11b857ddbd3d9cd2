"""A real single-node Slurm cluster for tests, started by `slurm/local_cluster.sh` and stopped afterwards.

Registered in ``tests/conftest.py``: a test asks for ``slurm_cluster`` by name. The script installs the
Debian packages when they are missing (apt-get, as root), so a fresh machine needs nothing else. The cluster
gets its own state folder and free ports, so it never touches another cluster on the machine; `SLURM_CONF`
points the Slurm commands (and `mmt slurm`) at it for the session.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
START_TIMEOUT_S = 600  # a fresh machine installs the packages first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class SlurmCluster:
    conf: Path
    state_dir: Path

    def log_tail(self, n: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.state_dir / "log" / name
            if p.is_file():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)


def _run_script(action: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=timeout
    )


class _Shared:
    """One cluster per test session even when several modules import the fixture (each import is its own
    session-scoped fixture to pytest): started by the first user, stopped when the last one is done."""

    cluster: SlurmCluster | None = None
    env: dict[str, str] = {}
    users = 0
    old_conf: str | None = None


def _acquire(tmp_path_factory: pytest.TempPathFactory) -> SlurmCluster:
    if _Shared.cluster is None:
        state = tmp_path_factory.mktemp("slurm_cluster")
        env = {
            **os.environ,
            "MMT_SLURM_DIR": str(state),
            "MMT_SLURMCTLD_PORT": str(_free_port()),
            "MMT_SLURMD_PORT": str(_free_port()),
        }
        cluster = SlurmCluster(state / "slurm.conf", state)
        proc = _run_script("start", env, START_TIMEOUT_S)
        if proc.returncode != 0:
            _run_script("stop", env, 120)
            raise RuntimeError(
                f"local Slurm cluster did not start ({proc.returncode}):\n{proc.stderr[-3000:]}\n"
                f"{cluster.log_tail()}"
            )
        _Shared.cluster, _Shared.env, _Shared.old_conf = cluster, env, os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(cluster.conf)
    _Shared.users += 1
    return _Shared.cluster


def _release() -> None:
    _Shared.users -= 1
    if _Shared.users > 0 or _Shared.cluster is None:
        return
    _run_script("stop", _Shared.env, 120)
    if _Shared.old_conf is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = _Shared.old_conf
    _Shared.cluster = None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    cluster = _acquire(tmp_path_factory)
    try:
        yield cluster
    finally:
        _release()


def wait_for(condition, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen after {timeout} s")
        time.sleep(poll)


def job_pids(job_id: str, procid: int | None = None) -> list[int]:
    """PIDs of this machine's processes that run job ``job_id`` (optionally only srun task ``procid``)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
        if env.get("SLURM_JOB_ID") != str(job_id) or "SLURM_STEP_ID" not in env:
            continue
        if env["SLURM_STEP_ID"] in ("batch", "4294967291"):
            continue
        if procid is not None and env.get("SLURM_PROCID") != str(procid):
            continue
        out.append(int(d.name))
    return out


def kill_rank(job_id: str, rank_env: str, rank: int) -> int:
    """SIGKILL the process of ``job_id`` whose ``rank_env`` (RANK or SLURM_PROCID) is ``rank``; its pid."""
    for pid in job_pids(job_id):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
        if (
            env.get(rank_env) == str(rank)
            and re.search(rb"python", cmdline)
            and b"torch.distributed.run" not in cmdline
        ):
            os.kill(pid, signal.SIGKILL)
            return pid
    raise LookupError(f"job {job_id}: no process with {rank_env}={rank}")


# ---------------------------------------------------------------------------------------------------- multi-node
@dataclass(frozen=True)
class MultiNodeCluster(SlurmCluster):
    """A cluster of ``nodes`` network namespaces (node1..nodeN) with sshd in each (``local_cluster.sh --ssh``)."""

    nodes: int
    env: dict

    def script(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """``local_cluster.sh ARGS`` for this cluster (exec / kill-node / revive-node), checked."""
        proc = subprocess.run(
            ["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert proc.returncode == 0, f"local_cluster.sh {' '.join(args)}: {proc.stderr[-2000:]}"
        return proc

    def on_node(self, node: str, cmd: list[str], **popen) -> subprocess.Popen:
        """Start ``cmd`` on ``node`` (its network, hostname and hosts file), in its own process group."""
        return subprocess.Popen(
            ["bash", str(SCRIPT), "exec", node, *cmd], env=self.env, start_new_session=True, **popen
        )

    def leftovers(self, own_munged: bool) -> list[str]:
        """What a stopped cluster must not leave behind: namespaces, links, daemons of its state folder, and the
        munged it started (``own_munged``: none ran before)."""
        out = []
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        out += [f"netns {x.split()[0]}" for x in netns.splitlines() if x.startswith("mmt-node")]
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        out += [
            f"link {name}"
            for name in (x.split(": ")[1].split("@")[0] for x in links.splitlines())
            if re.fullmatch(r"mmt-(v\d+|br0)", name)
        ]
        for d in Path("/proc").iterdir():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if d.name.isdigit() and str(self.state_dir) in cmd and re.search(r"slurm|sshd|sleep", cmd):
                out.append(f"process {d.name}: {cmd[:120]}")
            elif d.name.isdigit() and own_munged and cmd.split(" ")[0].endswith("munged"):
                out.append(f"process {d.name}: {cmd[:120]}")
        return out


@pytest.fixture(scope="module")
def multinode_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNodeCluster]:
    """A 3-node cluster with sshd for one test module; SLURM_CONF points at it while the module runs.

    Slurm declares a node DOWN after 10 s without an answer here (SlurmdTimeout), and gives up on an RPC to a dead
    node after 5 s (MessageTimeout; a ping cycle to a node whose link is down lasts that long), so a lost node is
    noticed within a test's time."""
    state = tmp_path_factory.mktemp("slurm_multinode")
    env = {
        **os.environ,
        "MMT_SLURM_DIR": str(state),
        "MMT_SLURMCTLD_PORT": str(_free_port()),
        "MMT_SLURMD_PORT": str(_free_port()),
        "MMT_SLURMD_TIMEOUT": "10",
        "MMT_SLURM_MESSAGE_TIMEOUT": "5",
    }
    cluster = MultiNodeCluster(state / "slurm.conf", state, 3, env)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "start", "--nodes", "3", "--ssh"],
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
    )
    old_conf = os.environ.get("SLURM_CONF")
    try:
        if proc.returncode != 0:
            raise RuntimeError(
                f"local 3-node Slurm cluster did not start ({proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        own_munged = (state / "munged.started").exists()
        _run_script("stop", env, 120)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
    left = cluster.leftovers(own_munged)
    assert not left, f"the stopped cluster left: {left}"
