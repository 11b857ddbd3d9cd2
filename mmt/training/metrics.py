"""Evaluation metrics, written out so they can be checked by hand: recall@k, VQA accuracy, corpus BLEU-4."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch


def recall_at_k(
    query: torch.Tensor,
    gallery: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    groups: torch.Tensor | None = None,
) -> dict[int, float]:
    """Fraction of queries whose match in ``gallery`` ranks in the top k by dot product.

    Row i of ``query`` matches row i of ``gallery``; with ``groups`` (one id per row) it matches every gallery row
    of its group, so duplicate captions (two images both described as "a photo of a seven") are not counted as
    misses. The rank of a query is the number of non-matching gallery rows scoring at least as high as its best
    match: ties count against the query, so a constant similarity scores zero, never chance.
    """
    n = query.shape[0]
    if groups is None:
        groups = torch.arange(n)
    groups = groups.to(query.device)
    sims = query.float() @ gallery.float().t()
    same = groups[:, None] == groups[None, :]
    best_match = sims.masked_fill(~same, float("-inf")).max(dim=1, keepdim=True).values
    rank = ((sims >= best_match) & ~same).sum(dim=1)
    return {k: float((rank < k).sum().item()) / max(1, n) for k in ks}


def recall_chance(groups: torch.Tensor, k: int = 1) -> float:
    """Expected recall@k of a random ranking: a query with g matches among n hits the top k with prob
    ``1 - C(n-g, k) / C(n, k)``."""
    n = groups.numel()
    if n == 0:
        return 0.0
    _, counts = torch.unique(groups, return_counts=True)
    total = 0.0
    for g in counts.tolist():
        miss = 1.0
        for i in range(min(k, n)):
            miss *= max(0.0, (n - g - i) / (n - i))
        total += g * (1.0 - miss)
    return total / n


def vqa_accuracy(pred: Sequence[int], answers: Sequence[Sequence[int]]) -> float:
    """VQA accuracy: per question ``min(1, #annotators who gave the predicted answer / 3)``, averaged.

    (The official metric also averages over the 10 leave-one-out subsets of annotators; with the answer lists
    used here that refinement changes nothing for lists of up to 3 answers and little otherwise.)
    """
    if not pred:
        return 0.0
    total = 0.0
    for p, ans in zip(pred, answers, strict=True):
        total += min(1.0, sum(1 for a in ans if a == p) / 3.0)
    return total / len(pred)


def vqa_accuracy_from_scores(pred: torch.Tensor, scores: torch.Tensor) -> float:
    """Same metric when the answers are given as soft score rows (``scores[i, a] = min(1, count / 3)``)."""
    if pred.numel() == 0:
        return 0.0
    return float(scores.float().gather(1, pred.long().view(-1, 1)).clamp(max=1.0).mean().item())


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], max_n: int = 4
) -> float:
    """Corpus-level BLEU-N (Papineni et al. 2002) with uniform weights and the brevity penalty.

    Clipped n-gram matches and candidate n-gram counts are summed over the corpus before the precisions are
    taken; the reference length per sentence is the reference length closest to the hypothesis (shorter wins
    ties). No smoothing: a corpus with no matching 4-gram scores 0.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1] if refs else 0
        for n in range(1, max_n + 1):
            h = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for r in refs:
                for g, c in _ngrams(r, n).items():
                    max_ref[g] = max(max_ref[g], c)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in h.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return bp * math.exp(log_p)
