"""Evaluation on the held-out set for each task, distributed the same way as training.

`evaluate` asks the task (`Task.evaluate`), which calls its metric function here.

Each rank evaluates its share of the held-out shards; per-sample results are gathered and de-duplicated by sample
key before the metrics are computed, so the numbers do not depend on the world size. Every rank runs the same
number of forward passes (a rank that ran out of data repeats a dummy batch and discards it): under ZeRO-3 each
forward is a sequence of collectives, and an uneven count would hang.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mmt.inference.zero_shot import fill, zero_shot_accuracy
from mmt.text import build_tokenizer
from mmt.training.distributed import any_rank, gather_objects
from mmt.training.inputs import FEATURE_KEY, MASK_KEY
from mmt.training.losses import caption_loss, clip_pair_loss
from mmt.training.metrics import corpus_bleu, recall_at_k, recall_chance

if TYPE_CHECKING:  # the tasks call the metric functions below
    from mmt.training.tasks import Task

RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class EvalSettings:
    """How to run an evaluation: where, in which dtype, how many batches per rank (0: all). What a task
    evaluates beyond that is in its own settings (``train.tasks.<name>``)."""

    device: torch.device
    dtype: torch.dtype
    max_batches: int = 0


def uniform_batches(
    loader: Iterable[dict[str, Any]], device: torch.device, max_batches: int = 0
) -> Iterator[tuple[dict[str, Any], bool]]:
    """(batch, real) pairs; continues while any rank has data, feeding `real=False` repeats elsewhere."""
    it = iter(loader)
    last: dict[str, Any] | None = None
    n = 0
    while True:
        batch = next(it, None) if not max_batches or n < max_batches else None
        if not any_rank(batch is not None, device):
            return
        n += 1
        if batch is None:
            yield (last if last is not None else {"keys": ["__dummy__"]}), False
        else:
            last = batch
            yield batch, True


def _text_groups(ids: torch.Tensor, mask: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(row[m].tolist()) for row, m in zip(ids, mask.bool())]


@torch.no_grad()
def evaluate(
    engine: Any,
    task: Task,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    dtype: torch.dtype,
    max_batches: int = 0,
) -> dict[str, float]:
    """``val/...`` metrics of ``task`` over ``loader``; identical on every rank."""
    was_training = engine.module.training
    engine.module.eval()
    try:
        return task.evaluate(engine, loader, EvalSettings(device, dtype, max_batches))
    finally:
        engine.module.train(was_training)


def _dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r["key"], r)
    return [seen[k] for k in sorted(seen)]


def _gather_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in gather_objects(rows):
        out.extend(part)
    return _dedupe(out)


def retrieval_metrics(engine, task, loader, device, dtype, max_batches) -> dict[str, float]:
    rows: list[dict[str, Any]] = []
    logit_scale = None
    for batch, real in uniform_batches(loader, device, max_batches):
        kwargs, present = task.inputs(batch, device, dtype)
        out = engine(**kwargs)
        logit_scale = float(out.logit_scale.float())
        if not real:
            continue
        groups = (
            _text_groups(kwargs[FEATURE_KEY["text"]].cpu(), kwargs[MASK_KEY["text"]].cpu())
            if FEATURE_KEY["text"] in kwargs and MASK_KEY["text"] in kwargs
            else None
        )
        labels = batch.get("labels")
        for i, key in enumerate(batch["keys"]):
            rows.append(
                {
                    "key": key,
                    "emb": {m: e[i].float().cpu() for m, e in out.embeddings.items() if bool(present[m][i])},
                    "group": groups[i] if groups is not None else key,
                    "label": int(labels[i]) if labels is not None else -1,
                }
            )
    rows = _gather_rows(rows)
    metrics: dict[str, float] = {"val/samples": float(len(rows))}
    metrics.update(_zero_shot(engine, task, rows, device))
    r1 = []
    losses = []
    for anchor, other, _ in task.pairs():
        sel = [r for r in rows if anchor in r["emb"] and other in r["emb"]]
        if len(sel) < 2:
            continue
        a = torch.stack([r["emb"][anchor] for r in sel])
        b = torch.stack([r["emb"][other] for r in sel])
        gid: dict[Any, int] = {}
        groups = torch.tensor([gid.setdefault(r["group"], len(gid)) for r in sel])
        for q_name, q, g_name, g in ((other, b, anchor, a), (anchor, a, other, b)):
            rec = recall_at_k(q, g, RECALL_KS, groups)
            for k, v in rec.items():
                metrics[f"val/{q_name}_to_{g_name}_recall_at_{k}"] = v
            r1.append(rec[1])
        metrics[f"val/{anchor}_{other}_recall_at_1_chance"] = recall_chance(groups, 1)
        if logit_scale is not None:
            losses.append(float(clip_pair_loss(a, b, torch.tensor(logit_scale))))
    if r1:
        metrics["val/recall_at_1"] = sum(r1) / len(r1)
    if losses:
        metrics["val/loss"] = sum(losses)
    return metrics


def _zero_shot(engine: Any, task: Task, rows: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
    """``val/zero_shot_<m>_top1|top5``: each non-text embedding against the class prompts' mean text embedding
    (CLIP prompt ensembling, `mmt.inference.zero_shot`), over the rows with a json ``label``. Every rank runs the
    same prompt forwards (ZeRO-3 safe)."""
    settings, m_cfg = task.settings, task.model_cfg
    if not settings.zero_shot_classes or "text" not in m_cfg.modalities():
        return {}
    tok = build_tokenizer(m_cfg.text.tokenizer)
    classes, templates = settings.zero_shot_classes, settings.zero_shot_templates
    prompts = [
        tok.encode(fill(tp, c, i), m_cfg.text.max_len) for i, c in enumerate(classes) for tp in templates
    ]
    ids = torch.full((len(prompts), max(map(len, prompts))), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), True
    emb = engine(text_inputs=ids.to(device), text_attention_mask=mask.to(device)).embeddings["text"]
    emb = torch.nn.functional.normalize(emb.float().cpu().view(len(classes), len(templates), -1), dim=-1)
    classifier = torch.nn.functional.normalize(emb.mean(1), dim=-1).T
    out: dict[str, float] = {}
    for m in sorted({m for r in rows for m in r["emb"]} - {"text"}):
        sel = [r for r in rows if m in r["emb"] and 0 <= r["label"] < len(classes)]
        if not sel:
            continue
        acc = zero_shot_accuracy(
            torch.stack([r["emb"][m] for r in sel]), torch.tensor([r["label"] for r in sel]), classifier
        )
        out[f"val/zero_shot_{m}_top1"], out[f"val/zero_shot_{m}_top5"] = acc[1], acc[5]
    return out


def vqa_metrics(engine, task, loader, device, dtype, max_batches) -> dict[str, float]:
    rows: list[dict[str, Any]] = []
    for batch, real in uniform_batches(loader, device, max_batches):
        kwargs, present = task.inputs(batch, device, dtype)
        out = engine(**kwargs)
        if not real:
            continue
        targets = batch["answer_targets"].float()
        logp = torch.log_softmax(out.vqa_logits.float().cpu(), dim=-1)
        pred = logp.argmax(-1)
        for i, key in enumerate(batch["keys"]):
            t = targets[i]
            if float(t.sum()) <= 0 or ("text" in present and not bool(present["text"][i])):
                continue
            rows.append(
                {"key": key, "acc": min(1.0, float(t[pred[i]])), "nll": float(-(t / t.sum() * logp[i]).sum())}
            )
    rows = _gather_rows(rows)
    n = max(1, len(rows))
    return {
        "val/vqa_accuracy": sum(r["acc"] for r in rows) / n,
        "val/loss": sum(r["nll"] for r in rows) / n,
        "val/samples": float(len(rows)),
    }


def greedy_captions(
    engine: Any,
    kwargs: dict[str, torch.Tensor],
    bos: int,
    eos: int,
    pad: int,
    max_tokens: int,
    device: torch.device,
) -> torch.Tensor:
    """Greedy decoding through full forward passes; the stop decision is agreed by every rank (ZeRO-3 safe)."""
    b = next(iter(kwargs.values())).shape[0]
    seq = torch.full((b, 1), bos, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for _ in range(max_tokens):
        out = engine(
            **kwargs, decoder_input_ids=seq, decoder_attention_mask=torch.ones_like(seq, dtype=torch.bool)
        )
        nxt = out.lm_logits[:, -1].float().argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        done = done | (nxt == eos)
        if not any_rank(not bool(done.all()), device):
            break
    return seq


def _words(tokenizer: Any, ids: list[int]) -> list[str]:
    return tokenizer.decode(ids).lower().split()


def captioning_metrics(engine, task, loader, device, dtype, max_batches, max_tokens) -> dict[str, float]:
    tok = build_tokenizer(task.model_cfg.text.tokenizer)
    max_tokens = min(max_tokens, task.model_cfg.decoder.max_len - 1)
    rows: list[dict[str, Any]] = []
    for batch, real in uniform_batches(loader, device, max_batches):
        kwargs, present = task.inputs(batch, device, dtype)
        if FEATURE_KEY["text"] in batch:
            ids = batch[FEATURE_KEY["text"]].to(device)
            mask = batch[MASK_KEY["text"]].to(device).bool()
        else:  # a dummy batch: any caption will do, results are discarded
            ids = torch.tensor([[tok.bos_id, tok.eos_id]], device=device).expand(len(batch["keys"]), 2)
            mask = torch.ones_like(ids, dtype=torch.bool)
        out = engine(
            **kwargs, decoder_input_ids=ids, decoder_attention_mask=mask | ~mask.any(-1, keepdim=True)
        )
        hyp = greedy_captions(engine, kwargs, tok.bos_id, tok.eos_id, tok.pad_id, max_tokens, device)
        if not real:
            continue
        for i, key in enumerate(batch["keys"]):
            if not bool(mask[i].any()):
                continue
            _, nll = caption_loss(out.lm_logits[i : i + 1], ids[i : i + 1], mask[i : i + 1], 0.0)
            n_tok = int(mask[i, 1:].sum())
            ref = ids[i][mask[i]].tolist()
            h = hyp[i].tolist()
            h = h[: h.index(tok.eos_id)] if tok.eos_id in h else h
            rows.append(
                {
                    "key": key,
                    "nll_sum": float(nll) * n_tok,
                    "tokens": n_tok,
                    "hyp": _words(tok, h),
                    "ref": _words(tok, ref),
                }
            )
    rows = _gather_rows(rows)
    tokens = sum(r["tokens"] for r in rows)
    nll = sum(r["nll_sum"] for r in rows) / max(1, tokens)
    bleu = corpus_bleu([r["hyp"] for r in rows], [[r["ref"]] for r in rows]) if rows else 0.0
    return {
        "val/loss": nll,
        "val/perplexity": math.exp(min(nll, 50.0)),
        "val/bleu4": bleu,
        "val/samples": float(len(rows)),
    }
