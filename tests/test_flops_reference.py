"""Training FLOPs (what MFU divides by) against `torch.utils.flop_counter.FlopCounterMode`, which counts the
matmuls, convolutions and attention products that forward + backward really execute. SDPA runs on its math
backend here so that its products are visible to the counter (the fused CPU kernel is not counted)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmt.config.model import AttentionConfig, FusionConfig, ModelConfig
from mmt.model.block import Tower
from mmt.model.factory import create_model
from mmt.model.registry import ATTENTION
from tests.model_helpers import tiny_config

# The estimates leave out only small terms: normalisers of the kernel attentions (performer / linear
# denominators), LSH hashing details, the mel filterbank and the missing input gradient of the first layer
# (pixels and token ids need none). Measured within 3 % here; a missing or doubled term moves it by >= 10 %.
MARGIN = 0.05


def _counted(fn) -> float:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@pytest.mark.parametrize("kind", ATTENTION.names())
def test_tower_flops_match_the_flop_counter(kind):
    attention = AttentionConfig(
        kind=kind, window=16, num_global=2, stride=16, chunk_size=16, num_features=32, num_buckets=4
    )
    spec = ModelConfig(dim=64, depth=2, num_heads=4, attention=attention)
    tower, n, b = Tower(spec, 128), 128, 2
    x = torch.randn(b, n, 64, requires_grad=True)
    counted = _counted(lambda: tower(x).sum().backward()) / b
    print(f"{kind}: estimate / counted = {tower.forward_flops(n) / counted:.4f}")
    assert tower.forward_flops(n) == pytest.approx(counted, rel=MARGIN)


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated", "cross_attention", "bottleneck", "tensor"])
def test_model_flops_per_sample_match_the_flop_counter(fusion):
    """Every part at full length (no padding): towers, pools, fusion, VQA head, decoder and tied LM head."""
    model = create_model(tiny_config(fusion=FusionConfig(kind=fusion, depth=1, tensor_dim=3)))
    b, text, dec = 2, 48, 24  # model.text.max_len, model.decoder.max_len
    batch = dict(
        text_inputs=torch.randint(3, 259, (b, text)),
        text_attention_mask=torch.ones(b, text, dtype=torch.bool),
        image_features=torch.randn(b, 3, 32, 32),
        audio_features=torch.randn(b, 8000),
        audio_attention_mask=torch.ones(b, 8000, dtype=torch.bool),
        decoder_input_ids=torch.randint(3, 259, (b, dec)),
        decoder_attention_mask=torch.ones(b, dec, dtype=torch.bool),
    )
    assert model.tokens_per_sample() == {"text": text, "image": 16, "audio": 16}  # the batch is full length

    def step():
        out = model(**batch)
        loss = sum(e.sum() for e in out.embeddings.values()) + out.vqa_logits.sum() + out.lm_logits.mean()
        loss.backward()

    counted = _counted(step) / b
    estimate = model.flops_per_sample()
    print(f"{fusion}: estimate / counted = {estimate['total'] / counted:.4f}")
    assert estimate["total"] == pytest.approx(counted, rel=MARGIN), estimate


def test_cross_attending_block_counts_keys_on_the_context():
    """A decoder block over 8 tokens cross-attending to 64: the key/value projection runs on the context."""
    spec = ModelConfig(dim=64, depth=1, num_heads=4)
    tower, n, m, b = Tower(spec, 8, causal=True, cross=True, context_dim=64), 8, 64, 2
    x, ctx = torch.randn(b, n, 64, requires_grad=True), torch.randn(b, m, 64, requires_grad=True)
    counted = _counted(lambda: tower(x, context=ctx).sum().backward()) / b
    assert tower.forward_flops(n, m) == pytest.approx(counted, rel=MARGIN)


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated", "cross_attention", "bottleneck", "tensor"])
def test_fusion_flops_match_the_flop_counter(fusion):
    """Each fusion kind alone, on its own inputs (tokens of very different lengths per modality)."""
    from mmt.model.fusion import build_fusion

    spec = ModelConfig(dim=32, depth=1, num_heads=4)
    module = build_fusion(FusionConfig(kind=fusion, depth=2, tensor_dim=4), spec, ["text", "image", "audio"])
    tokens, b = {"text": 40, "image": 8, "audio": 24}, 2
    inputs = {
        m: (torch.randn(b, n, 32, requires_grad=True), torch.ones(b, n, dtype=torch.bool))
        for m, n in tokens.items()
    }

    def step():
        out = module(inputs)
        (out.memory.sum() + out.pooled.sum()).backward()

    counted = _counted(step) / b
    assert module.forward_flops(tokens) == pytest.approx(counted, rel=MARGIN)
