"""Checkpoints written by a plain DeepSpeed program (`tests/ds_plain_program.py`), not by mmt.

Two launches serve the whole session: one 2-rank launch saves several models one after the other (a tied-embedding
LM at ZeRO 0, 1 and 3, the same LM trained in bf16 at ZeRO-2, a model with frozen parameters at ZeRO-2 and 3) and
one 3-rank launch saves the LM at ZeRO-3 and then dies half-way through a second save.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROGRAM = REPO / "tests" / "ds_plain_program.py"
TWO_RANK_SAVES = (
    "tied:3:fp32",
    "tied:1:fp32",
    "tied:0:fp32",
    "tied:2:bf16",
    "frozen:2:fp32",
    "frozen:3:fp32",
)
THREE_RANK_SAVES = ("tied:3:fp32",)

_MADE: dict[int, Path] = {}


def _launch(out: Path, nproc: int, saves: tuple[str, ...], *extra: str, must_succeed: bool = True) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += [str(PROGRAM), "--out", str(out), "--saves", *saves, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # DeepSpeed on CPU: tests/conftest.py
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    done = all((out / _folder(s) / "done").is_file() for s in saves)
    if (must_succeed and proc.returncode != 0) or not done:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise AssertionError(f"plain DeepSpeed program failed ({' '.join(cmd)}):\n{tail}")


def _folder(spec: str) -> str:
    name, stage, dtype = spec.split(":")
    return f"{name}-z{stage}-{dtype}"


@pytest.fixture(scope="session", name="plain_ckpt")
def plain_ckpt_fixture(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, int], Path]:
    """``plain_ckpt("tied:3:fp32", world_size=2)``: the save folder (tag folders + DeepSpeed's ``latest``)."""

    def get(spec: str, world_size: int = 2) -> Path:
        if world_size not in _MADE:
            out = tmp_path_factory.mktemp(f"plain_ds_{world_size}ranks")
            if world_size == 2:
                _launch(out, 2, TWO_RANK_SAVES)
            else:  # the second save is killed half-way: the launch itself fails
                _launch(out, 3, THREE_RANK_SAVES, "--kill-save", must_succeed=False)
            _MADE[world_size] = out
        return _MADE[world_size] / _folder(spec)

    return get
