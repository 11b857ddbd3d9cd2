"""Every registered variant: forward + backward on CPU, output shapes, every parameter gets a gradient, and
padded positions never change what real positions see."""

from __future__ import annotations

import pytest
import torch

from mmt.config.kinds import KINDS
from mmt.config.model import AttentionConfig, FusionConfig
from mmt.model.factory import create_model
from mmt.model.registry import ATTENTION, FFN, FUSION, NORM, POOLING, POSITIONAL, REGISTRIES
from tests.model_helpers import scramble_padding, tiny_batch, tiny_config

# Each registry entry appears in at least one case; combinations that the config forbids are left out.
CASES = (
    [
        pytest.param(
            {"attention": AttentionConfig(kind=k, window=4, num_global=1, stride=3, chunk_size=5)},
            id=f"attention={k}",
        )
        for k in ATTENTION.names()
    ]
    + [pytest.param({"positional": p}, id=f"positional={p}") for p in POSITIONAL.names()]
    + [
        pytest.param(
            {"positional": "relative", "attention": AttentionConfig(kind=k, window=4, stride=3)},
            id=f"relative+{k}",
        )
        for k in ("sparse", "strided")
    ]
    + [
        pytest.param(
            {"positional": "rotary", "attention": AttentionConfig(kind=k, window=4, stride=3, chunk_size=5)},
            id=f"rotary+{k}",
        )
        for k in ("sparse", "strided", "linear", "performer", "reformer")
    ]
    + [pytest.param({"ffn": f}, id=f"ffn={f}") for f in FFN.names()]
    + [pytest.param({"norm": n}, id=f"norm={n}") for n in NORM.names()]
    + [
        pytest.param({"fusion": FusionConfig(kind=f, depth=1, tensor_dim=3)}, id=f"fusion={f}")
        for f in FUSION.names()
    ]
    + [pytest.param({"fusion": FusionConfig(kind="concat", pool=p)}, id=f"pool={p}") for p in POOLING.names()]
)


def test_registries_implement_exactly_the_declared_kinds():
    """The config checks names against `KINDS` without importing the model: each must have its class, and a class
    registered under a name the config does not declare fails at import."""
    assert {f: r.names() for f, r in REGISTRIES.items()} == {f: sorted(k) for f, k in KINDS.items()}
    with pytest.raises(KeyError, match="not declared"):
        ATTENTION.register("undeclared")


def _real_outputs(out, batch):
    """Everything a loss may read: features at real positions, vectors, logits at real decoder positions."""
    vals = {f"features.{m}": out.features[m][out.masks[m]] for m in out.features}
    vals.update({f"embeddings.{m}": v for m, v in out.embeddings.items()})
    vals["vqa"] = out.vqa_logits
    vals["lm"] = out.lm_logits[batch["decoder_attention_mask"]]
    return vals


@pytest.mark.parametrize("variant", CASES)
def test_variant_forward_backward_and_padding(variant):
    torch.manual_seed(0)
    model = create_model(tiny_config(**variant))
    batch = tiny_batch()
    out = model(**batch)

    b = 3
    assert out.embeddings["text"].shape == (b, 64)
    assert torch.allclose(out.embeddings["image"].norm(dim=-1), torch.ones(b))
    assert out.vqa_logits.shape == (b, 5)
    assert out.lm_logits.shape == (b, 20, 259)
    assert out.features["image"].shape == (b, 16, 64)  # (32 / 8)^2 patches
    assert out.masks["audio"].sum(-1).tolist() == [16, 12, 8]  # ceil(frames / 4) of 8000, 6000, 3600 samples

    loss = sum(v.float().pow(2).mean() for v in _real_outputs(out, batch).values()) + out.logit_scale
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        ref = _real_outputs(model(**batch), batch)
        alt = _real_outputs(model(**scramble_padding(batch)), batch)
    for key in ref:
        # Padding is masked exactly, so the only differences are float reassociation.
        torch.testing.assert_close(alt[key], ref[key], atol=1e-5, rtol=1e-4, msg=f"padding leaked into {key}")


def test_absent_modality_rows_stay_finite():
    """A sample without audio (all-False mask) must not put NaN anywhere: the ZeRO-3 dummy-input path relies on it."""
    model = create_model(tiny_config())
    batch = tiny_batch()
    batch["audio_attention_mask"][1] = False
    out = model(**batch)
    loss = sum(v.float().sum() for v in out.embeddings.values()) + out.vqa_logits.sum() + out.lm_logits.sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_features_input_mode():
    cfg = tiny_config()
    cfg.image.input, cfg.image.feature_dim, cfg.image.max_tokens = "features", 12, 10
    cfg.audio.input = "spectrogram"
    model = create_model(cfg)
    mask = torch.tensor([[True] * 10, [True] * 6 + [False] * 4])
    out = model(
        image_features=torch.randn(2, 10, 12), image_attention_mask=mask, audio_features=torch.randn(2, 9, 32)
    )
    assert out.features["image"].shape == (2, 10, 64)
    assert out.masks["audio"].shape == (2, 3)  # 9 frames, 4 per token


def test_tiny_configs_are_tiny_and_report_flops():
    for path in ("configs/model/tiny_tri.yaml", "configs/model/tiny_text_image.yaml"):
        model = create_model(path)
        assert model.num_parameters() < 5_000_000
        flops = model.flops_per_sample()
        assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"))
        # At least the 6 x params x tokens term of every tower.
        for m, tokens in model.tokens_per_sample().items():
            tower = sum(p.numel() for p in model.encoders[m].tower.blocks.parameters())
            assert flops[m] >= 6 * tower * tokens * 0.9


@pytest.mark.parametrize(
    "path,lo,hi",
    [
        ("configs/model/base_text_image.yaml", 80e6, 150e6),
        ("configs/model/base_tri.yaml", 80e6, 150e6),
        ("configs/base_text_image_model.json", 80e6, 150e6),
        ("configs/model/large_text_image.yaml", 0.8e9, 1.3e9),
        ("configs/model/large_tri.yaml", 0.8e9, 1.3e9),
    ],
)
def test_named_sizes(path, lo, hi):
    with torch.device("meta"):  # no memory for the weights
        model = create_model(path)
    assert lo < model.num_parameters() < hi
