"""`mmt ckpt` on checkpoints written by a plain DeepSpeed program (no mmt_meta.json, DeepSpeed's own tags and
``latest``): converted exactly as DeepSpeed's ``zero_to_fp32`` does, half-written saves and mixed folders refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmt.ckpt.cli import main as ckpt_main

pytestmark = pytest.mark.dist
OPTIM1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def zero_to_fp32(save_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {
        k: v.contiguous() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(save_dir), tag=tag).items()
    }


def convert(save_dir: Path, out: Path, *args: str) -> dict[str, torch.Tensor]:
    assert ckpt_main(["convert", str(save_dir), str(out), "--no-progress", *args]) == 0
    return load_file(out / "model.safetensors")


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmt ckpt ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "spec,world",
    [
        ("tied:3:fp32", 2),
        ("tied:3:fp32", 3),
        ("tied:1:fp32", 2),
        ("tied:2:bf16", 2),
        ("frozen:2:fp32", 2),
        ("frozen:3:fp32", 2),
    ],
)
def test_convert_equals_zero_to_fp32(plain_ckpt, tmp_path, spec, world):
    save = plain_ckpt(spec, world)
    ours = convert(save, tmp_path / "out")
    assert_identical(ours, zero_to_fp32(save))
    live = torch.load(save / "live.pt", weights_only=True)
    assert set(ours) == set(live)  # every parameter, frozen ones and buffers included
    for k, v in ours.items():  # bf16 training: the fp32 masters round to the weights the model ran with
        assert torch.equal(v.to(live[k].dtype), live[k]), k
    if spec.startswith("tied"):
        assert torch.equal(ours["head.weight"], ours["embed.weight"])
        assert ours["position_ids"].dtype == torch.int64
    export = json.loads((tmp_path / "out" / "mmt_export.json").read_text())
    assert export["world_size"] == world and export["step"] == 3 and export["tag"] == "global_step3"


def test_zero0_and_inspect(plain_ckpt, tmp_path, capsys):
    save = plain_ckpt("tied:0:fp32")
    assert_identical(convert(save, tmp_path / "z0"), torch.load(save / "live.pt", weights_only=True))
    capsys.readouterr()
    assert ckpt_main(["inspect", str(plain_ckpt("tied:3:fp32", 3)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] is True and info["made_by"].startswith("DeepSpeed")
    assert (info["tag"], info["zero_stage"], info["world_size"], info["step"]) == ("global_step3", 3, 3, 3)
    status = {t["tag"]: t["status"] for t in info["tags"]}
    assert status["global_step3"].startswith("complete")
    assert status["global_step4"].startswith("incomplete") and OPTIM1 in status["global_step4"]


def test_save_killed_half_way_is_refused(plain_ckpt, tmp_path, capsys):
    save = plain_ckpt("tied:3:fp32", 3)
    assert (save / "global_step4" / OPTIM1).is_file()  # rank 1 died while writing this file
    assert ckpt_main(["inspect", str(save), "--tag", "global_step4"]) == 1
    assert OPTIM1 in capsys.readouterr().out
    for cmd in ("convert", "to-universal"):
        assert ckpt_main([cmd, str(save), str(tmp_path / cmd), "--tag", "global_step4"]) == 2
        err = one_line_error(capsys)
        assert f"global_step4/{OPTIM1}: cannot read" in err and "truncated" in err
        assert not (tmp_path / cmd).exists()


def test_bad_input_is_one_line_and_exit_2(plain_ckpt, tmp_path, capsys):
    # not a DeepSpeed checkpoint at all
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    assert ckpt_main(["convert", str(junk), str(tmp_path / "o1")]) == 2
    assert "no DeepSpeed model state files" in one_line_error(capsys)
    fake = tmp_path / "fake" / "global_step1"
    fake.mkdir(parents=True)
    torch.save({"weights": torch.ones(3)}, fake / "mp_rank_00_model_states.pt")
    assert ckpt_main(["convert", str(fake), str(tmp_path / "o2")]) == 2
    assert "mp_rank_00_model_states.pt: not a DeepSpeed model states file" in one_line_error(capsys)

    # a mix of two saves: rank 1's optimizer file of the step-3 save copied into the step-4 folder
    mixed = tmp_path / "mixed"
    shutil.copytree(plain_ckpt("tied:3:fp32", 3), mixed)
    shutil.copy(mixed / "global_step3" / OPTIM1, mixed / "global_step4" / OPTIM1)
    assert ckpt_main(["convert", str(mixed), str(tmp_path / "o3"), "--tag", "global_step4"]) == 2
    err = one_line_error(capsys)
    assert f"global_step4/{OPTIM1}: optimizer step" in err and "different saves are mixed" in err
    # ... and another model's partition in the folder
    other = tmp_path / "other"
    shutil.copytree(plain_ckpt("tied:3:fp32"), other)
    shutil.copy(plain_ckpt("frozen:3:fp32") / "global_step3" / OPTIM1, other / "global_step3" / OPTIM1)
    assert ckpt_main(["inspect", str(other)]) == 1
    assert ckpt_main(["convert", str(other), str(tmp_path / "o4")]) == 2
    assert f"global_step3/{OPTIM1}: holds" in one_line_error(capsys)

    # the world size does not match the files: a 3-rank save's rank 2 files beside a 2-rank save's
    wider = tmp_path / "wider"
    shutil.copytree(plain_ckpt("tied:3:fp32"), wider)
    for kind in ("model", "optim"):
        name = f"zero_pp_rank_2_mp_rank_00_{kind}_states.pt"
        shutil.copy(plain_ckpt("tied:3:fp32", 3) / "global_step3" / name, wider / "global_step3" / name)
    assert ckpt_main(["convert", str(wider), str(tmp_path / "o5")]) == 2
    assert "rank 2 file in a checkpoint saved by 2 ranks" in one_line_error(capsys)
    narrower = tmp_path / "narrower"
    shutil.copytree(plain_ckpt("tied:3:fp32", 3), narrower)
    for f in (narrower / "global_step3").glob("zero_pp_rank_2_*"):
        f.unlink()
    assert ckpt_main(["convert", str(narrower), str(tmp_path / "o6")]) == 2
    assert "rank(s) [2] missing" in one_line_error(capsys)


def test_to_universal_of_a_plain_checkpoint(plain_ckpt, tmp_path):
    save = plain_ckpt("tied:3:fp32", 3)
    assert ckpt_main(["to-universal", str(save), str(tmp_path / "u")]) == 0
    tag_dir = tmp_path / "u" / "checkpoints" / "global_step3"
    meta = json.loads((tag_dir / "mmt_meta.json").read_text())
    assert meta["universal"] is True and meta["source_world_size"] == 3 and meta["step"] == 3
    ref = zero_to_fp32(save, "global_step3")
    for name in ("embed.weight", "block.0.weight", "temperature"):
        fp32 = torch.load(tag_dir / "zero" / name / "fp32.pt", weights_only=True)  # ZeRO-3: stored flat
        assert torch.equal(fp32.view(ref[name].shape), ref[name]), name
