"""A wheel install carries the shipped configs and the sbatch template: names resolve, `mmt demo` runs and
`mmt slurm submit --dry-run` renders a job from an empty folder."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

import mmt
from mmt.config import ConfigError
from mmt.slurm.job import DEFAULT_TEMPLATE
from tests.fixtures_wheel import DEMO_STEPS


def test_named_configs_in_source_tree():
    assert {"tiny_tri", "base_tri", "tiny_text_image", "large_tri"} <= set(mmt.list_models())
    assert "demo" in mmt.list_runs()
    assert mmt.create_model("tiny_text_image").modalities == ["text", "image"]
    with pytest.raises(ConfigError) as e:
        mmt.create_model("tiny_trii")
    # one line naming the culprit and the known names
    assert (
        "tiny_trii" in str(e.value)
        and "models: base_text_image, base_tri," in str(e.value)
        and "\n" not in str(e.value)
    )


def test_wheel_has_configs_and_runs_demo(wheel_install, demo_run):
    w = wheel_install
    code = (
        "import mmt, sys; print(mmt.__file__); print(mmt.list_models()); sys.exit(mmt.cli.main(sys.argv[1:]))"
    )
    where = w.run("python", "-c", f"import mmt.cli; {code}", "model", "configs/model/tiny_text_image.yaml")
    lines = where.stdout.splitlines()
    assert lines[0].startswith(str(w.venv))  # the wheel's copy, not the repository's
    assert "base_tri" in lines[1]
    # a README path works from any folder too: the shipped file of that name
    assert lines[2].startswith("tiny_text_image: text, image")
    assert w.run("mmt", "model", "tiny_tri").stdout.startswith("tiny_tri: text, image, audio")
    bad = w.run("mmt", "model", "nope", check=False)
    assert bad.returncode == 2 and "tiny_tri" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert demo_run["final"]["step"] == DEMO_STEPS
    assert "held-out" in demo_run["output"]
    assert (demo_run["data"] / "demo.json").is_file()


def test_wheel_ships_the_sbatch_template(wheel_install):
    # One file: the documented slurm/job.sbatch.tmpl is a link to the package's template.
    repo_copy = Path(__file__).resolve().parents[1] / "slurm" / "job.sbatch.tmpl"
    assert repo_copy.resolve() == DEFAULT_TEMPLATE.resolve() and DEFAULT_TEMPLATE.is_file()
    w = wheel_install
    (wheel,) = (w.root / "dist").glob("mmt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("mmt/slurm/job.sbatch.tmpl") == DEFAULT_TEMPLATE.read_bytes()
    # Rendering needs no repository and writes nothing with --dry-run.
    out = w.run(
        "mmt", "slurm", "submit", "demo", "--dry-run", "--gpus-per-node", "0", "--ntasks-per-node", "2"
    )
    assert out.stdout.startswith("#!/bin/bash") and "srun --kill-on-bad-exit" in out.stdout, out.stdout[:2000]
    assert "-m mmt.cli train" in out.stdout and not list(w.empty.rglob("job.sbatch"))
