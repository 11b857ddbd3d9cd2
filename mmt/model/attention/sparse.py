"""Sparse attention without the N x N matrix.

``sparse`` (local window + global tokens, as in Longformer / BigBird): the sequence is cut into blocks of
``window`` tokens; a query attends to its own block and the neighbouring ones (previous only when causal), plus
the first ``num_global`` tokens, which themselves attend everywhere. Cost O(N * (3 * window + num_global)).

``strided`` (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"): half the heads use the
local block pattern with block = ``stride``; the other half attend to the positions j with (i - j) % stride == 0,
computed by regrouping the sequence by residue. Cost O(N * (3 * stride + N / stride)).

`dense_mask` spells out each pattern as a boolean (H, N, N) matrix: the reference the tests compare to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mmt.model.attention.base import SelfAttention, masked_fill_min
from mmt.model.positional import PositionalEncoding
from mmt.model.registry import ATTENTION


def _softmax_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    bias: torch.Tensor | None,
    dropout_p: float,
    training: bool,
) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    attn = torch.softmax(masked_fill_min(scores, allowed), dim=-1)
    if dropout_p and training:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def _head_bias(bias: torch.Tensor | None, heads: slice) -> torch.Tensor | None:
    return None if bias is None else bias[heads].unsqueeze(0)  # (1, h, ...)


def local_global_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    pos: PositionalEncoding | None,
    q_positions: torch.Tensor,
    window: int,
    num_global: int,
    heads: slice,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    b, h, n, d = q.shape
    w, g = window, min(num_global, n)
    nb = math.ceil(n / w)
    pad = nb * w - n
    valid = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=q.device)
    qp, kp, vp = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    validp = F.pad(valid, (0, pad), value=False)
    idx = torch.arange(nb * w, device=q.device).view(nb, w)
    offsets = (-1, 0) if causal else (-1, 0, 1)
    # Keys of the neighbouring blocks, gathered by index: (B, H, nb, len(offsets) * w, d).
    local_idx = torch.cat([idx + o * w for o in offsets], dim=1)  # (nb, L)
    in_range = (local_idx >= 0) & (local_idx < nb * w) & (local_idx >= g)  # globals are added separately once
    gather = local_idx.clamp(0, nb * w - 1)
    k_loc, v_loc = kp[:, :, gather], vp[:, :, gather]
    key_ok = validp[:, gather] & in_range  # (B, nb, L)
    key_idx = local_idx
    if g:
        gidx = torch.arange(g, device=q.device).expand(nb, g)
        k_loc = torch.cat([k[:, :, :g, None].expand(b, h, g, nb, d).transpose(2, 3), k_loc], dim=3)
        v_loc = torch.cat([v[:, :, :g, None].expand(b, h, g, nb, d).transpose(2, 3), v_loc], dim=3)
        key_ok = torch.cat([valid[:, None, :g].expand(b, nb, g), key_ok], dim=2)
        key_idx = torch.cat([gidx, local_idx], dim=1)
    allowed = key_ok[:, None, :, None, :]  # (B, 1, nb, 1, K)
    if causal:
        allowed = allowed & (key_idx[:, None, :] <= idx[:, :, None])[None, None]
    qb = qp.view(b, h, nb, w, d)
    bias = None
    if pos is not None and pos.uses_bias:
        start = q_positions[0]
        bias = _head_bias(pos.score_bias(idx + start, key_idx + start), heads)
    out = _softmax_attend(qb, k_loc, v_loc, allowed, bias, dropout_p, training)
    out = out.reshape(b, h, nb * w, d)[:, :, :n]
    if g:
        # Global queries see every key: g dense rows.
        allowed_g = valid[:, None, None, :]
        all_idx = torch.arange(n, device=q.device)
        if causal:
            allowed_g = allowed_g & (all_idx[None, :] <= all_idx[:g, None])[None, None]
        bias_g = None
        if pos is not None and pos.uses_bias:
            bias_g = _head_bias(pos.score_bias(q_positions[:g], q_positions), heads)
        out_g = _softmax_attend(q[:, :, :g], k, v, allowed_g, bias_g, dropout_p, training)
        out = torch.cat([out_g, out[:, :, g:]], dim=2)
    return out


def strided_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    pos: PositionalEncoding | None,
    q_positions: torch.Tensor,
    stride: int,
    heads: slice,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Attend to j with (i - j) % stride == 0: regroup (N,) as (stride residues, N / stride steps)."""
    b, h, n, d = q.shape
    s = stride
    nb = math.ceil(n / s)
    pad = nb * s - n
    valid = mask if mask is not None else torch.ones(b, n, dtype=torch.bool, device=q.device)
    qs, ks, vs = (F.pad(t, (0, 0, 0, pad)).view(b, h, nb, s, d).transpose(2, 3) for t in (q, k, v))
    validp = F.pad(valid, (0, pad), value=False).view(b, nb, s).transpose(1, 2)  # (B, s, nb)
    idx = torch.arange(nb * s, device=q.device).view(nb, s).T  # (s, nb)
    allowed = validp[:, None, :, None, :]  # (B, 1, s, 1, nb)
    if causal:
        steps = torch.arange(nb, device=q.device)
        allowed = allowed & (steps[None, :] <= steps[:, None])[None, None, None]
    bias = None
    if pos is not None and pos.uses_bias:
        start = q_positions[0]
        bias = _head_bias(pos.score_bias(idx + start, idx + start), heads)
    out = _softmax_attend(qs, ks, vs, allowed, bias, dropout_p, training)  # (B, h, s, nb, d)
    return out.transpose(2, 3).reshape(b, h, nb * s, d)[:, :, :n]


@ATTENTION.register("sparse")
class LocalGlobalAttention(SelfAttention):
    def attend(self, q, k, v, mask, causal, pos, q_positions):  # noqa: D102
        return local_global_attend(
            q,
            k,
            v,
            mask,
            causal,
            pos,
            q_positions,
            self.cfg.window,
            self.cfg.num_global,
            slice(0, self.heads),
            self.dropout_p,
            self.training,
        )

    def dense_mask(self, n: int, causal: bool) -> torch.Tensor:
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        w, g = self.cfg.window, self.cfg.num_global
        diff = i // w - j // w
        near = (diff >= 0) & (diff <= 1) if causal else diff.abs() <= 1
        allowed = near | (i < g) | (j < g)
        if causal:
            allowed = allowed & (j <= i)
        return allowed.expand(self.heads, n, n)

    def forward_flops(self, n: int) -> float:
        w, g = self.cfg.window, self.cfg.num_global
        return 4.0 * self.dim * (n * (3 * w + g) + g * n)


@ATTENTION.register("strided")
class StridedAttention(SelfAttention):
    def __init__(self, dim, heads, cfg):  # noqa: D107
        super().__init__(dim, heads, cfg)
        if heads < 2:
            raise ValueError(
                "strided attention splits the heads into local and strided halves: needs heads >= 2"
            )
        self.local_heads = heads // 2

    def attend(self, q, k, v, mask, causal, pos, q_positions):  # noqa: D102
        hl, s = self.local_heads, self.cfg.stride
        local = local_global_attend(
            q[:, :hl],
            k[:, :hl],
            v[:, :hl],
            mask,
            causal,
            pos,
            q_positions,
            s,
            0,
            slice(0, hl),
            self.dropout_p,
            self.training,
        )
        strided = strided_attend(
            q[:, hl:],
            k[:, hl:],
            v[:, hl:],
            mask,
            causal,
            pos,
            q_positions,
            s,
            slice(hl, self.heads),
            self.dropout_p,
            self.training,
        )
        return torch.cat([local, strided], dim=1)

    def dense_mask(self, n: int, causal: bool) -> torch.Tensor:
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        s = self.cfg.stride
        diff = i // s - j // s
        local = (diff >= 0) & (diff <= 1) if causal else diff.abs() <= 1
        strided = (i - j) % s == 0
        if causal:
            local, strided = local & (j <= i), strided & (j <= i)
        hl = self.local_heads
        return torch.cat([local.expand(hl, n, n), strided.expand(self.heads - hl, n, n)], dim=0)

    def forward_flops(self, n: int) -> float:
        s = self.cfg.stride
        return 4.0 * (self.dim / 2) * n * (3 * s) + 4.0 * (self.dim / 2) * n * math.ceil(n / s)
