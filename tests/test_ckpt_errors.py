"""Broken, incomplete or mismatched checkpoints give errors that name the culprit; never a silent wrong result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import mmt
from mmt.ckpt.cli import main as ckpt_main
from mmt.ckpt.convert import convert_checkpoint
from mmt.ckpt.inspect import inspect_checkpoint
from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.pretrained import load_pretrained
from mmt.ckpt.resume import check_resumable
from tests.fixtures_ckpt import REPO, SAVE_STEP, TINY

pytestmark = pytest.mark.dist
TAG = f"step_{SAVE_STEP:08d}"


def copy_run(run: Path, tmp: Path) -> Path:
    dst = tmp / "run"
    shutil.copytree(run / "checkpoints", dst / "checkpoints")
    return dst


def test_missing_rank_file(zero_run, tmp_path, capsys):
    run = copy_run(zero_run(3), tmp_path)
    missing = run / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    missing.unlink()
    with pytest.raises(
        CheckpointError, match=r"incomplete checkpoint.*rank\(s\) \[1\].*zero_pp_rank_1_mp_rank_00_optim"
    ):
        convert_checkpoint(run, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    info = inspect_checkpoint(run)
    assert info["complete"] is False and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in info["error"]
    assert ckpt_main(["inspect", str(run)]) == 1
    assert ckpt_main(["convert", str(run), str(tmp_path / "out2")]) == 2
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        check_resumable(run, world_size=2, zero_stage=3)


def test_missing_model_states_of_a_rank(zero_run, tmp_path):
    run = copy_run(zero_run(3), tmp_path)
    (run / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_model_states.pt"):
        convert_checkpoint(run, tmp_path / "out", progress=False)


def test_truncated_rank_file(zero_run, tmp_path):
    run = copy_run(zero_run(2), tmp_path)
    f = run / "checkpoints" / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt: cannot read.*corrupt or truncated"
    ):
        convert_checkpoint(run, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_rank_file_from_another_save(zero_run, tmp_path):
    run = copy_run(zero_run(2), tmp_path)
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shutil.copy(zero_run(1) / "checkpoints" / TAG / name, run / "checkpoints" / TAG / name)
    with pytest.raises(
        CheckpointError, match=f"{name}: zero_stage 1, rank 0 has 2: files from different saves"
    ):
        convert_checkpoint(run, tmp_path / "out", progress=False)


def test_unfinished_save_and_wrong_tag(zero_run, tmp_path):
    run = copy_run(zero_run(2), tmp_path)
    with pytest.raises(CheckpointError, match=r"no such checkpoint tag \(tags here: step_00000002\)"):
        convert_checkpoint(run, tmp_path / "out", tag="step_00000009", progress=False)
    (run / "checkpoints" / TAG / "mmt_meta.json").unlink()
    with pytest.raises(
        CheckpointError, match="mmt_meta.json: missing; the save of this checkpoint did not finish"
    ):
        convert_checkpoint(run, tmp_path / "out", progress=False)
    assert inspect_checkpoint(run)["tags"] == [{"tag": TAG, "status": "incomplete (no mmt_meta.json)"}]
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(CheckpointError, match="latest: missing"):
        convert_checkpoint(run, tmp_path / "out", progress=False)


def test_config_mismatch(zero_run, tmp_path):
    run = copy_run(zero_run(2), tmp_path)
    # a config the checkpoint was not trained with
    other = tmp_path / "other.yaml"
    cfg = yaml.safe_load(TINY.read_text())
    cfg["dim"] = 32
    other.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        CheckpointError, match=r"different model config.*model\.dim: 64 in the checkpoint, 32 in"
    ):
        convert_checkpoint(run, tmp_path / "out", config=other, progress=False)
    convert_checkpoint(run, tmp_path / "ok", config=TINY, progress=False)  # the right one passes
    # the recorded config says one model, the tensors are another's
    meta_file = run / "checkpoints" / TAG / "mmt_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["config"]["model"]["image"]["patch_size"] = 4
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"does not match the model config recorded in .*mmt_meta.json: .*shape differs"
    ):
        convert_checkpoint(run, tmp_path / "out", progress=False)
    # resuming with another model config
    with pytest.raises(
        CheckpointError, match=r"different model config: model\.dim: 64 in the checkpoint, 32 now"
    ):
        check_resumable(
            zero_run(2), world_size=2, zero_stage=2, config={"model": {**meta["config"]["model"], "dim": 32}}
        )


def test_pretrained_into_the_wrong_model(zero_run, tmp_path):
    out = convert_checkpoint(zero_run(2), tmp_path / "out", progress=False).out_dir
    model = mmt.create_model(REPO / "configs" / "model" / "tiny_text_image.yaml")
    with pytest.raises(
        CheckpointError,
        match=r"does not fit the model: \d+ tensor\(s\) the model does not have \([^)]*audio",
    ):
        load_pretrained(model, out)
    wider = mmt.create_model(TINY, ["dim=32"])
    with pytest.raises(CheckpointError, match=r"shape differs"):
        load_pretrained(wider, out)


def test_zero3_on_another_world_size_is_refused(zero_run):
    run = zero_run(3)
    with pytest.raises(CheckpointError) as e:
        check_resumable(run, world_size=1, zero_stage=3)
    msg = str(e.value)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: saved by 2 ranks with ZeRO-3, this run has 1" in msg
    assert "mmt ckpt to-universal" in msg
    with pytest.raises(CheckpointError, match="saved with ZeRO-3, this run uses ZeRO-2"):
        check_resumable(run, world_size=2, zero_stage=2)
    plan = check_resumable(run, world_size=2, zero_stage=3)
    assert not plan.load_universal and plan.step == SAVE_STEP and plan.tag == TAG


def test_shape_check_matches_the_model_of_every_config():
    """The shape check's CPU build with init fills skipped gives exactly the shapes of the model itself, for
    every model config shipped (the model on the meta device)."""
    import torch

    from mmt.ckpt.modelcheck import expected_shapes
    from mmt.config import to_dict
    from mmt.model.factory import load_model_config

    for f in sorted((REPO / "configs" / "model").glob("*.yaml")):
        cfg = load_model_config(f)
        shapes = expected_shapes(to_dict(cfg))
        with torch.device("meta"):
            built = mmt.create_model(cfg).state_dict()
        assert shapes == {k: tuple(v.shape) for k, v in built.items()}, f.name
