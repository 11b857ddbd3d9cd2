"""Task losses: CLIP contrastive over features gathered from every rank, soft-target VQA, captioning CE.

Contrastive gathering follows open_clip: ``all_gather`` carries no gradient, so each rank puts its own live
features back into its slot of the gathered tensor. The loss value on every rank is then exactly the loss of the
concatenated global batch, and the gradient reaching a rank's local features is exactly that loss's gradient
with respect to those rows. Because every rank computes the same global loss, summing the per-rank parameter
gradients (not averaging them, as data parallelism does) gives the single-process gradient; `global_loss_scale`
returns the factor that makes the engine's average equal to that sum.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0 (rank order); this rank's rows keep their autograd history.

    Ranks may hold different row counts (a loader that skipped unreadable samples): rows are padded to the
    largest count for the collective and the padding is dropped again.
    """
    rank, world = _dist_world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    biggest = max(counts)
    send = x.detach()
    if x.shape[0] < biggest:
        send = torch.cat([send, send.new_zeros((biggest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(parts, send.contiguous())
    parts = [p[:c] for p, c in zip(parts, counts)]
    parts[rank] = x
    return torch.cat(parts, dim=0)


def clip_pair_loss(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of L2-normalised ``a`` and ``b`` (Radford et al. 2021)."""
    logits = logit_scale * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass."""
    if factor == 1.0:
        return x
    return x * factor + (x * (1.0 - factor)).detach()


def contrastive_loss(
    embeddings: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    logit_scale: torch.Tensor,
    pairs: list[tuple[str, str, float]],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of pairwise CLIP losses over the global batch, each over rows where both modalities exist.

    ``pairs`` is ``[(anchor, other, weight), ...]`` e.g. ``[("text", "image", 1.0), ("text", "audio", 1.0)]``.
    A pair with fewer than two such rows in the global batch contributes zero, but stays connected to the graph
    (``0 * sum``) so every parameter gets a gradient on every rank (ZeRO reduces every gradient on every rank).
    """
    gathered = {m: gather_with_local_grad(e) for m, e in embeddings.items()}
    gathered_present = {
        m: gather_with_local_grad(p.to(torch.bool).to(torch.uint8)).bool() for m, p in present.items()
    }
    total = logit_scale * 0.0
    parts: dict[str, torch.Tensor] = {}
    for a, b, weight in pairs:
        if a not in gathered or b not in gathered:
            continue
        both = gathered_present[a] & gathered_present[b]
        if int(both.sum()) < 2:
            total = total + 0.0 * (gathered[a].sum() + gathered[b].sum())
            continue
        loss = clip_pair_loss(gathered[a][both], gathered[b][both], logit_scale)
        parts[f"{a}_{b}"] = loss.detach()
        total = total + weight * loss
    return total, parts


def global_loss_scale() -> float:
    """Backward multiplier for a loss computed identically on every rank over the gathered global batch.

    The engine averages gradients over ranks; each rank's backward only reaches its own rows, so the average is
    ``1 / world`` of the true gradient. Multiplying the loss by ``world`` restores it (the temperature, which
    every rank differentiates fully, is compensated with `scale_grad`).
    """
    return float(_dist_world()[1])


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft answer scores (normalised per question); rows without answers are ignored.

    Plain one-hot targets reduce this to the usual cross-entropy; several annotator answers give the soft
    target of VQA v2 training (scores from ``min(1, count / 3)``).
    """
    targets = targets.float()
    mass = targets.sum(dim=-1, keepdim=True)
    valid = mass.squeeze(-1) > 0
    dist_t = targets / mass.clamp_min(1e-12)
    logp = F.log_softmax(logits.float(), dim=-1)
    per_row = -(dist_t * logp).sum(dim=-1)
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return per_row[valid].mean()


def caption_loss(
    lm_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    label_smoothing: float,
    present: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced next-token cross-entropy: logits at position t predict token t + 1.

    Returns (smoothed loss for training, plain token NLL for perplexity), both means over real target tokens of
    rows in ``present`` (padding never counts).
    """
    logits = lm_logits[:, :-1].float()
    tgt = targets[:, 1:]
    valid = mask[:, 1:].bool()
    if present is not None:
        valid = valid & present.bool()[:, None]
    if not bool(valid.any()):
        zero = lm_logits.sum() * 0.0
        return zero, zero.detach()
    flat_logits = logits[valid]
    flat_tgt = tgt[valid]
    loss = F.cross_entropy(flat_logits, flat_tgt, label_smoothing=label_smoothing)
    nll = F.cross_entropy(flat_logits.detach(), flat_tgt)
    return loss, nll
