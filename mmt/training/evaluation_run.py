"""`mmt eval`: evaluate a saved checkpoint on the held-out set, on any world size.

The weights are consolidated from the checkpoint into full fp32 tensors (DeepSpeed's ZeRO-to-fp32 reader, exact
for ZeRO-1/2/3; the module file itself for stage 0), loaded into a fresh model and wrapped in a plain (stage 0)
engine for evaluation, so a checkpoint from 8 GPUs evaluates on 1 CPU process and vice versa.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmt.atomic import atomic_write_text
from mmt.ckpt.layout import CheckpointError, read_meta, resolve_tag_dir
from mmt.ckpt.torchio import check_files, checkpoint_loading, load_pt
from mmt.config import Config
from mmt.precision import torch_dtype
from mmt.training import distributed as D
from mmt.training.engine import eval_ds_config, initialize
from mmt.training.evaluate import evaluate
from mmt.training.tasks import build_task


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint folder written by `CheckpointManager` (run it inside
    `checkpoint_loading`: DeepSpeed's reader unpickles the files itself)."""
    meta = read_meta(tag_dir)
    check_files(sorted(tag_dir.glob("*.pt")))  # before DeepSpeed's reader unpickles them
    if int(meta.get("zero_stage", 0)) == 0:
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{tag_dir}: no mp_rank_*_model_states.pt")
        state = load_pt(files[0])
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str,
    output: str = "",
    log_mlflow: bool = False,
    source: str = "config",
    trust_checkpoint: bool = False,
) -> dict[str, Any] | None:
    """Metrics of ``checkpoint`` on ``cfg.data.val_urls`` (returned on rank 0, None elsewhere).

    ``trust_checkpoint`` (or ``train.trust_checkpoint``) unpickles the files fully; otherwise a file naming a
    class outside `mmt.ckpt.torchio`'s allow-list is refused before anything in it runs."""
    import mmt

    t = cfg.train
    env, device, created = D.setup_distributed(t.device, t.dist_backend, t.dist_timeout_s, t.rdzv_timeout_s)
    try:
        tag_dir = resolve_tag_dir(checkpoint, complete=True)
        meta = read_meta(tag_dir)
        model = mmt.create_model(cfg.model)
        with checkpoint_loading(trust_checkpoint or t.trust_checkpoint):
            weights = consolidated_state_dict(tag_dir)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{tag_dir}: weights do not fit model config {source} (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
        precision = t.precision if device.type == "cuda" or t.precision != "fp16" else "fp32"
        dtype = torch_dtype(precision)
        batch = t.eval_batch or max(1, t.micro_batch or t.global_batch // env.world_size)
        engine = initialize(model, eval_ds_config(precision, batch, env.world_size))
        from mmt.training.trainer import default_eval_loader

        loader = default_eval_loader(cfg, env.rank, env.world_size, batch)
        metrics: dict[str, Any] = evaluate(
            engine, build_task(cfg.model, t), loader, device, dtype, t.eval_max_batches, t.caption_max_tokens
        )
        metrics = {**metrics, "checkpoint": str(tag_dir), "step": meta.get("step")}
        if env.rank != 0:
            return None
        if output:
            atomic_write_text(output, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if log_mlflow and meta.get("mlflow_run_id"):
            from mlflow.tracking import MlflowClient

            from mmt.config.secrets import tracking_credentials
            from mmt.tracking.uri import resolve_tracking_uri

            client = MlflowClient(tracking_credentials(resolve_tracking_uri(cfg.tracking.uri)))
            for k, v in metrics.items():
                if k.startswith("val/"):
                    client.log_metric(
                        meta["mlflow_run_id"],
                        k.replace("val/", "eval/", 1),
                        float(v),
                        step=int(meta.get("step") or 0),
                    )
        return metrics
    finally:
        D.teardown_distributed(created)
