"""The checkpoint tools on what `mmt train` writes: a 2-rank ZeRO-3 run of the tiny model on real shards."""

from __future__ import annotations

import pytest
import torch

import mmt
from mmt.ckpt.convert import convert_checkpoint
from mmt.ckpt.inspect import inspect_checkpoint
from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.pretrained import create_pretrained, load_pretrained
from mmt.ckpt.resume import check_resumable
from mmt.ckpt.universal import to_universal
from mmt.config import load_config, to_dict
from tests.fixtures_train import mmt_single, mmt_torchrun, run, write_config, write_shards

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mmt_train")
    urls = write_shards(tmp / "shards", 32)
    run_dir = tmp / "run"
    cfg = write_config(
        tmp / "cfg.yaml",
        train_urls=urls,
        run_dir=run_dir,
        train={"zero_stage": 3, "max_steps": 2, "checkpoint_at_end": True},
    )
    run(mmt_torchrun(2, str(cfg)), cwd=tmp, timeout=400)
    return run_dir, cfg, urls


def test_inspect_and_convert_a_trained_run(trained, tmp_path):
    run_dir, cfg_path, _ = trained
    info = inspect_checkpoint(run_dir)
    assert info["complete"] and info["step"] == 2 and info["zero_stage"] == 3 and info["world_size"] == 2
    cfg = load_config(cfg_path)
    assert info["config"]["model"] == to_dict(cfg)["model"]

    out = convert_checkpoint(run_dir, tmp_path / "out", max_shard_size="300KB", progress=False).out_dir
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ref = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=info["tag"])
    model = create_pretrained(out)
    sd = model.state_dict()
    assert set(ref) <= set(sd)
    for k, v in ref.items():
        assert torch.equal(sd[k], v.contiguous()), k
    # the same weights load into a model built from the run's own config (how `mmt eval` / fine-tuning start)
    fresh = mmt.create_model(cfg.model)
    load_pretrained(fresh, out)
    assert all(torch.equal(fresh.state_dict()[k], sd[k]) for k in sd)


def test_resume_plan_for_a_trained_run(trained, tmp_path):
    run_dir, cfg_path, _ = trained
    cfg = to_dict(load_config(cfg_path))
    plan = check_resumable(run_dir, world_size=2, zero_stage=3, config=cfg)
    assert not plan.load_universal and plan.step == 2
    with pytest.raises(CheckpointError, match=r"saved by 2 ranks with ZeRO-3, this run has 1.*to-universal"):
        check_resumable(run_dir, world_size=1, zero_stage=3, config=cfg)
    res = to_universal(run_dir, tmp_path / "universal")
    plan = check_resumable(res.run_dir, world_size=1, zero_stage=3, config=cfg)
    assert plan.load_universal and plan.step == 2 and plan.saved_world_size == 2
    assert (res.run_dir / "config.yaml").is_file()  # the run's resolved config travels with it


def test_train_init_weights_starts_from_converted_weights(trained, tmp_path):
    run_dir, _, urls = trained
    out = convert_checkpoint(run_dir, tmp_path / "export", progress=False).out_dir
    # one step with a negligible learning rate: the saved weights are the initial ones to fp32 rounding
    fine_dir = tmp_path / "finetune"
    cfg = write_config(
        tmp_path / "ft.yaml",
        train_urls=urls,
        run_dir=fine_dir,
        train={
            "zero_stage": 0,
            "max_steps": 1,
            "checkpoint_at_end": True,
            "init_weights": str(out),
            "optimizer": {"lr": 1e-30},
            "schedule": {"warmup_steps": 0, "kind": "constant"},
        },
    )
    run(mmt_single(str(cfg)), cwd=tmp_path, timeout=300)
    after = convert_checkpoint(fine_dir, tmp_path / "after", progress=False).out_dir
    from safetensors.torch import load_file

    start, end = load_file(out / "model.safetensors"), load_file(after / "model.safetensors")
    assert set(start) == set(end)
    for k in start:
        torch.testing.assert_close(end[k], start[k], rtol=0, atol=1e-12)
