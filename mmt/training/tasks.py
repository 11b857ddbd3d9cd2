"""The three training tasks behind one interface, chosen by ``train.task`` from a small registry (`TASKS`).

A task decides which towers a batch feeds, computes its loss from the model output, says whether that loss is
already global (contrastive: computed on the batch gathered from every rank) or per rank (averaged by the engine),
and computes its held-out metrics (with the functions of `mmt.training.evaluate`). What it needs in the batch is
its `mmt.config.tasks.TaskSpec`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from mmt.config.model import MultiModalConfig
from mmt.config.tasks import TASK_SPECS, task_settings
from mmt.config.train import TrainConfig
from mmt.training.evaluate import EvalSettings, captioning_metrics, retrieval_metrics, vqa_metrics
from mmt.training.inputs import FEATURE_KEY, MASK_KEY, model_inputs
from mmt.training.losses import (
    caption_loss,
    contrastive_loss,
    global_loss_scale,
    scale_grad,
    vqa_loss,
)


@dataclass
class StepResult:
    """``loss`` is what backward sees; ``metrics`` are detached scalars for logging (averaged over ranks)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    kwargs: dict[str, torch.Tensor]


def _touch_outputs(out: Any) -> torch.Tensor:
    """0 x (sum of every differentiable output): keeps every head in the graph on every rank at zero cost."""
    zero = None
    for t in [*out.embeddings.values(), out.logit_scale, out.vqa_logits, out.lm_logits]:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            s = t.float().sum() * 0.0
            zero = s if zero is None else zero + s
    return zero if zero is not None else torch.zeros(())


class Task:
    """One training task: which towers a batch feeds, its loss (`step`) and its held-out metrics (`evaluate`).

    Its batch contract (what the data pipeline puts in the batch) is ``TASK_SPECS[name]`` in `mmt.config.tasks`.
    """

    name = ""

    def __init__(self, model_cfg: MultiModalConfig, train_cfg: TrainConfig) -> None:
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.settings: Any = task_settings(train_cfg.tasks, self.name)  # train.tasks.<name>
        self.check_model()

    def check_model(self) -> None:
        """Raise a clear error when the model lacks what the task needs."""

    def encoder_modalities(self) -> list[str]:
        return self.model_cfg.modalities()

    def inputs(
        self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return model_inputs(batch, self.model_cfg, self.encoder_modalities(), device, dtype)

    def step(self, model: Any, batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> StepResult:
        raise NotImplementedError

    def evaluate(self, engine: Any, loader: Iterable[dict[str, Any]], how: EvalSettings) -> dict[str, float]:
        """``val/...`` metrics over ``loader`` (called by `mmt.training.evaluate.evaluate`, model in eval mode)."""
        raise NotImplementedError

    def flops_parts(self) -> list[str]:
        """Keys of ``model.flops_per_sample()`` this task's step computes (for MFU)."""
        return [*self.encoder_modalities(), "pools"]

    def flops_per_sample(self, model_flops: dict[str, float]) -> float:
        return float(sum(model_flops.get(k, 0.0) for k in self.flops_parts()))


class RetrievalTask(Task):
    """Symmetric CLIP loss over text-image and text-audio pairs (image-audio when there is no text)."""

    name = "retrieval"

    def check_model(self) -> None:
        if not self.model_cfg.heads.contrastive:
            raise ValueError("train.task=retrieval needs model.heads.contrastive=true")
        if len(self.model_cfg.modalities()) < 2:
            raise ValueError("train.task=retrieval needs at least two towers (model.text / image / audio)")

    def pairs(self) -> list[tuple[str, str, float]]:
        mods = self.model_cfg.modalities()
        anchor = "text" if "text" in mods else mods[0]
        weights = {"image": 1.0, "audio": self.settings.text_audio_weight, "text": 1.0}
        return [(anchor, m, weights[m]) for m in mods if m != anchor]

    def step(self, model: Any, batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> StepResult:
        kwargs, present = self.inputs(batch, device, dtype)
        out = model(**kwargs)
        world = global_loss_scale()
        scale = scale_grad(out.logit_scale.float(), 1.0 / world)
        emb = {m: e.float() for m, e in out.embeddings.items()}
        loss, parts = contrastive_loss(emb, present, scale, self.pairs())
        metrics = {"loss": loss.detach(), "logit_scale": out.logit_scale.detach().float()}
        metrics.update({f"loss_{k}": v for k, v in parts.items()})
        return StepResult(loss * world + _touch_outputs(out), metrics, present, kwargs)

    def evaluate(self, engine: Any, loader: Iterable[dict[str, Any]], how: EvalSettings) -> dict[str, float]:
        return retrieval_metrics(engine, self, loader, how.device, how.dtype, how.max_batches)


class VQATask(Task):
    """Answer classification over the fused text + image (+ audio) vector; soft targets."""

    name = "vqa"

    def flops_parts(self) -> list[str]:
        return [*self.encoder_modalities(), "fusion", "vqa"]

    def check_model(self) -> None:
        if self.model_cfg.heads.vqa_answers <= 0:
            raise ValueError("train.task=vqa needs model.heads.vqa_answers > 0 (the answer vocabulary size)")

    def step(self, model: Any, batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> StepResult:
        if "answer_targets" not in batch:
            raise ValueError("train.task=vqa: the batch has no 'answer_targets' (are these VQA shards?)")
        kwargs, present = self.inputs(batch, device, dtype)
        out = model(**kwargs)
        targets = batch["answer_targets"].to(device).float()
        has_q = present.get("text", torch.ones_like(targets[:, 0], dtype=torch.bool))
        targets = targets * has_q[:, None]
        loss = vqa_loss(out.vqa_logits, targets)
        return StepResult(loss + _touch_outputs(out), {"loss": loss.detach()}, present, kwargs)

    def evaluate(self, engine: Any, loader: Iterable[dict[str, Any]], how: EvalSettings) -> dict[str, float]:
        return vqa_metrics(engine, self, loader, how.device, how.dtype, how.max_batches)


class CaptioningTask(Task):
    """Teacher-forced captioning: the decoder reads the caption shifted right and predicts each next token."""

    name = "captioning"

    def check_model(self) -> None:
        if self.model_cfg.decoder is None:
            raise ValueError("train.task=captioning needs a model.decoder section")
        if not [m for m in self.model_cfg.modalities() if m != "text"]:
            raise ValueError("train.task=captioning needs an image or audio tower to caption")

    def encoder_modalities(self) -> list[str]:
        return [m for m in self.model_cfg.modalities() if m != "text"]

    def flops_parts(self) -> list[str]:
        return [*self.encoder_modalities(), "decoder"]  # "decoder" includes its fusion pass

    def step(self, model: Any, batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> StepResult:
        if FEATURE_KEY["text"] not in batch:
            raise ValueError("train.task=captioning: the batch has no text_inputs (captions)")
        kwargs, present = self.inputs(batch, device, dtype)
        ids = batch[FEATURE_KEY["text"]].to(device)
        mask = batch[MASK_KEY["text"]].to(device).bool()
        has_text = batch.get("text_present")
        has_text = mask.any(-1) if has_text is None else has_text.to(device).bool() & mask.any(-1)
        has_source = torch.stack(list(present.values())).any(0)
        dec_mask = mask | ~has_text[:, None]  # rows without a caption: well-defined attention, excluded below
        out = model(**kwargs, decoder_input_ids=ids, decoder_attention_mask=dec_mask)
        loss, nll = caption_loss(
            out.lm_logits, ids, mask, self.settings.label_smoothing, has_text & has_source
        )
        present = {**present, "text": has_text}
        return StepResult(
            loss + _touch_outputs(out), {"loss": loss.detach(), "nll": nll.detach()}, present, kwargs
        )

    def evaluate(self, engine: Any, loader: Iterable[dict[str, Any]], how: EvalSettings) -> dict[str, float]:
        return captioning_metrics(
            engine, self, loader, how.device, how.dtype, how.max_batches, self.settings.max_tokens
        )


TASKS: dict[str, type[Task]] = {t.name: t for t in (RetrievalTask, VQATask, CaptioningTask)}
assert set(TASKS) == set(TASK_SPECS), "every task needs a TaskSpec in mmt.config.tasks and a class here"


def build_task(model_cfg: MultiModalConfig, train_cfg: TrainConfig) -> Task:
    return TASKS[train_cfg.task](model_cfg, train_cfg)
