"""Numerical parity against references nobody here wrote: torch.nn.MultiheadAttention, torch.nn.RMSNorm, and
formulas written out in this file from the papers (quadratic linear attention with phi = elu + 1, dense attention
under masks built from the sparse patterns' index rules, T5's bucket function transcribed, rotary as a complex
rotation, Vaswani et al.'s sinusoids, ScaleNorm, GLU / SwiGLU / GELU feed-forwards). None of them calls mmt's
own helpers (`dense_mask`, `score_bias`, `bucket`, `feature_map`)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmt.config.model import AttentionConfig
from mmt.model.attention import CrossAttention, LinearAttention, LocalGlobalAttention, MultiHeadAttention
from mmt.model.attention.sparse import StridedAttention
from mmt.model.factory import create_model
from mmt.model.norms import RMSNorm
from mmt.model.positional import RelativePositionBias, RotaryPositional, SinusoidalPositional
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


def _quadratic_linear(q, k, v, mask, causal):
    """Katharopoulos et al. 2020, eq. 4-6 with phi(x) = elu(x) + 1: A = phi(q) phi(k)^T (masked), A v / rowsum(A)."""
    phi = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # noqa: E731  elu(x) + 1, written out
    a = phi(q) @ phi(k).transpose(-1, -2)
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
    expected = _quadratic_linear(q, k, v, mask, causal)
    torch.testing.assert_close(got[:, :, :12], expected[:, :, :12], **TOL)
    torch.testing.assert_close(got[0], expected[0], **TOL)


def _local_global_mask(n: int, window: int, num_global: int, causal: bool) -> torch.Tensor:
    """The index rule, pair by pair: i sees j if their blocks of ``window`` are the same or adjacent (j's block
    not after i's when causal), or either is one of the first ``num_global`` tokens; causal: j <= i."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            block_gap = i // window - j // window
            near = 0 <= block_gap <= 1 if causal else abs(block_gap) <= 1
            allowed[i, j] = (near or i < num_global or j < num_global) and (j <= i or not causal)
    return allowed


def _strided_mask(n: int, stride: int, causal: bool, heads: int) -> torch.Tensor:
    """Child et al. 2019 split over heads: the first half local (blocks of ``stride``, as above), the second half
    j with (i - j) divisible by ``stride``; causal: j <= i."""
    strided = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            strided[i, j] = (i - j) % stride == 0 and (j <= i or not causal)
    local = _local_global_mask(n, stride, 0, causal)
    return torch.stack([local] * (heads // 2) + [strided] * (heads - heads // 2))


def t5_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """Transcribed from Hugging Face transformers' T5Attention._relative_position_bucket (Raffel et al. 2020)."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (16, 40)])
def test_relative_buckets_match_t5(bidirectional, buckets, max_distance):
    pos = RelativePositionBias(32, 4, 512, bidirectional, num_buckets=buckets, max_distance=max_distance)
    rel = torch.arange(-400, 401)
    expected = t5_relative_position_bucket(rel, bidirectional, buckets, max_distance)
    assert torch.equal(pos.bucket(rel), expected)
    assert len(expected.unique()) > buckets // 2  # the log buckets are really used


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
    if cfg.kind == "sparse":
        pattern = _local_global_mask(n, cfg.window, cfg.num_global, causal).expand(4, n, n)
    else:
        pattern = _strided_mask(n, cfg.stride, causal, 4)
    pos = None
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if relative:
        pos = RelativePositionBias(32, 4, 64, bidirectional=not causal)
        nn.init.normal_(pos.bias.weight)
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # j - i
        bucket = t5_relative_position_bucket(rel, not causal)
        scores = scores + pos.bias.weight[bucket].permute(2, 0, 1)  # (H, N, N): the table looked up by hand
    allowed = pattern[None] & mask[:, None, None, :]
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    got = layer.attend(q, k, v, mask, causal, pos, torch.arange(n))
    torch.testing.assert_close(got[0], expected[0], **TOL)
    torch.testing.assert_close(got[1, :, :14], expected[1, :, :14], **TOL)
    # The pattern really is sparse: far-away keys do not matter.
    assert not pattern.all()


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


def test_rotary_is_the_complex_rotation_of_su_et_al():
    """RoPE (Su et al. 2021, eq. 34): pair (x_2i, x_2i+1) as the complex number x_2i + i x_2i+1, multiplied by
    exp(i m theta_i) with theta_i = 10000^(-2i / d) at position m."""
    torch.manual_seed(0)
    d = 8
    rope = RotaryPositional(32, 4, 4096)
    x = torch.randn(2, 4, 10, d, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 3, 7, 50, 100, 1000, 2047, 4095])
    theta = torch.tensor([10000.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    rotation = torch.polar(torch.ones(10, d // 2, dtype=torch.float64), positions[:, None] * theta[None, :])
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 4, 10, d // 2, 2)) * rotation).flatten(
        -2
    )
    # float32 angles at position 4095 carry ~4e-4 absolute error in the argument: compare accordingly.
    torch.testing.assert_close(rope.rotate(x.float(), positions), expected.float(), atol=2e-3, rtol=1e-3)


def test_sinusoidal_table_is_vaswani_et_al():
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (Vaswani et al. 2017)."""
    d, n = 16, 50
    expected = torch.zeros(n, d, dtype=torch.float64)
    for p in range(n):
        for i in range(d // 2):
            expected[p, 2 * i] = math.sin(p / 10000 ** (2 * i / d))
            expected[p, 2 * i + 1] = math.cos(p / 10000 ** (2 * i / d))
    pe = SinusoidalPositional(d, 2, n)
    got = pe.embed(torch.zeros(1, n, d))[0]
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    # offset (decoding) continues the same table
    torch.testing.assert_close(pe.embed(torch.zeros(1, 3, d), offset=7)[0], expected[7:10].float(), **TOL)


def test_rmsnorm_matches_torch():
    torch.manual_seed(0)
    ours = RMSNorm(16)
    nn.init.normal_(ours.weight)
    ref = nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
    x = torch.randn(4, 16)
    torch.testing.assert_close(ours(x), ref(x), **TOL)


def test_scalenorm_matches_formula():
    """Nguyen & Salazar 2019: g * x / ||x|| with one learned scalar g."""
    from mmt.model.norms import ScaleNorm

    torch.manual_seed(0)
    ours = ScaleNorm(16)
    with torch.no_grad():
        ours.scale.fill_(1.7)
    x = torch.randn(4, 16) * 3
    expected = 1.7 * x / torch.sqrt((x * x).sum(-1, keepdim=True))
    torch.testing.assert_close(ours(x), expected, **TOL)


@pytest.mark.parametrize("kind", ["glu", "swiglu", "standard"])
def test_feed_forward_matches_formula(kind):
    """Shazeer 2020: FFN_GLU(x) = (sigmoid(x W) * x V) W2, FFN_SwiGLU(x) = (x W sigmoid(x W) * x V) W2; the
    standard FFN is GELU(x W1 + b1) W2 + b2 with the exact GELU x * Phi(x) (Hendrycks & Gimpel 2016)."""
    from mmt.model.ffn import build_ffn

    torch.manual_seed(0)
    ffn = build_ffn(kind, 16, 4.0)
    x = torch.randn(3, 16)
    if kind == "standard":
        h = x @ ffn.fc1.weight.t() + ffn.fc1.bias
        gelu = h * 0.5 * (1 + torch.erf(h / math.sqrt(2)))
        expected = gelu @ ffn.fc2.weight.t() + ffn.fc2.bias
    else:
        hidden = ffn.w_out.weight.shape[1]
        w, v = ffn.w_in.weight[:hidden], ffn.w_in.weight[hidden:]
        xw = x @ w.t()
        gate = 1 / (1 + torch.exp(-xw))
        if kind == "swiglu":
            gate = xw * gate
        expected = (gate * (x @ v.t())) @ ffn.w_out.weight.t()
    torch.testing.assert_close(ffn(x), expected, **TOL)


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
