"""`mmt eval`: evaluate a saved checkpoint on the held-out set, on any world size.

The fp32 weights are read from the checkpoint by mmt's own streaming reader (`mmt.ckpt.reader.ZeroCheckpoint`,
the one `mmt ckpt convert` uses: ZeRO 0-3, bit-identical to DeepSpeed's ``zero_to_fp32``) straight into a fresh
model, which is wrapped in a plain (stage 0) engine for evaluation, so a checkpoint from 8 GPUs evaluates on
1 CPU process and vice versa.
"""

from __future__ import annotations

import json
from contextlib import suppress
from pathlib import Path
from typing import Any

from torch import nn

from mmt.atomic import atomic_write_text
from mmt.ckpt.layout import read_meta, resolve_tag_dir
from mmt.ckpt.reader import ZeroCheckpoint
from mmt.ckpt.torchio import checkpoint_loading
from mmt.config import Config
from mmt.data.loader import build_eval_loader
from mmt.model.factory import create_model
from mmt.precision import torch_dtype
from mmt.secrets import tracking_credentials
from mmt.tracking.uri import resolve_tracking_uri
from mmt.training import distributed as D
from mmt.training.engine import destroy, eval_ds_config, initialize
from mmt.training.evaluate import evaluate
from mmt.training.tasks import build_task


def load_checkpoint_model(cfg: Config, tag_dir: Path, source: str, trust: bool) -> nn.Module:
    """A model built from ``cfg.model`` holding the fp32 weights of the finished save ``tag_dir``.

    ``trust`` unpickles the files fully; otherwise a file naming a class outside `mmt.ckpt.torchio`'s allow-list
    is refused before anything in it runs. Weights that do not fit the config are refused naming both."""
    model = create_model(cfg.model)
    with checkpoint_loading(trust):
        ZeroCheckpoint(tag_dir).load_into(model, f"model config {source}")
    return model


def log_to_run(cfg: Config, meta: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Add the ``val/*`` metrics as ``eval/*`` to the MLflow run that saved the checkpoint (if it had one)."""
    if not meta.get("mlflow_run_id"):
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_credentials(resolve_tracking_uri(cfg.tracking.uri)))
    for k, v in metrics.items():
        if k.startswith("val/"):
            client.log_metric(
                meta["mlflow_run_id"],
                k.replace("val/", "eval/", 1),
                float(v),
                step=int(meta.get("step") or 0),
            )


def _run_evaluation(cfg: Config, model: nn.Module, env: D.DistEnv, device: Any) -> dict[str, Any]:
    """The metrics of ``model`` on ``cfg.data.val_urls`` through a plain (ZeRO-0) engine, destroyed afterwards so
    that the teardown can free the process groups (see `mmt.training.distributed.destroy_process_groups`)."""
    t = cfg.train
    precision = t.precision if device.type == "cuda" or t.precision != "fp16" else "fp32"
    batch = t.eval_batch or max(1, t.micro_batch or t.global_batch // env.world_size)
    engine = initialize(model, eval_ds_config(precision, batch, env.world_size))
    try:
        loader = build_eval_loader(cfg, env.rank, env.world_size, batch)
        task = build_task(cfg.model, t)
        return evaluate(engine, task, loader, device, torch_dtype(precision), t.eval_max_batches)
    finally:
        with suppress(Exception):
            destroy(engine)
        del engine


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str,
    output: str = "",
    log_mlflow: bool = False,
    source: str = "config",
    trust_checkpoint: bool = False,
) -> dict[str, Any] | None:
    """Metrics of ``checkpoint`` (a tag, checkpoints or run folder: `resolve_tag_dir`, finished saves only) on
    ``cfg.data.val_urls``; returned on rank 0, None elsewhere.

    ``trust_checkpoint`` (or ``train.trust_checkpoint``) unpickles the files fully (see `load_checkpoint_model`)."""
    t = cfg.train
    env, device, created = D.setup_distributed(t.device, t.dist_backend, t.dist_timeout_s, t.rdzv_timeout_s)
    try:
        tag_dir = resolve_tag_dir(checkpoint, complete=True)
        meta = read_meta(tag_dir)
        model = load_checkpoint_model(cfg, tag_dir, source, trust_checkpoint or t.trust_checkpoint)
        metrics = _run_evaluation(cfg, model, env, device)
        metrics = {**metrics, "checkpoint": str(tag_dir), "step": meta.get("step")}
        if env.rank != 0:
            return None
        if output:
            atomic_write_text(output, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if log_mlflow:
            log_to_run(cfg, meta, metrics)
        return metrics
    finally:
        D.teardown_distributed(created)
