"""A small stand-in trainer for the Slurm tests: real rank processes with a counter as their only state.

It keeps `mmt train`'s contract for the parts the batch script relies on, and starts in ~0.1 s (no torch), so
the requeue tests run in seconds: ranks from srun (SLURM_PROCID / SLURM_NTASKS) or torchrun (RANK /
WORLD_SIZE); the signals of ``train.preempt_signals`` only set a flag, combined over the ranks at each step
boundary; every rank saves, then rank 0 writes ``mmt_meta.json`` and the ``latest`` pointer; a preempted run
leaves ``preempted.json`` and exits with the trainer's preemption code; ``train.resume=auto`` continues from
the newest complete checkpoint. Collectives go through files in the run directory (all ranks share one node).
Each step's sample ids go to ``<run_dir>/keys/rank_XXXXX.jsonl`` so a test can check that no sample is seen twice.

Test knobs (environment): STANDIN_STEP_S (seconds per step), STANDIN_FAIL (exit 3 at startup: a crash that is
not preemption).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

# `mmt.training.preemption`'s values (imported there with torch); tests/test_slurm_render.py checks they agree.
PREEMPTED_EXIT_CODE = 75
PREEMPTED_MARKER = "preempted.json"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class FileCollectives:
    """all-reduce(max) and barrier among the ranks of one attempt, through files in a shared folder."""

    def __init__(self, root: Path, rank: int, world: int) -> None:
        self.root, self.rank, self.world, self.seq = root, rank, world, 0
        root.mkdir(parents=True, exist_ok=True)

    def max(self, value: int) -> int:
        self.seq += 1
        _write(self.root / f"{self.seq}.{self.rank}", str(value))
        paths = [self.root / f"{self.seq}.{r}" for r in range(self.world)]
        while not all(p.exists() for p in paths):
            time.sleep(0.01)
        return max(int(p.read_text()) for p in paths)

    def barrier(self) -> None:
        self.max(0)


def _latest_complete(ckpt_dir: Path) -> tuple[int, dict]:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return 0, {}
    tag = latest.read_text().strip()
    meta = json.loads((ckpt_dir / tag / "mmt_meta.json").read_text())
    assert meta["complete"], f"{ckpt_dir / tag}: latest points at an incomplete checkpoint"
    return meta["step"], meta


def main(argv: list[str]) -> int:
    cfg = yaml.safe_load(Path(argv[0]).read_text())
    train = cfg["train"]
    env = os.environ
    restart = int(env.get("SLURM_RESTART_COUNT", "0"))
    if env.get("STANDIN_FAIL"):
        print("stand-in: failing on purpose", flush=True)
        return 3
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")))

    received: list[str] = []
    for name in train["preempt_signals"]:
        signal.signal(
            getattr(signal, name.strip()), lambda signum, frame: received.append(signal.Signals(signum).name)
        )

    run_dir = Path(train["run_dir"])
    ckpt_dir = run_dir / "checkpoints"
    coll = FileCollectives(run_dir / "sync" / f"{env.get('SLURM_JOB_ID', 'local')}_{restart}", rank, world)
    step, meta = _latest_complete(ckpt_dir) if train["resume"] == "auto" else (0, {})
    counter = meta.get("samples_seen", 0)
    if rank == 0:
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        print(f"stand-in: rank 0 of {world}, start at step {step}, restart {restart}", flush=True)
    global_batch = train["global_batch"]
    batch = global_batch // world
    keys = run_dir / "keys" / f"rank_{rank:05d}.jsonl"
    keys.parent.mkdir(parents=True, exist_ok=True)
    step_s = float(env.get("STANDIN_STEP_S", "0.2"))

    def save() -> None:
        tag_dir = ckpt_dir / f"step_{step:08d}"
        tag_dir.mkdir(parents=True, exist_ok=True)
        _write(tag_dir / f"rank_{rank:05d}.json", json.dumps({"counter": counter}))
        coll.barrier()
        if rank == 0:
            meta = {"step": step, "samples_seen": counter, "world_size": world, "complete": True}
            _write(tag_dir / "mmt_meta.json", json.dumps(meta))
            _write(ckpt_dir / "latest", tag_dir.name + "\n")
        coll.barrier()

    while step < train["max_steps"]:
        if coll.max(1 if received else 0):
            save()
            if rank == 0:
                _write(run_dir / PREEMPTED_MARKER, json.dumps({"step": step, "signal": ",".join(received)}))
                print(f"stand-in: preempted, saved step {step}", flush=True)
            coll.barrier()
            return PREEMPTED_EXIT_CODE
        step += 1
        first = (step - 1) * global_batch + rank * batch
        with keys.open("a") as f:
            f.write(
                json.dumps({"step": step, "keys": list(range(first, first + batch)), "restart": restart})
                + "\n"
            )
        counter += global_batch
        time.sleep(step_s)
        interval = train["checkpoint_interval"]
        if (interval and step % interval == 0) or step == train["max_steps"]:
            save()
    coll.barrier()
    if rank == 0:
        print(f"stand-in: done at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
