"""Pooling and every fusion kind on tiny inputs against an independent re-implementation: the module's weights are
copied into torch's own layers (`nn.MultiheadAttention`, pre-norm `nn.TransformerEncoderLayer` /
`nn.TransformerDecoderLayer`) and the papers' formulas (gates, MBT bottleneck averaging, the TFN outer product)
written out here. A sample lacking a modality attends everywhere in that modality (mmt's rule, so softmax stays
finite) and its outputs there are never compared."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmt.config.model import FusionConfig, ModelConfig
from mmt.model.fusion import build_fusion
from mmt.model.pooling import build_pool

D, H = 8, 2
SPEC = ModelConfig(dim=D, depth=1, num_heads=H, ffn="standard", ffn_mult=2.0, norm="layernorm", dropout=0.0)
# fp32, torch's fused layers vs ours: ~1e-6 apart; a wrong gate, mask or average moves outputs by > 1e-2.
TOL = dict(atol=2e-5, rtol=1e-4)


def _safe(mask: torch.Tensor) -> torch.Tensor:
    return mask | ~mask.any(-1, keepdim=True)


def _mha(in_w, in_b, out: nn.Linear) -> nn.MultiheadAttention:
    m = nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        m.in_proj_weight.copy_(in_w)
        m.in_proj_bias.copy_(in_b)
        m.out_proj.weight.copy_(out.weight)
        m.out_proj.bias.copy_(out.bias)
    return m


def _cross_mha(cross) -> nn.MultiheadAttention:
    return _mha(
        torch.cat([cross.q.weight, cross.kv.weight]), torch.cat([cross.q.bias, cross.kv.bias]), cross.proj
    )


def ref_pool(pool, x, mask):
    """Attentional pooling: learned queries attend over the sequence, LayerNorm, mean over the queries."""
    q = pool.queries[None].expand(x.shape[0], -1, -1)
    out, _ = _cross_mha(pool.attn)(q, x, x, key_padding_mask=~_safe(mask), need_weights=False)
    return F.layer_norm(out, (D,), pool.norm.weight, pool.norm.bias, 1e-5).mean(1)


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    dst.weight.data.copy_(src.weight)
    dst.bias.data.copy_(src.bias)


def ref_block(blk, x, mask, ctx=None, ctx_mask=None):
    """A pre-norm block: torch's encoder layer (decoder layer with memory when it cross-attends)."""
    hidden = blk.ffn.fc1.out_features
    if ctx is None:
        layer = nn.TransformerEncoderLayer(D, H, hidden, 0.0, "gelu", batch_first=True, norm_first=True)
    else:
        layer = nn.TransformerDecoderLayer(D, H, hidden, 0.0, "gelu", batch_first=True, norm_first=True)
    layer.self_attn = _mha(blk.attn.qkv.weight, blk.attn.qkv.bias, blk.attn.proj)
    for dst, src in ((layer.linear1, blk.ffn.fc1), (layer.linear2, blk.ffn.fc2)):
        dst.weight.data.copy_(src.weight)
        dst.bias.data.copy_(src.bias)
    _copy_norm(layer.norm1, blk.norm1)
    if ctx is None:
        _copy_norm(layer.norm2, blk.norm2)
        return layer(x, src_key_padding_mask=~_safe(mask))
    layer.multihead_attn = _cross_mha(blk.cross)
    _copy_norm(layer.norm2, blk.norm_cross)
    _copy_norm(layer.norm3, blk.norm2)
    return layer(x, ctx, tgt_key_padding_mask=~_safe(mask), memory_key_padding_mask=~_safe(ctx_mask))


def _inputs():
    """3 samples, 3 modalities; sample 1 has no audio and 2 real text tokens, sample 2 3 real image tokens."""
    g = torch.Generator().manual_seed(0)
    lens = {"text": (3, [3, 2, 3]), "image": (4, [4, 4, 3]), "audio": (2, [2, 0, 2])}
    return {
        m: (torch.randn(3, n, D, generator=g), torch.arange(n)[None] < torch.tensor(real)[:, None])
        for m, (n, real) in lens.items()
    }


def _randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("num_queries", [1, 2])
def test_attention_pool_matches_torch_multiheadattention(num_queries):
    pool = build_pool("attention", D, H, num_queries)
    _randomise(pool)
    x, mask = _inputs()["image"]
    torch.testing.assert_close(pool(x, mask), ref_pool(pool, x, mask), **TOL)


def test_mean_and_first_pooling_by_hand():
    x, mask = _inputs()["text"]
    mean = build_pool("mean", D, H)(x, mask)
    for b in range(3):
        real = [x[b, i] for i in range(x.shape[1]) if mask[b, i]]
        torch.testing.assert_close(mean[b], sum(real) / len(real), **TOL)
    assert torch.equal(build_pool("first", D, H)(x, mask), x[:, 0])


def _reference(kind, fusion, inputs):
    typed = {m: (x + fusion.type_embedding[m], mask) for m, (x, mask) in inputs.items()}
    present = torch.stack([mask.any(-1) for _, mask in typed.values()], dim=1)  # (B, M)
    if kind == "concat":
        x = torch.cat([x for x, _ in typed.values()], 1)
        mask = torch.cat([m for _, m in typed.values()], 1)
        for blk in fusion.blocks:
            x = ref_block(blk, x, mask)
        return x, mask, ref_pool(fusion.pool, x, mask)
    if kind == "cross_attention":
        state = dict(typed)
        for layer in fusion.layers:
            state = {
                m: (
                    ref_block(
                        layer[m],
                        x,
                        mask,
                        torch.cat([state[o][0] for o in state if o != m], 1),
                        torch.cat([state[o][1] for o in state if o != m], 1),
                    ),
                    mask,
                )
                for m, (x, mask) in state.items()
            }
        x = torch.cat([x for x, _ in state.values()], 1)
        mask = torch.cat([m for _, m in state.values()], 1)
        return x, mask, ref_pool(fusion.pool, x, mask)
    if kind == "bottleneck":
        # Nagrani et al. 2021: each modality updates [its tokens; z]; z becomes the mean over present modalities.
        b = present.shape[0]
        z = fusion.bottleneck[None].expand(b, -1, -1)
        z_mask = torch.ones(b, z.shape[1], dtype=torch.bool)
        state = dict(typed)
        for layer in fusion.layers:
            new, total = {}, torch.zeros_like(z)
            for i, (m, (x, mask)) in enumerate(state.items()):
                out = ref_block(layer[m], torch.cat([x, z], 1), torch.cat([mask, z_mask], 1))
                new[m] = (out[:, : x.shape[1]], mask)
                total = total + out[:, x.shape[1] :] * present[:, i, None, None]
            z = total / present.sum(1)[:, None, None]
            state = new
        x = torch.cat([x for x, _ in state.values()] + [z], 1)
        mask = torch.cat([m for _, m in state.values()] + [z_mask], 1)
        return x, mask, ref_pool(fusion.pool, z, z_mask)
    vecs = [ref_pool(fusion.pools[m], x, mask) for m, (x, mask) in typed.items()]
    if kind == "sum":
        memory = torch.stack([v * present[:, i, None] for i, v in enumerate(vecs)], 1)
        return memory, present, sum(v * present[:, i, None] for i, v in enumerate(vecs))
    if kind == "gated":
        # softmax over the present modalities of w . tanh(W v_m + b)
        lin1, lin2 = fusion.gate[0], fusion.gate[2]
        scores = torch.stack([torch.tanh(v @ lin1.weight.t() + lin1.bias) @ lin2.weight[0] for v in vecs], 1)
        gates = torch.softmax(scores.masked_fill(~present, float("-inf")), dim=1)
        memory = torch.stack([v * gates[:, i, None] for i, v in enumerate(vecs)], 1)
        return memory, present, memory.sum(1)
    if kind == "tensor":
        # Zadeh et al. 2017: z_m = [W_m v_m + b_m; 1] (zero vector for an absent modality), fused = W (z_t x z_i x z_a)
        zs = []
        for i, (m, v) in enumerate(zip(typed, vecs)):
            z = (v @ fusion.reduce[m].weight.t() + fusion.reduce[m].bias) * present[:, i, None]
            zs.append(torch.cat([z, torch.ones(z.shape[0], 1)], 1))
        outer = torch.einsum("bi,bj,bk->bijk", *zs).flatten(1)
        fused = outer @ fusion.out.weight.t() + fusion.out.bias
        return fused[:, None], torch.ones(fused.shape[0], 1, dtype=torch.bool), fused
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["concat", "sum", "gated", "cross_attention", "bottleneck", "tensor"])
def test_fusion_matches_independent_formula(kind):
    fusion = build_fusion(
        FusionConfig(kind=kind, depth=2 if kind != "tensor" else 1, num_bottleneck=2, tensor_dim=3),
        SPEC,
        ["text", "image", "audio"],
    )
    _randomise(fusion)
    fusion.train()  # dropout is 0; train mode keeps torch's layers off their inference fast path
    inputs = _inputs()
    got = fusion(inputs)
    memory, memory_mask, pooled = _reference(kind, fusion, inputs)
    assert torch.equal(got.memory_mask, memory_mask)
    torch.testing.assert_close(got.memory[memory_mask], memory[memory_mask], **TOL)
    torch.testing.assert_close(got.pooled, pooled, **TOL)
