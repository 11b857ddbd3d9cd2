"""``mmt export``: per-tower encoders as ONNX, TorchScript or torch.export programs, optionally int8.

Output folder:

* ``<tower>.onnx`` | ``<tower>.pt`` (TorchScript) | ``<tower>.pt2`` (``torch.export.save``): inputs as the data
  pipeline makes them (see `mmt.export.towers`), output ``embedding`` (B, E), L2-normalised; the batch is
  dynamic, and for text the length too (up to ``model.text.max_len``);
* ``config.yaml`` (the model) and ``preprocess.json`` (the data settings: image mean / std, text length, audio
  rate...), from which `load_export` rebuilds the exact preprocessing;
* ``export.json``: format, towers and their input names, quantization, and the parity measured at export time
  (max |exported - eager| on inputs of another batch size and text length than the trace's).

``--quantize int8`` is dynamic quantization of the linear layers (int8 weights, activations quantized per batch
at run time): onnxruntime's ``quantize_dynamic`` for ONNX (MatMul / Gemm), ``torch.ao`` ``quantize_dynamic`` for
TorchScript. A fp32 export whose parity exceeds `FP32_TOLERANCE` is refused.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.export import Dim

from mmt.atomic import atomic_write_text
from mmt.ckpt.convert import _staging_dir, check_output_free, publish_dir
from mmt.ckpt.layout import CheckpointError
from mmt.config.data import DataConfig
from mmt.config.loader import to_dict
from mmt.config.model import MultiModalConfig
from mmt.export.melspec_conv import ConvLogMel
from mmt.export.towers import TOWERS, TowerEncoder, example_inputs
from mmt.inference.factory import _structured, create_model_and_transforms
from mmt.inference.preprocess import Preprocess

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
# fp32 exports compute the same graph; differences are float summation order (and, for the ONNX audio tower,
# the DFT-as-convolution log-mel): 1e-4 on unit-norm embeddings is far below anything that changes a ranking
FP32_TOLERANCE = 1e-4
OPSET = 17


class ExportError(ValueError):
    """A request that cannot be exported (format, tower, quantization): one line."""


def _onnx_module(tower: TowerEncoder) -> torch.nn.Module:
    """ONNX has no complex STFT: swap the audio log-mel for its real-valued convolution form (a copy)."""
    if tower.modality != "audio" or tower.encoder.melspec is None:
        return tower

    tower = copy.deepcopy(tower)
    tower.encoder.melspec = ConvLogMel(tower.encoder.melspec)
    return tower


def _dynamic(tower: TowerEncoder, max_len: int) -> tuple[dict[str, dict[int, str]], tuple[Any, ...]]:
    names = tower.input_names()
    axes = {n: ({0: "batch", 1: "length"} if tower.modality == "text" else {0: "batch"}) for n in names}

    batch = Dim("batch", min=1, max=4096)
    if tower.modality == "text":
        length = Dim("length", min=2, max=max_len)
        shapes = tuple({0: batch, 1: length} for _ in names)
    else:
        shapes = tuple({0: batch} for _ in names)
    return axes, shapes


def _write_onnx(tower: TowerEncoder, ex: tuple, path: Path, max_len: int, int8: bool) -> None:
    axes, _ = _dynamic(tower, max_len)
    target = path.with_suffix(".fp32.onnx") if int8 else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _onnx_module(tower),
            ex,
            str(target),
            input_names=tower.input_names(),
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(target), str(path), weight_type=QuantType.QInt8)
        target.unlink()


def _int8_torch(tower: TowerEncoder) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao points to torchao; the eager API is what runs here
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(tower), {torch.nn.Linear}, dtype=torch.qint8
        )


def _write_torch(tower: TowerEncoder, ex: tuple, path: Path, fmt: str, max_len: int, int8: bool) -> None:
    module = _int8_torch(tower) if int8 else tower
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, ex, check_trace=False), str(path))
            return
        _, shapes = _dynamic(tower, max_len)
        torch.export.save(torch.export.export(module, ex, dynamic_shapes=shapes), str(path))


class ExportedTower:
    """One exported tower, callable on tensors like the eager `TowerEncoder`."""

    def __init__(self, path: Path, fmt: str, input_names: list[str]) -> None:
        self.path, self.fmt, self.input_names = path, fmt, input_names
        if fmt == "onnx":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self._run = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is still what C++ loads
                self._run = torch.jit.load(str(path))
        else:
            self._run = torch.export.load(str(path)).module()

    @torch.no_grad()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.fmt == "onnx":
            feed = {n: x.cpu().numpy() for n, x in zip(self.input_names, inputs)}
            return torch.from_numpy(self._run.run(None, feed)[0])
        return self._run(*inputs)


class LoadedExport:
    """An export folder: its towers, preprocessing and metadata (`load_export`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta = json.loads((path / "export.json").read_text())
        pre = json.loads((path / "preprocess.json").read_text())
        self.model_cfg = _structured(MultiModalConfig, pre["model"])
        self.preprocess = Preprocess(self.model_cfg, _structured(DataConfig, pre["data"]))
        self.towers = {
            m: ExportedTower(path / t["file"], self.meta["format"], t["inputs"])
            for m, t in self.meta["towers"].items()
        }

    def encode(self, modality: str, raw: Any) -> torch.Tensor:
        """Embeddings of raw inputs (strings, images, waveforms, paths) through the exported tower."""
        kw = self.preprocess.batch(**{modality: raw})
        inputs = [kw[n] for n in self.meta["towers"][modality]["inputs"]]
        return self.towers[modality](*inputs)


def load_export(path: str | os.PathLike) -> LoadedExport:
    p = Path(path)
    if not (p / "export.json").is_file():
        raise ExportError(f"{p}: no export.json (is it an `mmt export` output?)")
    return LoadedExport(p)


def _parity(tower: TowerEncoder, exported: ExportedTower, model_cfg: Any) -> float:
    """max |exported - eager| on inputs of another batch size (and text length) than the trace's."""
    ex = example_inputs(model_cfg, tower.modality, batch=3)
    if tower.modality == "text":
        ex = (ex[0][:, :-3].contiguous(), ex[1][:, :-3].contiguous())
    with torch.no_grad():
        return float((exported(*ex) - tower(*ex)).abs().max())


def export_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str = "onnx",
    towers: list[str] | None = None,
    quantize: str = "",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export ``source`` (an ``mmt ckpt convert`` folder or a training run / checkpoint) to ``out``; returns
    the ``export.json`` content."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if quantize not in ("", "int8"):
        raise ExportError(f"--quantize {quantize!r}: only int8 is supported")
    if quantize and fmt == "exported-program":
        raise ExportError("--quantize int8 is supported for onnx and torchscript, not exported-program")
    out = Path(out)
    check_output_free(out, overwrite)
    model, preprocess = create_model_and_transforms(source)
    wanted = towers or [m for m in TOWERS if m in model.encoders]
    bad = [m for m in wanted if m not in model.encoders]
    if bad:
        raise ExportError(
            f"--towers: the model has no {', '.join(bad)} tower (it has {', '.join(model.modalities)})"
        )
    max_len = model.cfg.text.max_len if model.cfg.text is not None else 0
    tmp = _staging_dir(out)
    try:
        meta: dict[str, Any] = {
            "format": fmt,
            "quantize": quantize or None,
            "source": str(source),
            "fp32_tolerance": FP32_TOLERANCE,
            "towers": {},
        }
        for m in wanted:
            tower = TowerEncoder(model, m).eval()
            ex = example_inputs(model.cfg, m)
            path = tmp / f"{m}{FORMATS[fmt]}"
            if fmt == "onnx":
                _write_onnx(tower, ex, path, max_len, bool(quantize))
            else:
                _write_torch(tower, ex, path, fmt, max_len, bool(quantize))
            diff = _parity(tower, ExportedTower(path, fmt, tower.input_names()), model.cfg)
            if not quantize and diff > FP32_TOLERANCE:
                raise ExportError(
                    f"{m} tower: exported output differs from eager by {diff:.2e} > {FP32_TOLERANCE}"
                )
            meta["towers"][m] = {
                "file": path.name,
                "inputs": tower.input_names(),
                "output": "embedding",
                "dynamic": ["batch", "length"] if m == "text" else ["batch"],
                "max_abs_diff_vs_eager": diff,
                "bytes": path.stat().st_size,
            }
        (tmp / "config.yaml").write_text(yaml.safe_dump(to_dict(model.cfg), sort_keys=False))
        data = asdict(preprocess.data_cfg)
        pre = {"model": to_dict(model.cfg), "data": {"image": data["image"], "audio": data["audio"]}}
        pre["data"]["text_max_len"] = data["text_max_len"]
        atomic_write_text(tmp / "preprocess.json", json.dumps(pre, indent=1) + "\n")
        atomic_write_text(tmp / "export.json", json.dumps(meta, indent=1) + "\n")
        publish_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


__all__ = ["FORMATS", "FP32_TOLERANCE", "CheckpointError", "ExportError", "export_model", "load_export"]
