"""Cross-modal fusion strategies, chosen by ``fusion.kind``.

Every strategy takes the per-modality sequences {name: (B, N_m, D)} with masks and returns a `FusionOutput`:
a memory sequence (what the captioning decoder cross-attends to), its mask, and one pooled vector (what the VQA
head classifies). A sample without some modality has an all-False mask for it; strategies ignore it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmt.config.model import FusionConfig, ModelConfig
from mmt.model.block import TransformerBlock
from mmt.model.pooling import build_pool
from mmt.model.registry import FUSION

MODALITIES = ("text", "image", "audio")


@dataclass
class FusionOutput:
    memory: torch.Tensor  # (B, M, D)
    memory_mask: torch.Tensor  # (B, M) bool
    pooled: torch.Tensor  # (B, D)


Inputs = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Fusion(nn.Module):
    def __init__(self, cfg: FusionConfig, spec: ModelConfig, modalities: list[str]) -> None:
        super().__init__()
        self.cfg, self.spec, self.modalities = cfg, spec, modalities
        # Learned modality-type embeddings tell the fused sequence which tokens came from where.
        self.type_embedding = nn.ParameterDict({m: nn.Parameter(torch.zeros(spec.dim)) for m in modalities})

    def typed(self, inputs: Inputs) -> Inputs:
        return {m: (x + self.type_embedding[m].to(x.dtype), mask) for m, (x, mask) in inputs.items()}

    def forward(self, inputs: Inputs) -> FusionOutput:
        raise NotImplementedError

    def forward_flops(self, tokens: dict[str, int]) -> float:
        """Training FLOPs (3 x forward) for one sample with ``tokens[m]`` tokens per modality: every matmul on the
        length it really sees (checked against torch's FLOP counter in the tests)."""
        raise NotImplementedError

    def memory_len(self, tokens: dict[str, int]) -> int:
        """Length of the memory sequence the decoder cross-attends to."""
        raise NotImplementedError

    def given(self, tokens: dict[str, int]) -> list[str]:
        """The modalities a pass fuses (the keys of ``tokens``), in the fusion's order."""
        return [m for m in self.modalities if m in tokens]


def _present(mask: torch.Tensor) -> torch.Tensor:
    return mask.any(dim=-1)


@FUSION.register("concat")
class ConcatFusion(Fusion):
    """Early fusion: concatenate all tokens and run ``depth`` joint self-attention blocks."""

    def __init__(self, cfg: FusionConfig, spec: ModelConfig, modalities: list[str]) -> None:
        super().__init__(cfg, spec, modalities)
        self.blocks = nn.ModuleList(TransformerBlock(spec) for _ in range(cfg.depth))
        self.pool = build_pool(cfg.pool, spec.dim, spec.num_heads)

    def forward(self, inputs: Inputs) -> FusionOutput:
        inputs = self.typed(inputs)
        x = torch.cat([x for x, _ in inputs.values()], dim=1)
        mask = torch.cat([m for _, m in inputs.values()], dim=1)
        for blk in self.blocks:
            x = blk(x, mask=mask)
        return FusionOutput(x, mask, self.pool(x, mask))

    def forward_flops(self, tokens: dict[str, int]) -> float:  # noqa: D102
        n = sum(tokens[m] for m in self.given(tokens))
        return 3.0 * (sum(blk.forward_flops(n) for blk in self.blocks) + self.pool.forward_flops(n))

    def memory_len(self, tokens: dict[str, int]) -> int:  # noqa: D102
        return sum(tokens[m] for m in self.given(tokens))


class _PooledFusion(Fusion):
    """Base of the strategies that first pool each modality to one vector (attentional pooling)."""

    def __init__(self, cfg: FusionConfig, spec: ModelConfig, modalities: list[str]) -> None:
        super().__init__(cfg, spec, modalities)
        self.pools = nn.ModuleDict({m: build_pool(cfg.pool, spec.dim, spec.num_heads) for m in modalities})

    def pooled(self, inputs: Inputs) -> tuple[list[torch.Tensor], torch.Tensor]:
        vecs = [self.pools[m](x, mask) for m, (x, mask) in inputs.items()]
        present = torch.stack([_present(mask) for _, mask in inputs.values()], dim=1)  # (B, M)
        return vecs, present

    def forward_flops(self, tokens: dict[str, int]) -> float:  # noqa: D102
        return 3.0 * sum(self.pools[m].forward_flops(tokens[m]) for m in self.given(tokens))

    def memory_len(self, tokens: dict[str, int]) -> int:  # noqa: D102
        return len(self.given(tokens))


@FUSION.register("sum")
class SumFusion(_PooledFusion):
    """Sum of the per-modality pooled vectors (absent modalities contribute nothing)."""

    def forward(self, inputs: Inputs) -> FusionOutput:
        vecs, present = self.pooled(self.typed(inputs))
        memory = torch.stack(vecs, dim=1) * present[..., None].to(vecs[0].dtype)
        return FusionOutput(memory, present, memory.sum(dim=1))


@FUSION.register("gated")
class GatedFusion(_PooledFusion):
    """Attention-style gates over modalities: softmax_m(w . tanh(W v_m)), absent modalities masked."""

    def __init__(self, cfg: FusionConfig, spec: ModelConfig, modalities: list[str]) -> None:
        super().__init__(cfg, spec, modalities)
        self.gate = nn.Sequential(
            nn.Linear(spec.dim, spec.dim), nn.Tanh(), nn.Linear(spec.dim, 1, bias=False)
        )

    def forward(self, inputs: Inputs) -> FusionOutput:
        vecs, present = self.pooled(self.typed(inputs))
        memory = torch.stack(vecs, dim=1)  # (B, M, D)
        logits = self.gate(memory).squeeze(-1).masked_fill(~present, torch.finfo(memory.dtype).min)
        gates = torch.softmax(logits, dim=-1)
        memory = memory * gates[..., None]
        return FusionOutput(memory, present, memory.sum(dim=1))

    def forward_flops(self, tokens: dict[str, int]) -> float:  # noqa: D102
        gate = sum(2.0 * m.weight.numel() for m in self.gate if isinstance(m, nn.Linear))
        return super().forward_flops(tokens) + 3.0 * gate * len(self.given(tokens))


@FUSION.register("cross_attention")
class CrossAttentionFusion(Fusion):
    """Each modality's tokens self-attend, then cross-attend to all other modalities' tokens, ``depth`` times."""

    def __init__(self, cfg: FusionConfig, spec: ModelConfig, modalities: list[str]) -> None:
        super().__init__(cfg, spec, modalities)
        self.layers = nn.ModuleList(
            nn.ModuleDict({m: TransformerBlock(spec, cross=True) for m in modalities})
            for _ in range(cfg.depth)
        )
        self.pool = build_pool(cfg.pool, spec.dim, spec.num_heads)

    def forward(self, inputs: Inputs) -> FusionOutput:
        state = dict(self.typed(inputs))
        if len(state) > 1:
            for layer in self.layers:
                new = {}
                for m, (x, mask) in state.items():
                    others = [o for o in state if o != m]
                    ctx = torch.cat([state[o][0] for o in others], dim=1)
                    ctx_mask = torch.cat([state[o][1] for o in others], dim=1)
                    new[m] = (layer[m](x, mask=mask, context=ctx, context_mask=ctx_mask), mask)
                state = new
        x = torch.cat([x for x, _ in state.values()], dim=1)
        mask = torch.cat([m for _, m in state.values()], dim=1)
        return FusionOutput(x, mask, self.pool(x, mask))

    def forward_flops(self, tokens: dict[str, int]) -> float:  # noqa: D102
        n = sum(tokens[m] for m in self.given(tokens))
        fwd = self.pool.forward_flops(n)
        if len(self.given(tokens)) > 1:
            for layer in self.layers:
                fwd += sum(layer[m].forward_flops(tokens[m], n - tokens[m]) for m in self.given(tokens))
        return 3.0 * fwd

    def memory_len(self, tokens: dict[str, int]) -> int:  # noqa: D102
        return sum(tokens[m] for m in self.given(tokens))


@FUSION.register("bottleneck")
class BottleneckFusion(Fusion):
    """Nagrani et al. 2021 (MBT): modalities exchange information only through a few shared bottleneck tokens.

    Per layer, each modality runs a block over [its tokens; bottleneck]; the bottleneck's new value is the mean
    of the per-modality updates over the modalities the sample has.
    """

    def __init__(self, cfg: FusionConfig, spec: ModelConfig, modalities: list[str]) -> None:
        super().__init__(cfg, spec, modalities)
        self.bottleneck = nn.Parameter(torch.randn(cfg.num_bottleneck, spec.dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleDict({m: TransformerBlock(spec) for m in modalities}) for _ in range(cfg.depth)
        )
        self.pool = build_pool(cfg.pool, spec.dim, spec.num_heads)

    def forward(self, inputs: Inputs) -> FusionOutput:
        state = dict(self.typed(inputs))
        b = next(iter(state.values()))[0].shape[0]
        nz = self.bottleneck.shape[0]
        z = self.bottleneck.to(next(iter(state.values()))[0].dtype).expand(b, -1, -1)
        z_mask = torch.ones(b, nz, dtype=torch.bool, device=z.device)
        for layer in self.layers:
            updates, weights, new = [], [], {}
            for m, (x, mask) in state.items():
                n = x.shape[1]
                out = layer[m](torch.cat([x, z], dim=1), mask=torch.cat([mask, z_mask], dim=1))
                new[m] = (out[:, :n], mask)
                updates.append(out[:, n:])
                weights.append(_present(mask).to(z.dtype))
            w = torch.stack(weights, dim=1)[..., None, None]  # (B, M, 1, 1)
            z = (torch.stack(updates, dim=1) * w).sum(1) / w.sum(1).clamp(min=1.0)
            state = new
        x = torch.cat([x for x, _ in state.values()] + [z], dim=1)
        mask = torch.cat([m for _, m in state.values()] + [z_mask], dim=1)
        return FusionOutput(x, mask, self.pool(z, z_mask))

    def forward_flops(self, tokens: dict[str, int]) -> float:  # noqa: D102
        nz = self.bottleneck.shape[0]
        fwd = self.pool.forward_flops(nz)
        for layer in self.layers:
            fwd += sum(layer[m].forward_flops(tokens[m] + nz) for m in self.given(tokens))
        return 3.0 * fwd

    def memory_len(self, tokens: dict[str, int]) -> int:  # noqa: D102
        return sum(tokens[m] for m in self.given(tokens)) + self.bottleneck.shape[0]


@FUSION.register("tensor")
class TensorFusion(_PooledFusion):
    """Zadeh et al. 2017 (TFN): the outer product of [v_m; 1] over modalities captures uni-, bi- and tri-modal
    interactions; each v_m is first projected to ``tensor_dim`` to keep the product small."""

    def __init__(self, cfg: FusionConfig, spec: ModelConfig, modalities: list[str]) -> None:
        super().__init__(cfg, spec, modalities)
        t = cfg.tensor_dim
        self.reduce = nn.ModuleDict({m: nn.Linear(spec.dim, t) for m in modalities})
        self.out = nn.Linear((t + 1) ** len(modalities), spec.dim)
        self.modality_order = list(modalities)

    def forward(self, inputs: Inputs) -> FusionOutput:
        typed = self.typed(inputs)
        vecs, present = self.pooled(typed)
        by_name = dict(zip(typed.keys(), range(len(vecs))))
        b = vecs[0].shape[0]
        prod = vecs[0].new_ones(b, 1)
        for m in self.modality_order:
            if m in by_name:
                i = by_name[m]
                z = self.reduce[m](vecs[i]) * present[:, i, None].to(vecs[i].dtype)
            else:
                z = vecs[0].new_zeros(b, self.cfg.tensor_dim)
            z1 = torch.cat([z, z.new_ones(b, 1)], dim=1)
            prod = (prod[:, :, None] * z1[:, None, :]).flatten(1)
        fused = self.out(prod)
        return FusionOutput(fused[:, None], torch.ones(b, 1, dtype=torch.bool, device=fused.device), fused)

    def forward_flops(self, tokens: dict[str, int]) -> float:  # noqa: D102
        heads = sum(2.0 * self.reduce[m].weight.numel() for m in self.given(tokens))
        heads += 2.0 * self.out.weight.numel()
        return super().forward_flops(tokens) + 3.0 * heads

    def memory_len(self, tokens: dict[str, int]) -> int:  # noqa: D102
        return 1


def build_fusion(cfg: FusionConfig, spec: ModelConfig, modalities: list[str]) -> Fusion:
    return FUSION.get(cfg.kind)(cfg, spec, modalities)


__all__ = ["Fusion", "FusionOutput", "build_fusion"]
