"""`mmt train` across nodes: a real 3-node Slurm cluster on this machine (one network namespace per node).

One cluster (with sshd on every node) and one MLflow store serve the module. Covered: `mmt slurm submit` over 2
nodes in srun mode and torchrun mode, each with 1 and 2 ranks per node; the deepspeed launcher over 2 nodes
through `launch/deepspeed_multinode.sh`, with pdsh over ssh and with `--no-ssh` (one launcher per node); and one
job that loses a node (3 -> 2 nodes), is preempted by its time-limit signal and grows back (2 -> 3). Every run is
compared with one uninterrupted single-process run of the same global batch: same losses (the ZeRO parity test's
tolerance) and, for the node-loss job, the same global batch at every step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from mmt.slurm.cli import main as slurm_main
from mmt.slurm.scontrol import wait_for_jobs
from tests.fixtures_slurm import REPO, wait_for
from tests.fixtures_train import (
    BIN,
    consumed_keys,
    key_records,
    mmt_single,
    start,
    train_rows,
    write_config,
    write_shards,
)

JOB_TIMEOUT_S = 240
# Same global batch and initial weights, other world sizes: only the order of fp32 reductions differs (the ZeRO
# parity test in test_train_distributed.py measured <= 1e-6 relative on the loss and allows 1e-5).
LOSS_REL = 1e-5
pytestmark = pytest.mark.usefixtures("multinode_cluster")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Shards, one MLflow store (migrated once) and the uninterrupted single-process references."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("multinode")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()
    urls = write_shards(tmp / "data", 144, per_shard=36)
    return {"tmp": tmp, "uri": uri, "urls": urls, "refs": {}}


def _config(store: dict, name: str, **train) -> Path:
    tmp = store["tmp"]
    return write_config(
        tmp / f"{name}.yaml",
        train_urls=store["urls"],
        run_dir=tmp / "runs" / name,
        train={"record_keys": True, **train},
        tracking={
            "backend": "mlflow",
            "uri": store["uri"],
            "experiment": f"mn-{name}",
            "run_name": name,
            "flush_interval_s": 0.5,
        },
    )


def _start_reference(store: dict, name: str, **train) -> None:
    """The same run in one process, started now (it runs beside the jobs); tracking off, metrics.jsonl kept."""
    if name not in store["refs"]:
        cfg = _config(store, name, **train)
        store["refs"][name] = start(mmt_single(str(cfg), "tracking.backend=none"), cwd=store["tmp"])


def _reference(store: dict, name: str, **train) -> Path:
    """The reference run's folder, once it finished (started here if no test started it yet)."""
    _start_reference(store, name, **train)
    proc = store["refs"][name]
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, (out or "")[-3000:]
    return store["tmp"] / "runs" / name


def _submit(store: dict, cfg: Path, *args: str, monkeypatch) -> str:
    monkeypatch.chdir(store["tmp"])
    assert slurm_main(["submit", str(cfg), "--gpus-per-node", "0", "--time", "00:15:00", *args]) == 0
    run_dir = store["tmp"] / "runs" / cfg.stem
    return (run_dir / "slurm_jobs.txt").read_text().split()[-1]


def _log(run_dir: Path, pattern: str = "slurm-*.out") -> str:
    text = "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.glob(pattern)))
    return "\n".join(line for line in text.splitlines() if not line.startswith("[20"))  # DeepSpeed info lines


def _only_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(f"mn-{name}").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def _losses(client, run) -> dict[int, float]:
    """Step -> train/loss; a step trained twice (replayed after a lost node) counts with its last value."""
    out: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.timestamp):
        out[m.step] = m.value
    return out


def _assert_losses_match(got: dict[int, float], ref_dir: Path) -> None:
    ref = {s: r["train/loss"] for s, r in train_rows(ref_dir).items()}
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=LOSS_REL), s


MODES = (("srun", 1), ("srun", 2), ("torchrun", 1), ("torchrun", 2))


def test_two_node_jobs_in_srun_and_torchrun_mode_match_one_node(store, monkeypatch):
    """srun and torchrun (c10d rendezvous on node1) modes, 2 nodes x 1 and x 2 ranks each. Global batch 8 in all."""
    _start_reference(store, "ref8")
    jobs = {}
    for launch, per_node in MODES:
        cfg = _config(store, f"{launch}{per_node}")
        jobs[(launch, per_node)] = _submit(
            store, cfg, "--nodes", "2", "--ntasks-per-node", str(per_node), "--launch", launch,
            monkeypatch=monkeypatch,
        )  # fmt: skip
    ref = _reference(store, "ref8")
    for (launch, per_node), job in jobs.items():
        name = f"{launch}{per_node}"
        (info,) = wait_for_jobs(job, JOB_TIMEOUT_S)
        log = _log(store["tmp"] / "runs" / name)
        assert info.state == "COMPLETED" and info.restarts == 0, log
        assert "restart 0 on 2 node(s) node[1-2], head node1:" in log
        assert "mmt: done at step 3" in log and "terminate called" not in log
        client, mlrun = _only_run(store["uri"], name)
        tags = mlrun.data.tags
        assert mlrun.info.status == "FINISHED"
        assert tags["mmt.world_size"] == str(2 * per_node)
        assert tags["mmt.hostnames"] == "node1,node2"
        assert tags["mmt.slurm_nodelist"] == "node[1-2]"
        assert tags["mmt.launcher"] == ("slurm" if launch == "srun" else "torchrun")
        assert tags["mmt.world_sizes"] == f"0:{2 * per_node}"
        _assert_losses_match(_losses(client, mlrun), ref)


def test_launch_scripts_across_nodes_deepspeed_pdsh_no_ssh_and_torchrun(store, request):
    """The launch scripts as a user runs them on the nodes, 1 rank per node, global batch 8, the losses of one
    process: `launch/deepspeed_multinode.sh` once on node1 (pdsh starts node2's rank over ssh) and once per node
    with `--no-ssh NODE_RANK`; `launch/torchrun_multinode.sh` once per node (c10d rendezvous on node1)."""
    cluster = request.getfixturevalue("multinode_cluster")
    tmp, launch = store["tmp"], REPO / "launch"
    hostfile = tmp / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    cfgs = {name: _config(store, name) for name in ("ds_pdsh", "ds_nossh", "torchrun_sh")}
    path = f"PATH={BIN}:{os.environ['PATH']}"

    def on_node(node: str, port: int, *cmd: str) -> subprocess.Popen:
        env = ["env", path, f"PYTHONPATH={REPO}", f"MASTER_PORT={port}", f"RDZV_ID=mmt-{port}"]
        kw = {"cwd": tmp, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
        return cluster.on_node(node, [*env, "bash", *cmd], **kw)

    ds, tr = str(launch / "deepspeed_multinode.sh"), str(launch / "torchrun_multinode.sh")
    procs = {"pdsh": on_node("node1", 29511, ds, str(hostfile), str(cfgs["ds_pdsh"]))}
    for rank, node in enumerate(("node1", "node2")):
        procs[f"nossh{rank}"] = on_node(
            node, 29512, ds, "--no-ssh", str(rank), str(hostfile), str(cfgs["ds_nossh"])
        )
        procs[f"torchrun{rank}"] = on_node(node, 29513, tr, "2", "1", "node1:29513", str(cfgs["torchrun_sh"]))
    outs = {}
    try:
        for name, proc in procs.items():
            outs[name], _ = proc.communicate(timeout=JOB_TIMEOUT_S)
            assert proc.returncode == 0, f"{name}:\n{outs[name][-3000:]}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                subprocess.run(["kill", "-9", f"-{proc.pid}"], check=False)
    assert "node2: " in outs["pdsh"]  # pdsh prefixes the remote node's output with its name
    assert "world size 2 (deepspeed, cpu)" in outs["pdsh"] + outs["nossh0"]
    assert "world size 2 (torchrun, cpu)" in outs["torchrun0"] + outs["torchrun1"]
    for name, launcher in (("ds_pdsh", "deepspeed"), ("ds_nossh", "deepspeed"), ("torchrun_sh", "torchrun")):
        client, mlrun = _only_run(store["uri"], name)
        assert mlrun.info.status == "FINISHED"
        assert mlrun.data.tags["mmt.hostnames"] == "node1,node2"
        assert mlrun.data.tags["mmt.world_size"] == "2"
        assert mlrun.data.tags["mmt.launcher"] == launcher
        _assert_losses_match(_losses(client, mlrun), _reference(store, "ref8"))


def test_each_node_has_its_own_default_data_cache(multinode_cluster):
    """The nodes share this machine's /tmp, as nodes with a networked temp dir would: the default node-local
    shard cache is still one folder per node, so no cache is written by two nodes at once."""
    code = "from mmt.data.shards import default_cache_dir; print(default_cache_dir())"
    dirs = {}
    for node in ("node1", "node2", "node3"):
        proc = multinode_cluster.on_node(
            node,
            ["env", "-u", "MMT_DATA_CACHE", f"PYTHONPATH={REPO}", str(BIN / "python"), "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        dirs[node] = out.strip().splitlines()[-1]
    assert len(set(dirs.values())) == 3, dirs
    assert all(d.endswith(f"-{node}") for node, d in dirs.items()), dirs


def _global_batches(run_dir: Path, history: list[list]) -> dict[int, list[str]]:
    """Step -> the keys of its global batch as finally trained: at step s only ranks below the world size the
    run had at s count (their last record of s wins: steps replayed after a lost node were trained again)."""
    max_world = max(w for _, w, *_ in history)
    per_rank = [consumed_keys(run_dir, r) for r in range(max_world)]

    def world_at(step: int) -> int:
        return [w for start_, w, *_ in history if start_ <= step][-1]

    return {s: [k for r in range(world_at(s)) for k in per_rank[r][s]] for s in sorted(per_rank[0])}


def _attempts(run_dir: Path, rank: int) -> tuple[list[int], list[int]]:
    """The steps this rank trained, in order, split where the sequence broke (a replay or a gap) into the part
    before and the part after; the part after must then run without another break."""
    steps = [step for step, _ in key_records(run_dir, rank)]  # one record per step (no gradient accumulation)
    cut = next((i for i in range(1, len(steps)) if steps[i] != steps[i - 1] + 1), len(steps))
    return steps[:cut], steps[cut:]


def test_node_lost_then_back_3_to_2_to_3_nodes_resumes_exactly(store, request, monkeypatch):
    """A 3-node job (slurm.min_nodes=2) loses node3 mid-run: Slurm requeues it onto node1-2, the trainer resumes
    the last complete checkpoint on 2 ranks (converted to a universal checkpoint); node3 comes back, the job's
    time-limit signal preempts it (all ranks on all nodes save), and the requeued job resumes on 3 ranks."""
    cluster = request.getfixturevalue("multinode_cluster")
    name, steps = "lost", 18
    train = {"global_batch": 6, "max_steps": steps, "checkpoint_interval": 3, "keep_last": 0,
             "checkpoint_at_end": True, "dist_timeout_s": 60}  # fmt: skip
    cfg = _config(store, name, **train)
    run_dir = store["tmp"] / "runs" / name
    started = time.monotonic()
    job = _submit(
        store, cfg, "--nodes", "3", "--min-nodes", "2", "--ntasks-per-node", "1", monkeypatch=monkeypatch
    )
    first = run_dir / "checkpoints" / "step_00000003" / "mmt_meta.json"
    wait_for(first.is_file, 180, "the first checkpoint on 3 nodes", poll=0.02)
    cluster.script("kill-node", "node3")  # slurmd, job step and rank of node3: SIGKILL
    # The reference run uses the CPU while Slurm notices the lost node (the job only waits then).
    _start_reference(store, "ref6", **train)
    wait_for(lambda: "world size changed from 3 to 2" in _log(run_dir), 150, "the restart on 2 nodes")
    cluster.script("revive-node", "node3")
    # One more checkpoint on 2 ranks, then the signal Slurm sends before the time limit (B:USR1), sent now.
    wait_for(
        lambda: any(
            json.loads(p.read_text()).get("world_size") == 2
            for p in (run_dir / "checkpoints").glob("step_*/mmt_meta.json")
        ),
        120,
        "a checkpoint on 2 nodes",
    )
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    (info,) = wait_for_jobs(job, JOB_TIMEOUT_S)
    episode_s = time.monotonic() - started
    ref = _reference(store, "ref6", **train)
    log = _log(run_dir)
    assert info.state == "COMPLETED", log
    assert info.restarts == 2, log
    assert episode_s < 400, episode_s  # nothing hung (the waits above are bounded too)
    assert "restart 1 on 2 node(s) node[1-2]" in log and "restart 2 on 3 node(s) node[1-3]" in log, log
    # The lost attempt resumed from its last complete checkpoint (step 3), converted for the new world size.
    assert f"resumed from {run_dir}/checkpoints/step_00000003 at step 3" in log, log
    assert (
        len(
            re.findall(
                r"saved on 3 ranks \(ZeRO-2\), loading on 2 ranks .*universal checkpoint rank 0 converted",
                log,
            )
        )
        == 1
    ), log
    # The preemption: the time-limit signal reached the batch shell only; its trap forwarded it to every rank on
    # every node (each rank reports its own signal), all saved, and the job requeued itself.
    preempted = re.findall(
        r"mmt: preempted \(SIGUSR1\) at step (\d+); the signal reached (.*?); checkpoint", log
    )
    assert len(preempted) == 1, log
    preempted_at = int(preempted[0][0])
    assert preempted[0][1] == "2 of 2 ranks (on node1,node2)", log
    assert "mmt-slurm: got SIGUSR1, forwarding it to the ranks" in log, log
    assert "mmt-slurm: preempted (exit code" in log, log
    assert (
        len(
            re.findall(
                r"saved on 2 ranks \(ZeRO-2\), loading on 3 ranks .*universal checkpoint rank 0 converted",
                log,
            )
        )
        == 1
    ), log
    assert f"world size changed from 2 to 3 ranks at step {preempted_at}" in log
    # Both ranks of the 2-node attempt saved the preemption checkpoint (one optimizer shard each).
    saved = run_dir / "checkpoints" / f"step_{preempted_at:08d}"
    assert sorted(p.name for p in saved.glob("*optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)
    ]
    # One MLflow run; its tags record each world-size change and where it ran.
    client, mlrun = _only_run(store["uri"], name)
    tags = mlrun.data.tags
    assert mlrun.info.status == "FINISHED"
    assert tags["mmt.world_sizes"] == f"0:3,3:2,{preempted_at}:3"
    assert tags["mmt.world_size.0"] == "3 ranks on node1,node2,node3"
    assert tags["mmt.world_size.3"] == "2 ranks on node1,node2"
    assert tags[f"mmt.world_size.{preempted_at}"] == "3 ranks on node1,node2,node3"
    assert tags["mmt.slurm_restart_count"] == "2" and tags["mmt.world_size"] == "3"
    # The same global batch at every step as the uninterrupted run, and the same losses.
    meta = json.loads((run_dir / "checkpoints" / f"step_{steps:08d}" / "mmt_meta.json").read_text())
    assert meta["world_size"] == 3
    history = [[0, 3], [3, 2], [preempted_at, 3]]
    assert _global_batches(run_dir, history) == consumed_keys(ref, 0)
    # Every step once after the lost node's replay: node1-2's ranks trained steps 3.. once each, straight through
    # the preemption; node3's rank stopped with its node and trained again exactly from the preemption step on.
    for rank in (0, 1):
        first, rest = _attempts(run_dir, rank)
        assert first[:3] == [0, 1, 2] and rest == list(range(3, steps)), (rank, first, rest)
    first, rest = _attempts(run_dir, 2)
    assert first[:3] == [0, 1, 2] and rest == list(range(preempted_at, steps)), (first, rest)
    _assert_losses_match(_losses(client, mlrun), ref)
