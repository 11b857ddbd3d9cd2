"""Zero-shot classification with the contrastive embeddings: CLIP's prompt ensembling (Radford et al. 2021).

A class's weight vector is the normalised mean of the normalised text embeddings of every template filled with
its name; an image (or audio clip) is assigned the class whose vector is most similar. Templates are format
strings: ``{}`` or ``{c}`` is the class name, ``{i}`` its index (``"the number {i}"``), or callables
``name -> text``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Template = str | Callable[[str], str]


def fill(template: Template, name: str, index: int) -> str:
    return template(name) if callable(template) else template.format(name, c=name, i=index)


@torch.no_grad()
def zero_shot_classifier(
    model: Any, classnames: Sequence[str], templates: Sequence[Template], batch_size: int = 256
) -> torch.Tensor:
    """(E, C) class weight vectors from ``model.encode_text`` over every (class, template) prompt."""
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    prompts = [fill(t, c, i) for i, c in enumerate(classnames) for t in templates]
    embs = [model.encode_text(prompts[s : s + batch_size]) for s in range(0, len(prompts), batch_size)]
    emb = torch.cat(embs).float().view(len(classnames), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1).T.contiguous()


def topk_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Fraction of rows whose target is among the k highest logits, for each k (k capped at the class count)."""
    if logits.shape[0] == 0:
        return {k: float("nan") for k in ks}
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == targets.view(-1, 1)
    return {k: float(hit[:, :k].any(dim=1).float().mean()) for k in ks}


@torch.no_grad()
def zero_shot_accuracy(
    embeddings: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Top-k accuracy of (N, E) normalised embeddings against an (E, C) `zero_shot_classifier`."""
    return topk_accuracy(embeddings.float() @ classifier.to(embeddings.device).float(), labels, ks)
