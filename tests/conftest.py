"""Process-wide test settings: DeepSpeed on CPU, its JIT-built ops cached beside the venv (built once per
machine, not once per test), and no test ever talks to a tracking server it did not start."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The shared fixtures (real DeepSpeed checkpoints, an MLflow server, moto S3, a local Slurm cluster, 2-rank training
# runs, the installed wheel), available to every test module by name; each starts only when a test asks for it.
pytest_plugins = [
    "tests.fixtures_ckpt",
    "tests.fixtures_foreign_ckpt",
    "tests.fixtures_mlflow",
    "tests.fixtures_s3",
    "tests.fixtures_slurm",
    "tests.fixtures_train",
    "tests.fixtures_wheel",
]

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ.pop("MLFLOW_TRACKING_URI", None)


# What `setup_distributed` exports for the libraries it calls. A command run in-process (`mmt eval` in a CLI test)
# leaves them in this process; a later `mmt train` subprocess would inherit MASTER_PORT and bind a port that the
# earlier store may still hold. Every test starts from the environment it would have on its own.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_rank_variables():
    before = {k: os.environ.get(k) for k in RANK_VARIABLES}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
