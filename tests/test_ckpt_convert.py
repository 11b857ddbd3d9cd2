"""`mmt ckpt convert` / `inspect` / `load_pretrained` on real 2-rank DeepSpeed checkpoints of the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmt
from mmt.ckpt.cli import main as ckpt_main
from mmt.ckpt.convert import INDEX_FILE, SINGLE_FILE, convert_checkpoint
from mmt.ckpt.layout import CheckpointError
from mmt.ckpt.pretrained import create_pretrained, init_weights, load_pretrained
from tests.fixtures_ckpt import SAVE_STEP, TINY, live_params

pytestmark = pytest.mark.dist


def load_output(out: Path) -> dict[str, torch.Tensor]:
    if (out / INDEX_FILE).is_file():
        index = json.loads((out / INDEX_FILE).read_text())
        sd: dict[str, torch.Tensor] = {}
        for f in sorted(set(index["weight_map"].values())):
            part = load_file(out / f)
            assert all(index["weight_map"][k] == f for k in part)
            sd.update(part)
        assert set(sd) == set(index["weight_map"])
        return sd
    return load_file(out / SINGLE_FILE)


def deepspeed_reference(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step_{SAVE_STEP:08d}")


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k].float() - b[k].float()).abs().max()}"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_convert_equals_zero_to_fp32_and_live_weights(zero_run, tmp_path, stage):
    run = zero_run(stage)
    single = convert_checkpoint(run, tmp_path / "single", progress=False)
    assert single.files == [SINGLE_FILE] and single.step == SAVE_STEP
    sharded = convert_checkpoint(run, tmp_path / "sharded", max_shard_size="200KB", progress=False)
    assert len(sharded.files) > 2 and (tmp_path / "sharded" / INDEX_FILE).is_file()
    ours = load_output(tmp_path / "single")
    assert_same(ours, load_output(tmp_path / "sharded"))
    # exactly DeepSpeed's own consolidation ...
    assert_same(ours, {k: v.contiguous() for k, v in deepspeed_reference(run).items()})
    # ... and exactly what the engine held when it saved (gathered under ZeRO-3)
    assert_same(ours, live_params(run))
    # every shard within the limit unless a single tensor is bigger
    for f in sharded.files:
        size = (tmp_path / "sharded" / f).stat().st_size
        assert size <= 200_000 + 8192 or len(load_file(tmp_path / "sharded" / f)) == 1


@pytest.mark.parametrize("stage", [2, 3])
def test_convert_bf16_trained_checkpoint(zero_run, tmp_path, stage):
    """bf16 training keeps fp32 master weights in the optimizer partitions: the conversion gives exactly those
    (as DeepSpeed's own consolidation does), and rounding them to bf16 gives the bf16 weights the model ran with."""
    run = zero_run(stage, "bf16")
    ours = load_output(convert_checkpoint(run, tmp_path / "fp32", progress=False).out_dir)
    assert all(v.dtype == torch.float32 for v in ours.values())
    assert_same(ours, {k: v.contiguous() for k, v in deepspeed_reference(run).items()})
    live = live_params(run)
    assert set(ours) == set(live)
    for k, v in ours.items():
        assert torch.equal(v.to(torch.bfloat16).float(), live[k]), k
    as_bf16 = load_output(convert_checkpoint(run, tmp_path / "bf16", dtype="bf16", progress=False).out_dir)
    assert_same(as_bf16, {k: v.to(torch.bfloat16) for k, v in ours.items()})


def test_convert_zero0(zero_run, tmp_path):
    run = zero_run(0)
    res = convert_checkpoint(run, tmp_path / "out", progress=False)
    assert_same(load_output(res.out_dir), live_params(run))


def test_bf16_output_and_reopened_reads(zero_run, tmp_path):
    run = zero_run(3)
    ref = deepspeed_reference(run)
    bf = load_output(convert_checkpoint(run, tmp_path / "bf16", dtype="bf16", progress=False).out_dir)
    assert_same(
        bf, {k: v.contiguous().to(torch.bfloat16) if v.is_floating_point() else v for k, v in ref.items()}
    )
    # re-mapping the rank files after every read (tiny read budget) changes nothing
    tiny_budget = convert_checkpoint(run, tmp_path / "reopen", progress=False, read_budget=1)
    assert_same(load_output(tiny_budget.out_dir), {k: v.contiguous() for k, v in ref.items()})


def test_output_config_and_pretrained_loader(zero_run, tmp_path):
    run = zero_run(2)
    out = tmp_path / "out"
    assert ckpt_main(["convert", str(run), str(out), "--no-progress"]) == 0
    live = live_params(run)
    model = create_pretrained(out)  # config.yaml next to the weights builds the same model
    sd = model.state_dict()
    assert_same({k: sd[k] for k in live}, live)
    # and it runs
    with torch.no_grad():
        res = model(
            text_inputs=torch.randint(3, 200, (2, 8)), text_attention_mask=torch.ones(2, 8, dtype=torch.bool)
        )
    assert res.embeddings["text"].shape[0] == 2
    # the trainer's train.init_weights path: a fresh model of the same config starts from these weights
    fresh = mmt.create_model(TINY)
    assert init_weights(fresh, "") is None
    init_weights(fresh, str(out))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in live.items())
    export = json.loads((out / "mmt_export.json").read_text())
    assert export["step"] == SAVE_STEP and export["zero_stage"] == 2 and export["world_size"] == 2


def test_only_image_tower(zero_run, tmp_path):
    run = zero_run(3)
    out = tmp_path / "image"
    assert ckpt_main(["convert", str(run), str(out), "--only", "image", "--no-progress"]) == 0
    sd = load_output(out)
    assert sd and all(
        k.startswith(("encoders.image.", "pools.image.", "contrastive.proj.image.")) for k in sd
    )
    live = live_params(run)
    torch.manual_seed(123)
    model = mmt.create_model(TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="only=\\['image'\\]"):
        load_pretrained(model, out)  # a one-tower file does not silently half-load a full model
    report = load_pretrained(model, out, only=["image"])
    after = model.state_dict()
    assert sorted(report.loaded) == sorted(sd)
    for k in after:
        expected = live[k] if k in sd else before[k]
        assert torch.equal(after[k], expected), k


def test_inspect(zero_run, capsys):
    run = zero_run(3)
    assert ckpt_main(["inspect", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tag"] == f"step_{SAVE_STEP:08d}" and info["latest"] == info["tag"]
    assert info["step"] == SAVE_STEP and info["zero_stage"] == 3 and info["world_size"] == 2
    assert info["dtype"] == "fp32" and info["complete"] is True
    assert info["num_parameters"] == mmt.create_model(TINY).num_parameters()
    assert len(info["bytes_per_rank"]) == 2 and all(b > 0 for b in info["bytes_per_rank"])
    assert info["config"]["model"]["name"] == "tiny_tri"
    assert ckpt_main(["inspect", str(run)]) == 0
    text = capsys.readouterr().out
    assert "ZeRO stage: 3" in text and "complete: yes" in text


def test_interrupted_convert_leaves_no_output(zero_run, tmp_path, monkeypatch):
    from mmt.ckpt import safetensors_stream

    calls = {"n": 0}

    def interrupting(original):  # the 20th tensor written, whole or from its rank pieces, is interrupted
        def write(self, name, data):
            calls["n"] += 1
            if calls["n"] == 20:
                raise KeyboardInterrupt
            return original(self, name, data)

        return write

    for method in ("write", "write_pieces"):
        original = getattr(safetensors_stream.SafetensorsStreamWriter, method)
        monkeypatch.setattr(safetensors_stream.SafetensorsStreamWriter, method, interrupting(original))
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(zero_run(2), tmp_path / "out", max_shard_size="100KB", progress=False)
    assert list(tmp_path.iterdir()) == []  # no output folder, no staging folder, no partial shard


def test_existing_output_is_not_overwritten(zero_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_checkpoint(zero_run(2), out, progress=False)
    assert (out / "keep.txt").read_text() == "x"
    convert_checkpoint(zero_run(2), out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / SINGLE_FILE).is_file()
