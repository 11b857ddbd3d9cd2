"""Numerical parity against references nobody here wrote: torch.nn.MultiheadAttention, torch.nn.RMSNorm, and
explicit formulas (quadratic linear attention, dense attention under the sparse patterns' explicit masks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmt.config.model import AttentionConfig
from mmt.model.attention import CrossAttention, LinearAttention, LocalGlobalAttention, MultiHeadAttention
from mmt.model.attention.linear import feature_map
from mmt.model.attention.sparse import StridedAttention
from mmt.model.factory import create_model
from mmt.model.norms import RMSNorm
from mmt.model.positional import RelativePositionBias, RotaryPositional
from tests.model_helpers import tiny_batch, tiny_config

# fp32 attention with different summation orders agrees to ~1e-6; 1e-5 leaves room without hiding real bugs
# (a wrong mask or scale moves outputs by > 1e-2).
TOL = dict(atol=1e-5, rtol=1e-4)


def _pad_mask(b: int, n: int, real: list[int]) -> torch.Tensor:
    return torch.arange(n)[None] < torch.tensor(real)[:, None]


@pytest.mark.parametrize("causal", [False, True])
def test_mha_matches_torch_multiheadattention(causal):
    torch.manual_seed(0)
    d, h, n = 32, 4, 11
    ours = MultiHeadAttention(d, h, AttentionConfig())
    ref = nn.MultiheadAttention(d, h, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(2, n, d)
    mask = _pad_mask(2, n, [11, 7])
    attn_mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1) if causal else None
    expected, _ = ref(x, x, x, key_padding_mask=~mask, attn_mask=attn_mask, need_weights=False)
    got = ours(x, mask=mask, causal=causal)
    torch.testing.assert_close(got[mask], expected[mask], **TOL)


def test_cross_attention_matches_torch_multiheadattention():
    torch.manual_seed(0)
    d, h = 32, 4
    ours = CrossAttention(d, h)
    ref = nn.MultiheadAttention(d, h, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x, ctx = torch.randn(2, 5, d), torch.randn(2, 9, d)
    mask = _pad_mask(2, 9, [9, 4])
    expected, _ = ref(x, ctx, ctx, key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(ours(x, ctx, mask), expected, **TOL)


def _quadratic_linear(q, k, v, mask, causal, kind):
    """The explicit O(N^2) form: A = phi(q) phi(k)^T (masked), out = A v / rowsum(A)."""
    a = feature_map(q, kind) @ feature_map(k, kind).transpose(-1, -2)
    n = q.shape[2]
    allowed = mask[:, None, None, :].expand(-1, 1, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    a = a * allowed
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_linear_attention_matches_quadratic_form(causal, chunk):
    torch.manual_seed(0)
    layer = LinearAttention(32, 4, AttentionConfig(kind="linear", chunk_size=chunk))
    q, k, v = torch.randn(3, 2, 4, 19, 8).unbind(0)
    mask = _pad_mask(2, 19, [19, 12])
    got = layer.attend(q, k, v, mask, causal, None, torch.arange(19))
    expected = _quadratic_linear(q, k, v, mask, causal, "elu")
    torch.testing.assert_close(got[:, :, :12], expected[:, :, :12], **TOL)
    torch.testing.assert_close(got[0], expected[0], **TOL)


def _dense_reference(layer, q, k, v, mask, causal, bias=None):
    allowed = layer.dense_mask(q.shape[2], causal)[None] & mask[:, None, None, :]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize(
    "cls,cfg",
    [
        (LocalGlobalAttention, AttentionConfig(kind="sparse", window=4, num_global=2)),
        (LocalGlobalAttention, AttentionConfig(kind="sparse", window=5, num_global=0)),
        (StridedAttention, AttentionConfig(kind="strided", stride=4)),
    ],
)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("relative", [False, True])
def test_sparse_attention_matches_dense_with_explicit_mask(cls, cfg, causal, relative):
    torch.manual_seed(0)
    n = 23
    layer = cls(32, 4, cfg)
    q, k, v = torch.randn(3, 2, 4, n, 8).unbind(0)
    mask = _pad_mask(2, n, [23, 14])
    pos = None
    bias = None
    if relative:
        pos = RelativePositionBias(32, 4, 64, bidirectional=not causal)
        nn.init.normal_(pos.bias.weight)
        bias = pos.score_bias(torch.arange(n), torch.arange(n))[None]
    got = layer.attend(q, k, v, mask, causal, pos, torch.arange(n))
    expected = _dense_reference(layer, q, k, v, mask, causal, bias)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1, :, :14], expected[1, :, :14], **TOL)
    # The pattern really is sparse: far-away keys do not matter.
    assert not layer.dense_mask(n, causal).all()


def test_rotary_scores_invariant_to_shifting_positions():
    torch.manual_seed(0)
    rope = RotaryPositional(32, 4, 4096)
    q, k = torch.randn(2, 1, 4, 10, 8).unbind(0)
    pos = torch.arange(10)

    def scores(shift):
        return rope.rotate(q, pos + shift) @ rope.rotate(k, pos + shift).transpose(-1, -2)

    torch.testing.assert_close(scores(0), scores(1000), atol=1e-4, rtol=1e-4)
    # ...and rotation does change the scores (it is not the identity).
    assert not torch.allclose(scores(0), q @ k.transpose(-1, -2), atol=1e-3)


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    ours = RMSNorm(16)
    nn.init.normal_(ours.weight)
    ref = nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
    x = torch.randn(4, 16)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_swiglu_matches_formula():
    from mmt.model.ffn import SwiGLU

    torch.manual_seed(0)
    ffn = SwiGLU(16, 4.0)
    x = torch.randn(3, 16)
    a, b = (x @ ffn.w_in.weight.t()).chunk(2, -1)
    torch.testing.assert_close(ffn(x), (F.silu(a) * b) @ ffn.w_out.weight.t(), **TOL)


@pytest.mark.parametrize("positional", ["learned", "rotary", "relative", "sinusoidal"])
def test_decoder_kv_cache_equals_full_forward(positional):
    torch.manual_seed(0)
    model = create_model(tiny_config(positional=positional)).eval()
    batch = tiny_batch()
    inputs = dict(
        image_features=batch["image_features"],
        audio_features=batch["audio_features"],
        audio_attention_mask=batch["audio_attention_mask"],
    )
    assert model.decoder.supports_kv_cache
    cached = model.generate(**inputs, max_new_tokens=12, use_cache=True)
    full = model.generate(**inputs, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, full)
    # Incremental logits equal the teacher-forced full pass at every position.
    out = model.encode(
        {
            "image": (inputs["image_features"], None),
            "audio": (inputs["audio_features"], inputs["audio_attention_mask"]),
        }
    )
    mem = model.fuse(out, ["image", "audio"])
    seq = cached
    with torch.no_grad():
        full_logits = model.decoder(seq, None, mem.memory, mem.memory_mask)
        caches = model.decoder._new_caches()
        steps = [
            model.decoder(seq[:, t : t + 1], None, mem.memory, mem.memory_mask, caches, offset=t)
            for t in range(seq.shape[1])
        ]
    torch.testing.assert_close(torch.cat(steps, 1), full_logits, **TOL)


def test_beam_search():
    torch.manual_seed(0)
    model = create_model(tiny_config()).eval()
    img = tiny_batch()["image_features"]
    greedy = model.generate(image_features=img, max_new_tokens=8)
    assert torch.equal(model.generate(image_features=img, max_new_tokens=8, num_beams=1), greedy)
    beams = model.generate(image_features=img, max_new_tokens=8, num_beams=3)
    assert torch.equal(
        beams, model.generate(image_features=img, max_new_tokens=8, num_beams=3, use_cache=False)
    )
    assert beams.shape[0] == 3 and (beams[:, 0] == 1).all()
