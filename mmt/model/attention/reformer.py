"""Reformer attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer"): LSH attention.

Shared-QK: the keys are the queries, normalised (k_j = q_j / |q_j|), so a query and its nearest keys hash
alike. Angular LSH: h(x) = argmax([x R; -x R]) for a random rotation R (d, b/2), b = ``num_buckets``. Per hash
round the tokens are sorted by (bucket, position) and cut into chunks of ``chunk_size``; a query attends to
the keys of its own bucket in its chunk and the neighbouring chunks (the previous one only when causal), never
to itself unless it has no other key (q . q would dominate). Rounds (``num_hashes``) are combined with weights
softmax over the rounds of each round's log-normaliser. Cost O(N * chunk) per round, no N x N matrix.

With one bucket and one chunk covering the sequence this is exact full shared-QK attention; whenever every
bucket has at most ``chunk_size`` members it equals full attention restricted to same-bucket pairs.
R is drawn once from ``projection_seed`` (a buffer, identical on every rank, not in checkpoints); the paper
redraws it every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmt.model.attention.base import SelfAttention
from mmt.model.registry import ATTENTION


def lsh_rotations(dim: int, num_hashes: int, num_buckets: int, seed: int) -> torch.Tensor:
    """(d, rounds, buckets // 2) Gaussian rotations; empty last axis for a single bucket."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(dim, num_hashes, num_buckets // 2, generator=g, device="cpu")


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, H, rounds, N) bucket ids: argmax over [x R; -x R] (all 0 for one bucket)."""
    b, h, n, _ = x.shape
    if rotations.shape[-1] == 0:
        return torch.zeros(b, h, rotations.shape[1], n, dtype=torch.long, device=x.device)
    rot = torch.einsum("bhnd,drk->bhrnk", x, rotations.to(x.dtype))
    return torch.cat([rot, -rot], dim=-1).argmax(dim=-1)


def _gather_seq(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t (B, H, N, ...) reordered along N by order (B, H, N)."""
    idx = order.view(*order.shape, *([1] * (t.dim() - 3))).expand(*order.shape, *t.shape[3:])
    return t.gather(2, idx)


def lsh_attend(
    q: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    rotations: torch.Tensor,
    chunk: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Shared-QK LSH attention on (B, H, N, d) queries (the keys are their normalised copies) and values."""
    b, h, n, d = q.shape
    k = F.normalize(q, dim=-1)
    buckets = lsh_buckets(k, rotations)  # (B, H, R, N)
    valid = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=q.device)
    positions = torch.arange(n, device=q.device).expand(b, h, n)
    c = min(chunk, n)
    nc = math.ceil(n / c)
    pad = nc * c - n
    slots = torch.arange(nc * c, device=q.device).view(nc, c)
    offsets = (-1, 0) if causal else (-1, 0, 1)
    near = torch.cat([slots + o * c for o in offsets], dim=1)  # (nc, L) slots a chunk's queries see
    in_range = (near >= 0) & (near < nc * c)
    near_c = near.clamp(0, nc * c - 1)
    self_score = torch.finfo(q.dtype).min / 2  # below any real score, above every masked one
    outs, lses = [], []
    # Padding goes to a bucket of its own after every real one, so what it holds never moves a real token.
    pad_bucket = max(1, 2 * rotations.shape[-1])
    for r in range(buckets.shape[2]):
        bkt = torch.where(valid[:, None, :], buckets[:, :, r], pad_bucket)
        order = (bkt * n + positions).argsort(dim=-1)
        sq, sk, sv = (F.pad(_gather_seq(t, order), (0, 0, 0, pad)) for t in (q, k, v))
        spos = F.pad(positions.gather(-1, order), (0, pad), value=-1)
        sbkt = F.pad(bkt.gather(-1, order), (0, pad), value=-1)
        sval = F.pad(valid[:, None, :].expand(b, h, n).gather(-1, order), (0, pad), value=False)
        kk, vv = sk[:, :, near_c], sv[:, :, near_c]  # (B, H, nc, L, d)
        kpos, kbkt, kval = spos[:, :, near_c], sbkt[:, :, near_c], sval[:, :, near_c] & in_range
        qpos, qbkt = spos.view(b, h, nc, c), sbkt.view(b, h, nc, c)
        scores = (sq.view(b, h, nc, c, d) @ kk.transpose(-1, -2)) * d**-0.5  # (B, H, nc, c, L)
        allowed = kval[..., None, :] & (kbkt[..., None, :] == qbkt[..., :, None])
        if causal:
            allowed = allowed & (kpos[..., None, :] <= qpos[..., :, None])
        scores = scores.masked_fill(kpos[..., None, :] == qpos[..., :, None], self_score)
        scores = scores.masked_fill(~allowed, torch.finfo(q.dtype).min)
        lse = scores.logsumexp(dim=-1, keepdim=True)
        attn = torch.exp(scores - lse)
        if dropout_p:
            attn = F.dropout(attn, dropout_p)
        out = (attn @ vv).reshape(b, h, nc * c, -1)[:, :, :n]
        undo = order.argsort(dim=-1)
        outs.append(_gather_seq(out, undo))
        lses.append(_gather_seq(lse.reshape(b, h, nc * c, 1)[:, :, :n], undo))
    if len(outs) == 1:
        return outs[0]
    weights = torch.softmax(torch.stack(lses), dim=0)  # (R, B, H, N, 1)
    return (torch.stack(outs) * weights).sum(dim=0)


@ATTENTION.register("reformer")
class ReformerAttention(SelfAttention):
    supports_score_bias = False
    shared_qk = True

    def __init__(self, dim, heads, cfg):  # noqa: D107
        super().__init__(dim, heads, cfg)
        if cfg.num_buckets > 1 and cfg.num_buckets % 2:
            raise ValueError(f"reformer needs 1 or an even number of buckets, got {cfg.num_buckets}")
        rotations = lsh_rotations(dim // heads, cfg.num_hashes, cfg.num_buckets, cfg.projection_seed)
        self.register_buffer("rotations", rotations, persistent=False)

    def attend(self, q, k, v, mask, causal, pos, q_positions):  # noqa: D102
        if pos is not None and pos.uses_bias:
            raise ValueError("reformer attention cannot add a relative position bias")
        return lsh_attend(q, v, mask, causal, self.rotations, self.cfg.chunk_size, self.dropout_p)

    def forward_flops(self, n: int) -> float:
        c = min(self.cfg.chunk_size, n)
        keys = min(3 * c, n)  # own chunk and both neighbours
        per_round = 4.0 * n * keys * self.dim + n * self.dim * self.cfg.num_buckets
        return self.cfg.num_hashes * per_round
