"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs").

softmax(q k^T) is replaced by phi(q) phi(k)^T with phi(x) = elu(x) + 1, so the product reassociates:
phi(Q) (phi(K)^T V) costs O(N d^2) and never forms the N x N matrix. The causal form runs over chunks of
``chunk_size`` tokens: exact quadratic attention inside a chunk plus a running prefix state
(sum of phi(k) v^T and of phi(k)) carried between chunks, so memory is O(N * chunk) rather than O(N^2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmt.model.attention.base import SelfAttention
from mmt.model.registry import ATTENTION

EPS = 1e-6


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    raise ValueError(f"unknown linear-attention feature map {kind!r}")


def linear_attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, chunk: int
) -> torch.Tensor:
    """q, k already feature-mapped (non-negative). (B, H, N, d) -> (B, H, N, dv)."""
    if mask is not None:
        k = k * mask[:, None, :, None].to(k.dtype)
    if not causal:
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        z = k.sum(dim=2)
        num = torch.einsum("bhnd,bhde->bhne", q, kv)
        den = torch.einsum("bhnd,bhd->bhn", q, z)
        return num / (den[..., None] + EPS)
    b, h, n, d = q.shape
    c = min(chunk, n)
    nc = math.ceil(n / c)
    pad = nc * c - n
    qc, kc, vc = (F.pad(t, (0, 0, 0, pad)).view(b, h, nc, c, t.shape[-1]) for t in (q, k, v))
    tri = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~tri, 0.0)  # (B, H, nc, c, c)
    kv = kc.transpose(-1, -2) @ vc  # (B, H, nc, d, dv): each chunk's contribution
    state = torch.cumsum(kv, dim=2) - kv  # exclusive prefix: chunks strictly before
    zc = kc.sum(dim=3)
    zstate = torch.cumsum(zc, dim=2) - zc
    num = scores @ vc + qc @ state
    den = scores.sum(-1) + (qc * zstate[:, :, :, None, :]).sum(-1)
    out = num / (den[..., None] + EPS)
    return out.reshape(b, h, nc * c, -1)[:, :, :n]


@ATTENTION.register("linear")
class LinearAttention(SelfAttention):
    supports_score_bias = False

    def attend(self, q, k, v, mask, causal, pos, q_positions):  # noqa: D102
        if pos is not None and pos.uses_bias:
            raise ValueError(
                "linear attention cannot add a relative position bias (it never forms the scores)"
            )
        fq, fk = feature_map(q, self.cfg.feature_map), feature_map(k, self.cfg.feature_map)
        return linear_attend(fq, fk, v, mask, causal, self.cfg.chunk_size)

    def forward_flops(self, n: int) -> float:
        return 4.0 * n * self.head_dim * self.dim
