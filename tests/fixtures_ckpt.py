"""Shared fixtures of the checkpoint-tool tests: real DeepSpeed checkpoints made by `tests.ckpt_harness`.

One 2-rank run per ZeRO stage serves every test of the session (each torchrun launch costs ~10 s). Each run
trains the tiny tri-modal model for 4 steps, saves at step 2 and dumps the live parameters at the save, so tests
compare converted weights with what the engine actually held.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "model" / "tiny_tri.yaml"
SAVE_STEP = 2
STEPS = 4


def run_harness(run_dir: Path, nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m tests.ckpt_harness --run-dir RUN_DIR ARGS`` (must succeed;
    DeepSpeed on CPU from the environment `tests/conftest.py` sets)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "tests.ckpt_harness", "--run-dir", str(run_dir), *args]
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise AssertionError(f"harness failed ({' '.join(cmd)}):\n{tail}")
    return proc


def read_losses(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "losses.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, lines)}


# One cache per test process: a fixture imported into several test modules is a separate fixture in each
# module, so a session-scoped fixture alone would launch the same runs once per module.
_MADE: dict[tuple[int, str], Path] = {}


@pytest.fixture(scope="session", name="zero_run")
def zero_run_fixture(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """``zero_run(stage, dtype="fp32")``: the run dir of a 2-rank run of the tiny model at that ZeRO stage and
    training precision (made once)."""
    made = _MADE

    def get(stage: int, dtype: str = "fp32") -> Path:
        if (stage, dtype) not in made:
            run = tmp_path_factory.mktemp(f"zero{stage}{dtype}") / "run"
            run_harness(
                run,
                2,
                "--model",
                str(TINY),
                "--zero-stage",
                str(stage),
                "--steps",
                str(STEPS),
                "--save-at",
                str(SAVE_STEP),
                "--dump-live",
                "--dtype",
                dtype,
            )
            made[(stage, dtype)] = run
        return made[(stage, dtype)]

    return get


def live_params(run: Path, name: str = f"step_{SAVE_STEP:08d}") -> dict:
    import torch

    return torch.load(run / "live" / f"{name}.pt", map_location="cpu", weights_only=True)
