"""Performer (FAVOR+) and Reformer (LSH) attention against references written here from the papers' formulas
and against exact softmax attention (torch's `scaled_dot_product_attention`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmt.config.model import AttentionConfig
from mmt.model.attention import PerformerAttention, ReformerAttention

# fp32, different summation orders: ~1e-6 apart. A wrong mask, scale or normaliser moves outputs by > 1e-2.
TOL = dict(atol=2e-5, rtol=1e-4)


def _pad_mask(n: int, real: list[int]) -> torch.Tensor:
    return torch.arange(n)[None] < torch.tensor(real)[:, None]


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def test_performer_error_against_softmax_falls_as_features_grow():
    """FAVOR+ is an unbiased estimate of the softmax kernel: more random features, smaller error (~1/sqrt(m)).
    Measured over 4 projection seeds at each of 4 sizes; inputs of the scale a normed, scaled q / k has."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 64, 16, generator=g) * 0.5).unbind(0)
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = []
    for m in (16, 64, 256, 1024):
        per_seed = []
        for seed in range(4):
            layer = PerformerAttention(
                64, 4, AttentionConfig(kind="performer", num_features=m, projection_seed=seed)
            )
            per_seed.append(
                _relative_error(layer.attend(q, k, v, None, False, None, torch.arange(64)), exact)
            )
        errors.append(sum(per_seed) / len(per_seed))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 3, errors  # 64x the features: ~8x less error in theory; 3x leaves room
    assert errors[-1] < 0.15, errors


def _favor_phi(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Choromanski et al. 2021, eq. for positive random features: exp(w . x - |x|^2 / 2) / sqrt(m), x = q / d^(1/4)."""
    x = x / x.shape[-1] ** 0.25
    return torch.exp(x @ w.t() - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])


@pytest.mark.parametrize("causal", [False, True])
def test_performer_chunked_and_causal_forms_equal_the_dense_kernel_form(causal):
    """The O(N) (chunked prefix-sum when causal) form equals A = phi(Q) phi(K)^T masked, D^-1 A V, built here
    with the layer's projection but none of its code (no stabilisers, no chunks)."""
    torch.manual_seed(0)
    n = 19
    layer = PerformerAttention(32, 4, AttentionConfig(kind="performer", num_features=24, chunk_size=5))
    q, k, v = (torch.randn(3, 2, 4, n, 8) * 0.5).unbind(0)
    mask = _pad_mask(n, [19, 12])
    a = _favor_phi(q, layer.features) @ _favor_phi(k, layer.features).transpose(-1, -2)
    allowed = mask[:, None, None, :].expand(-1, 1, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    a = a * allowed
    expected = (a @ v) / a.sum(-1, keepdim=True)
    got = layer.attend(q, k, v, mask, causal, None, torch.arange(n))
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1, :, :12], expected[1, :, :12], **TOL)


def _shared_qk_reference(q, v, mask, causal, same_bucket=None):
    """Full shared-QK attention of Kitaev et al. 2020: k_j = q_j / |q_j|, scores q_i . k_j / sqrt(d), a token
    attends to itself only when it has no other allowed key (its score then is a large negative constant, so
    across hash rounds a round where it saw others wins); optionally only within its bucket."""
    n, d = q.shape[2], q.shape[3]
    k = q / q.norm(dim=-1, keepdim=True)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    allowed = mask[:, None, None, :].expand(-1, q.shape[1], n, n).clone()
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    if same_bucket is not None:
        allowed &= same_bucket
    eye = torch.eye(n, dtype=torch.bool)
    others = allowed & ~eye
    alone = ~others.any(-1, keepdim=True)
    allowed = torch.where(alone, allowed & eye, others)
    scores = torch.where(alone & eye, torch.full_like(scores, -1e30), scores).masked_fill(
        ~allowed, float("-inf")
    )
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hashes", [1, 2])
def test_reformer_with_one_bucket_equals_full_shared_qk_attention(causal, hashes):
    torch.manual_seed(0)
    n = 21
    layer = ReformerAttention(
        32, 4, AttentionConfig(kind="reformer", num_buckets=1, num_hashes=hashes, chunk_size=32)
    )
    q, v = torch.randn(2, 2, 4, n, 8).unbind(0)
    mask = _pad_mask(n, [21, 13])
    got = layer.attend(q, q, v, mask, causal, None, torch.arange(n))
    expected, _ = _shared_qk_reference(q, v, mask, causal)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1, :, :13], expected[1, :, :13], **TOL)


def _angular_lsh(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Kitaev et al. 2020, sec. 3: h(x) = argmax([xR; -xR]) per hash round; (B, H, rounds, N)."""
    rot = torch.einsum("bhnd,drk->bhrnk", x / x.norm(dim=-1, keepdim=True), rotations)
    return torch.cat([rot, -rot], dim=-1).argmax(-1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hashes", [1, 3])
def test_reformer_chunks_equal_dense_same_bucket_attention(causal, hashes):
    """Sorted, chunked LSH attention equals dense attention restricted to same-bucket pairs once every bucket fits
    in a chunk; rounds combine with weights softmax_r(logsumexp of round r's scores)."""
    torch.manual_seed(0)
    n, b, h = 40, 2, 4
    q, v = torch.randn(2, b, h, n, 8).unbind(0)
    mask = _pad_mask(n, [40, 29])
    probe = ReformerAttention(32, h, AttentionConfig(kind="reformer", num_buckets=4, num_hashes=hashes))
    buckets = _angular_lsh(q, probe.rotations)
    real_buckets = buckets.masked_fill(~mask[:, None, None, :], -1)
    largest = max(int((real_buckets == i).sum(-1).max()) for i in range(4))
    assert largest < n // 2  # several chunks really are cut
    layer = ReformerAttention(
        32, h, AttentionConfig(kind="reformer", num_buckets=4, num_hashes=hashes, chunk_size=largest)
    )
    got = layer.attend(q, q, v, mask, causal, None, torch.arange(n))
    outs, lses = [], []
    for r in range(hashes):
        same = buckets[:, :, r, :, None] == buckets[:, :, r, None, :]
        out, lse = _shared_qk_reference(q, v, mask, causal, same)
        outs.append(out)
        lses.append(lse)
    expected = (torch.stack(outs) * torch.softmax(torch.stack(lses), dim=0)).sum(0)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1, :, :29], expected[1, :, :29], **TOL)
    # ...and the restriction is real: full attention differs.
    full, _ = _shared_qk_reference(q, v, mask, causal)
    assert (got[0] - full[0]).abs().max() > 1e-2
