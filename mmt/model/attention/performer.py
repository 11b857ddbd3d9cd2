"""Performer attention (Choromanski et al. 2021, "Rethinking Attention with Performers"): FAVOR+.

The softmax kernel exp(q . k / sqrt(d)) equals E_w[phi(q) phi(k)] for the positive random features
phi(x) = exp(W x - |x|^2 / 2) / sqrt(m) of x = q / d^(1/4), with the m rows of W drawn from N(0, I_d) as
orthogonal blocks (lower variance than independent rows). The kernel then reassociates like linear attention,
phi(Q) (phi(K)^T V) in O(N m d) without the N x N matrix, and the causal form runs on the same chunked prefix
sums (`linear_attend`). The error against exact softmax attention falls like 1 / sqrt(m), m = ``num_features``.

W is drawn once from ``projection_seed`` and the head size: a buffer, not a parameter, so it is identical on
every rank and after a resume and is not stored in checkpoints. (The paper also redraws W during training;
a fixed draw keeps runs reproducible.)
"""

from __future__ import annotations

import math

import torch

from mmt.model.attention.base import SelfAttention
from mmt.model.attention.linear import linear_attend
from mmt.model.registry import ATTENTION


def orthogonal_gaussian(num_features: int, dim: int, seed: int) -> torch.Tensor:
    """(m, d): blocks of d orthonormal rows (QR of a Gaussian matrix), each row rescaled to the norm of an
    independent N(0, I_d) vector so that every row is marginally Gaussian (the paper's ORF construction)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks = []
    for _ in range(math.ceil(num_features / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64, device="cpu"))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed
    w = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=g, dtype=torch.float64, device="cpu").norm(dim=1)
    return (w * norms[:, None]).float()


def favor_features(
    x: torch.Tensor, w: torch.Tensor, is_query: bool, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """phi(x) for (B, H, N, d) queries or keys; (B, H, N, m), non-negative.

    For numerical range each row of query features is divided by its largest entry, and all key features by
    the largest over the real keys of a (batch, head): both factors cancel between the numerator and the
    normaliser of the attention.
    """
    d = x.shape[-1]
    x = x * d**-0.25
    logits = x @ w.to(x.dtype).t() - x.pow(2).sum(-1, keepdim=True) / 2
    if is_query:
        stab = logits.amax(-1, keepdim=True)
    else:
        real = logits if mask is None else logits.masked_fill(~mask[:, None, :, None], float("-inf"))
        stab = real.amax(dim=(-2, -1), keepdim=True)
    return torch.exp(logits - stab.detach()) / math.sqrt(w.shape[0])


@ATTENTION.register("performer")
class PerformerAttention(SelfAttention):
    supports_score_bias = False

    def __init__(self, dim, heads, cfg):  # noqa: D107
        super().__init__(dim, heads, cfg)
        w = orthogonal_gaussian(cfg.num_features, dim // heads, cfg.projection_seed)
        self.register_buffer("features", w, persistent=False)

    def attend(self, q, k, v, mask, causal, pos, q_positions):  # noqa: D102
        if pos is not None and pos.uses_bias:
            raise ValueError(
                "performer attention cannot add a relative position bias (it never forms the scores)"
            )
        fq = favor_features(q, self.features, is_query=True)
        fk = favor_features(k, self.features, is_query=False, mask=mask)
        return linear_attend(fq, fk, v, mask, causal, self.cfg.chunk_size)

    def forward_flops(self, n: int) -> float:
        # Features of q and k (n x d x m each), then phi(K)^T V and phi(Q) (.): n x m x d each, per head.
        return 8.0 * n * self.cfg.num_features * self.dim
