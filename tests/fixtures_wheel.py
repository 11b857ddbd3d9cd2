"""A wheel of mmt installed into its own venv, and a short `mmt demo` run by it from an empty folder.

What a cluster user gets: only the wheel's files (no source tree on the path, no top-level ``configs/``). The
dependencies come from the test interpreter's site-packages, added with a plain path line (a ``.pth`` path line
adds the folder but runs none of the ``.pth`` files inside it, so the editable install of mmt there stays off).
The demo run's checkpoint and data serve the inference, zero-shot and export tests too: one short training per
session.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_STEPS = 60


class WheelInstall:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.venv = root / "venv"
        self.bin = self.venv / "bin"
        self.empty = root / "empty"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("MLFLOW_TRACKING_URI", None)
        return env

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``args`` (``mmt ...`` from the venv's bin) in the empty folder."""
        cmd = [str(self.bin / args[0]), *args[1:]] if (self.bin / args[0]).exists() else list(args)
        proc = subprocess.run(
            cmd, cwd=self.empty, env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
            raise AssertionError(f"exit {proc.returncode}: {' '.join(cmd)}\n{tail}")
        return proc


def build_and_install(root: Path) -> WheelInstall:
    """Copy the package sources (so the build leaves nothing in the repository), build the wheel, install it."""
    w = WheelInstall(root)
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "mmt", src / "mmt", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(root / "dist")],
        check=True,
        capture_output=True,
        cwd=root,
    )
    wheel = next((root / "dist").glob("mmt-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(w.venv)], check=True)
    py = w.bin / "python"
    subprocess.run(
        [*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    w.empty.mkdir()
    return w


_MADE: dict[str, object] = {}


@pytest.fixture(scope="session")
def wheel_install(tmp_path_factory: pytest.TempPathFactory) -> WheelInstall:
    if "wheel" not in _MADE:
        _MADE["wheel"] = build_and_install(tmp_path_factory.mktemp("wheel"))
    return _MADE["wheel"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def demo_run(wheel_install: WheelInstall) -> dict:
    """``mmt demo --launcher none`` for a few steps from the empty folder: output, run dir, data dir, metrics."""
    if "demo" not in _MADE:
        w = wheel_install
        proc = w.run(
            "mmt",
            "demo",
            "--launcher",
            "none",
            "--run-dir",
            "runs/demo",
            f"train.max_steps={DEMO_STEPS}",
            "train.checkpoint_interval=0",
            "tracking.backend=none",
            timeout=400,
        )
        run_dir = w.empty / "runs/demo"
        _MADE["demo"] = {
            "output": proc.stdout + proc.stderr,
            "run_dir": run_dir,
            "data": w.empty / "data/demo",
            "final": json.loads((run_dir / "final_metrics.json").read_text()),
        }
    return _MADE["demo"]  # type: ignore[return-value]
