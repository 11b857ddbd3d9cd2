"""Untrusted checkpoints: a file whose pickle would run code is refused by name wherever it sits, by every command
that reads checkpoints, before anything in it runs; only an explicit trust decision loads it fully."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import mmt
from mmt.ckpt.cli import main as ckpt_main
from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.torchio import UntrustedCheckpointError, checkpoint_loading, load_pt
from tests.fixtures_ckpt import SAVE_STEP, TINY
from tests.fixtures_train import _free_port, env_for_runs, mmt_single, write_config

pytestmark = pytest.mark.dist
TAG = f"step_{SAVE_STEP:08d}"


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: the proof that code from a file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Add a `Payload` to the real content of ``path`` (so a trusted load still finds everything it needs)."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by the fixture
    state["extra"] = Payload(marker)
    torch.save(state, path)


def copy_tag(run: Path, tmp: Path) -> Path:
    dst = tmp / "run"
    shutil.copytree(run / "checkpoints", dst / "checkpoints")
    return dst


def assert_refused(capsys: pytest.CaptureFixture, rc: int, culprit: Path, marker: Path) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert not marker.exists(), "code from the checkpoint ran"
    assert len(err.splitlines()) == 1 and str(culprit) in err and "posix.system" in err, err
    assert "--trust-checkpoint" in err


@pytest.mark.parametrize(
    "position", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
)
def test_ckpt_commands_refuse_a_hostile_rank_file(zero_run, tmp_path, capsys, position):
    run = copy_tag(zero_run(2), tmp_path)
    bad, marker = run / "checkpoints" / TAG / position, tmp_path / "ran"
    plant(bad, marker)
    for argv in (
        ["inspect", str(run)],
        ["convert", str(run), str(tmp_path / "out")],
        ["to-universal", str(run), str(tmp_path / "uni")],
        ["check-resume", str(run), "--world-size", "2", "--zero-stage", "2"],
    ):
        assert_refused(capsys, ckpt_main(argv), bad, marker)
    assert not (tmp_path / "out").exists() and not (tmp_path / "uni").exists()
    # DeepSpeed's own reader (what `mmt eval` and `engine.load_checkpoint` use) is held to the same check
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with checkpoint_loading(False), pytest.raises(UntrustedCheckpointError, match=position):
        get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=TAG)
    assert not marker.exists()
    assert torch.load is not None and "partial" not in repr(torch.load)  # the guard is gone afterwards


def test_trust_checkpoint_is_the_only_way_to_load_it_fully(zero_run, tmp_path, capsys):
    run = copy_tag(zero_run(2), tmp_path)
    bad, marker = run / "checkpoints" / TAG / "mp_rank_00_model_states.pt", tmp_path / "ran"
    plant(bad, marker)
    with pytest.raises(UntrustedCheckpointError, match="posix.system"):
        load_pt(bad)
    assert not marker.exists()
    assert ckpt_main(["inspect", str(run), "--trust-checkpoint"]) == 0
    assert marker.exists()  # the trusted load unpickled everything, payload included
    capsys.readouterr()


def fake_universal(run: Path, tmp: Path) -> Path:
    """A universal checkpoint's layout around a real ZeRO-2 model file; one parameter's fp32.pt is hostile."""
    src = run / "checkpoints" / TAG
    dst = tmp / "uni" / "checkpoints" / TAG
    (dst / "zero" / "inp.weight").mkdir(parents=True)
    shutil.copy(src / "mp_rank_00_model_states.pt", dst)
    torch.save({"optimizer_state_dict": {}, "param_groups": []}, dst / "zero" / "optimizer_state.pt")
    meta = json.loads((src / "mmt_meta.json").read_text())
    meta.update(universal=True, source_world_size=2, source_zero_stage=2)
    (dst / "mmt_meta.json").write_text(json.dumps(meta))
    (dst.parent / "latest").write_text(TAG)
    return dst


def test_universal_files_train_resume_eval_and_init_weights(zero_run, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "ran"
    tag_dir = fake_universal(zero_run(2), tmp_path)
    bad = tag_dir / "zero" / "inp.weight" / "fp32.pt"
    torch.save({"param": Payload(marker)}, bad)
    rc = ckpt_main(["check-resume", str(tag_dir.parent.parent), "--world-size", "1", "--zero-stage", "2"])
    assert_refused(capsys, rc, bad, marker)

    # `mmt train` resuming from it stops before DeepSpeed opens a file; exit 2, the file named
    cfg = write_config(
        tmp_path / "cfg.yaml",
        train_urls=str(tmp_path / "none-{000000..000001}.tar"),
        run_dir=tmp_path / "resumed",
        train={"resume": str(tag_dir)},
    )
    proc = subprocess.run(
        mmt_single(str(cfg)), capture_output=True, text=True, env=env_for_runs(), timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(bad) in proc.stderr and "posix.system" in proc.stderr and not marker.exists()

    # `mmt eval` on a hostile ZeRO-2 checkpoint: refused before DeepSpeed's reader unpickles it
    run = copy_tag(zero_run(2), tmp_path / "eval")
    bad = run / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant(bad, marker)
    from mmt.training.cli import eval_main

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert_refused(capsys, eval_main([str(cfg), "--checkpoint", str(run)]), bad, marker)

    # converted weights are safetensors: a pickle in their place is not unpickled, just refused by name
    from mmt.ckpt.pretrained import init_weights

    export = tmp_path / "export"
    export.mkdir()
    torch.save({"w": Payload(marker)}, export / "model.safetensors")
    with checkpoint_loading(False), pytest.raises(CheckpointError, match="model.safetensors"):
        init_weights(mmt.create_model(TINY), str(export))
    assert not marker.exists()
