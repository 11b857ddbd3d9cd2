"""`mmt export`: per-tower ONNX (run by onnxruntime), TorchScript and torch.export programs match the eager model,
int8 loses little zero-shot accuracy, bad requests are one line. The model is the short demo run of
`tests/fixtures_wheel.py`."""

from __future__ import annotations

import json

import pytest
import torch

import mmt
from mmt.export.cli import main as export_main
from mmt.export.exporter import FP32_TOLERANCE, load_export
from mmt.inference.digits import digit_zero_shot, held_out_digits, val_urls_of

# int8 dynamic quantization perturbs embeddings by ~1e-2 (measured): a few held-out digits may change class
INT8_MAX_DROP = 0.05


@pytest.fixture(scope="module")
def eager(demo_run):
    model, _ = mmt.create_model_and_transforms(demo_run["run_dir"])
    data = held_out_digits(val_urls_of(demo_run["run_dir"]))

    def encode(m, raw):
        with torch.no_grad():
            return getattr(model, f"encode_{m}")(raw)

    return model, encode, data


def test_onnx_fp32_and_int8(demo_run, eager, tmp_path, capsys):
    model, encode, data = eager
    run = str(demo_run["run_dir"])
    assert export_main([run, str(tmp_path / "onnx"), "--format", "onnx"]) == 0
    assert export_main([run, str(tmp_path / "int8"), "--format", "onnx", "--quantize", "int8"]) == 0
    fp32, int8 = load_export(tmp_path / "onnx"), load_export(tmp_path / "int8")
    assert fp32.meta["towers"]["text"]["dynamic"] == ["batch", "length"]
    images, waves, _ = data
    texts = ["a handwritten digit seven", "the number 3 written quite a bit longer than the other one", "9"]
    for m, raw in (("text", texts), ("image", images[:5]), ("audio", waves[:4])):
        ref = encode(m, raw)
        torch.testing.assert_close(fp32.encode(m, raw), ref, rtol=0, atol=FP32_TOLERANCE)
        assert (int8.encode(m, raw) - ref).abs().max() < 0.1  # int8: close, not equal
    assert (tmp_path / "int8/image.onnx").stat().st_size < 0.6 * (tmp_path / "onnx/image.onnx").stat().st_size
    acc = {"eager": digit_zero_shot(encode, data), "int8": digit_zero_shot(int8.encode, data)}
    for m in ("image", "audio"):
        assert acc["int8"][m] >= acc["eager"][m] - INT8_MAX_DROP, acc
    assert acc["eager"]["audio"] > 0.5, acc


def test_torchscript_and_exported_program(demo_run, eager, tmp_path):
    model, encode, data = eager
    run = str(demo_run["run_dir"])
    assert export_main([run, str(tmp_path / "ts"), "--format", "torchscript", "--towers", "audio,image"]) == 0
    assert export_main([run, str(tmp_path / "ep"), "--format", "exported-program", "--towers", "text"]) == 0
    ts, ep = load_export(tmp_path / "ts"), load_export(tmp_path / "ep")
    assert sorted(ts.towers) == ["audio", "image"] and sorted(ep.towers) == ["text"]
    images, waves, _ = data
    torch.testing.assert_close(ts.encode("image", images[:7]), encode("image", images[:7]), rtol=0, atol=1e-5)
    torch.testing.assert_close(ts.encode("audio", waves[:3]), encode("audio", waves[:3]), rtol=0, atol=1e-5)
    texts = ["one", "a much longer prompt about the digit eight"]  # another batch and length than traced
    torch.testing.assert_close(ep.encode("text", texts), encode("text", texts), rtol=0, atol=1e-5)
    pre = json.loads((tmp_path / "ep/preprocess.json").read_text())
    assert pre["data"]["image"]["mean"] == model.preprocess.data_cfg.image.mean


def test_export_refuses_bad_requests(demo_run, tmp_path, capsys):
    run = str(demo_run["run_dir"])
    out = str(tmp_path / "x")
    assert export_main([run, out, "--format", "exported-program", "--quantize", "int8"]) == 2
    assert export_main([run, out, "--towers", "video"]) == 2
    assert export_main([str(tmp_path / "missing"), out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "exported-program" in err[0] and "video" in err[1] and "missing" in err[2]
    assert not (tmp_path / "x").exists()
