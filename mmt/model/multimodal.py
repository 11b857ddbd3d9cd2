"""`MultiModalModel`: encoders per modality, a fusion, task heads and a captioning decoder, composed (no
inheritance between them) from one `MultiModalConfig`. It knows nothing about devices or distribution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmt.config.model import MultiModalConfig
from mmt.model.decoder import CaptionDecoder
from mmt.model.encoders import AudioEncoder, ImageEncoder, TextEncoder
from mmt.model.fusion import FusionOutput, build_fusion
from mmt.model.heads import ContrastiveHead, VQAHead
from mmt.model.pooling import build_pool
from mmt.text import build_tokenizer

ENCODERS = {"text": TextEncoder, "image": ImageEncoder, "audio": AudioEncoder}
# forward argument names per tower: (inputs, attention mask)
INPUT_KEYS = {
    "text": ("text_inputs", "text_attention_mask"),
    "image": ("image_features", "image_attention_mask"),
    "audio": ("audio_features", "audio_attention_mask"),
}


def _is_raw(x: object) -> bool:
    """Raw media (strings, PIL images, paths, numpy waveforms) rather than prepared tensors."""
    return x is not None and not isinstance(x, torch.Tensor)


@dataclass
class MultiModalOutput:
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, N_m, D_m) per modality
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, N_m) bool, True = real token
    pooled: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, D_m)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, E), L2-normalised
    logit_scale: torch.Tensor | None = None  # exp(logit_scale), clamped
    fused: torch.Tensor | None = None  # (B, D)
    vqa_logits: torch.Tensor | None = None  # (B, answers)
    lm_logits: torch.Tensor | None = None  # (B, L, vocab)


class MultiModalModel(nn.Module):
    def __init__(self, cfg: MultiModalConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = cfg.modalities()
        # Turns raw inputs into tensors exactly as the training data pipeline does (`mmt.inference.Preprocess`):
        # set by the inference layer (`mmt.create_model`, `mmt.create_model_and_transforms`); the model itself
        # knows nothing of decoding files or tokenizing.
        self.preprocess: Any = None
        if not self.modalities:
            raise ValueError(
                "the model has no tower: set at least one of model.text / model.image / model.audio"
            )
        self.specs = {m: cfg.resolved(m) for m in self.modalities}
        self.encoders = nn.ModuleDict(
            {m: ENCODERS[m](getattr(cfg, m), self.specs[m]) for m in self.modalities}
        )
        dims = {m: s.dim for m, s in self.specs.items()}

        self.contrastive = ContrastiveHead(cfg.heads, dims) if cfg.heads.contrastive else None
        self.pools = (
            nn.ModuleDict(
                {m: build_pool(getattr(cfg, m).pool, s.dim, s.num_heads) for m, s in self.specs.items()}
            )
            if self.contrastive is not None
            else None
        )

        self.decoder: CaptionDecoder | None = None
        needs_fusion = cfg.heads.vqa_answers > 0 or cfg.decoder is not None
        fusion_spec = cfg.resolved()
        self.fusion = build_fusion(cfg.fusion, fusion_spec, self.modalities) if needs_fusion else None
        self.to_fusion = (
            nn.ModuleDict(
                {m: (nn.Identity() if d == cfg.dim else nn.Linear(d, cfg.dim)) for m, d in dims.items()}
            )
            if needs_fusion
            else None
        )
        self.vqa = VQAHead(cfg.dim, cfg.heads.vqa_answers) if cfg.heads.vqa_answers > 0 else None
        if cfg.decoder is not None:
            text = self.encoders["text"] if "text" in self.encoders else None
            if text is None or text.token_embedding is None:
                raise ValueError(
                    "model.decoder needs a text tower with input=raw (the decoder ties its embedding)"
                )
            tok = build_tokenizer(cfg.text.tokenizer)
            dec_spec = cfg.resolved("decoder")
            self.decoder = CaptionDecoder(
                cfg.decoder, dec_spec, text.token_embedding, cfg.dim, tok.bos_id, tok.eos_id, tok.pad_id
            )

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> MultiModalOutput:
        out = MultiModalOutput()
        for m, (x, mask) in inputs.items():
            if m not in self.encoders:
                raise ValueError(f"got {m} inputs but the model has no {m} tower (model.{m} is not set)")
            out.features[m], out.masks[m] = self.encoders[m](x, mask)
        if self.contrastive is not None:
            out.pooled = {m: self.pools[m](out.features[m], out.masks[m]) for m in out.features}
            out.embeddings, out.logit_scale = self.contrastive(out.pooled, with_scale=True)
        return out

    # ---- raw inputs and embeddings (inference) ---------------------------------------------------------------
    def prepare(self, text: Any = None, image: Any = None, audio: Any = None) -> dict[str, torch.Tensor]:
        """Forward kwargs from raw inputs: ``str | list[str]``, PIL images or image paths, numpy waveforms (at
        ``model.audio.sample_rate``), `mmt.Waveform` or audio paths; on the model's device."""
        if self.preprocess is None:
            raise ValueError(
                "raw inputs need the model's preprocessing: build it with mmt.create_model or "
                "mmt.create_model_and_transforms, or set model.preprocess = mmt.inference.Preprocess(model.cfg)"
            )
        device = next(self.parameters()).device
        return {k: v.to(device) for k, v in self.preprocess.batch(text, image, audio).items()}

    def _raw_to_tensors(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        raw = {m: kwargs[INPUT_KEYS[m][0]] for m in INPUT_KEYS if _is_raw(kwargs.get(INPUT_KEYS[m][0]))}
        if not raw:
            return kwargs
        for m in raw:
            if kwargs.get(INPUT_KEYS[m][1]) is not None:
                raise ValueError(f"{INPUT_KEYS[m][1]} is made from the raw {m} input: do not pass one")
        return {**kwargs, **self.prepare(**raw)}

    def _embed(self, m: str, x: Any, mask: torch.Tensor | None) -> torch.Tensor:
        if self.contrastive is None:
            raise ValueError("the model has no contrastive head (heads.contrastive is false): no embeddings")
        kw = self._raw_to_tensors({INPUT_KEYS[m][0]: x, INPUT_KEYS[m][1]: mask})
        return self.encode({m: (kw[INPUT_KEYS[m][0]], kw.get(INPUT_KEYS[m][1]))}).embeddings[m]

    def encode_text(self, text: Any, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E) L2-normalised text embeddings of ``str | list[str]`` or token ids (+ mask)."""
        return self._embed("text", text, attention_mask)

    def encode_image(self, images: Any, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E) L2-normalised image embeddings of PIL images, image paths or normalised pixel tensors."""
        return self._embed("image", images, attention_mask)

    def encode_audio(self, audio: Any, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, E) L2-normalised audio embeddings of waveforms, audio paths or prepared tensors (+ mask)."""
        return self._embed("audio", audio, attention_mask)

    def fuse(self, out: MultiModalOutput, modalities: list[str]) -> FusionOutput:
        if self.fusion is None:
            raise ValueError("the model has no fusion (it needs heads.vqa_answers > 0 or a decoder)")
        if not modalities:
            raise ValueError("nothing to fuse: no non-text modality was given")
        return self.fusion({m: (self.to_fusion[m](out.features[m]), out.masks[m]) for m in modalities})

    def forward(
        self,
        *,
        text_inputs: torch.Tensor | None = None,
        text_attention_mask: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> MultiModalOutput:
        """Tensors as the data loader makes them, or raw inputs (see `prepare`) for any tower."""
        raw_free = self._raw_to_tensors(
            {
                "text_inputs": text_inputs,
                "text_attention_mask": text_attention_mask,
                "image_features": image_features,
                "image_attention_mask": image_attention_mask,
                "audio_features": audio_features,
                "audio_attention_mask": audio_attention_mask,
            }
        )
        text_inputs, text_attention_mask = raw_free["text_inputs"], raw_free["text_attention_mask"]
        image_features, image_attention_mask = raw_free["image_features"], raw_free["image_attention_mask"]
        audio_features, audio_attention_mask = raw_free["audio_features"], raw_free["audio_attention_mask"]
        given = {
            m: (x, mask)
            for m, x, mask in (
                ("text", text_inputs, text_attention_mask),
                ("image", image_features, image_attention_mask),
                ("audio", audio_features, audio_attention_mask),
            )
            if x is not None
        }
        out = self.encode(given)
        if self.vqa is not None and out.features:
            fused = self.fuse(out, list(out.features))
            out.fused = fused.pooled
            out.vqa_logits = self.vqa(fused.pooled)
        if decoder_input_ids is not None:
            if self.decoder is None:
                raise ValueError(
                    "decoder_input_ids given but the model has no decoder (model.decoder is not set)"
                )
            memory = self.fuse(out, [m for m in out.features if m != "text"])
            out.lm_logits = self.decoder(
                decoder_input_ids, decoder_attention_mask, memory.memory, memory.memory_mask
            )
        return out

    @torch.no_grad()
    def generate(
        self,
        *,
        image_features: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Caption the given image / audio: (B, L) token ids starting with bos."""
        if self.decoder is None:
            raise ValueError("the model has no decoder (model.decoder is not set)")
        given = {
            m: (x, mk)
            for m, x, mk in (
                ("image", image_features, image_attention_mask),
                ("audio", audio_features, audio_attention_mask),
            )
            if x is not None
        }
        out = self.encode(given)
        memory = self.fuse(out, list(out.features))
        return self.decoder.generate(memory.memory, memory.memory_mask, max_new_tokens, num_beams, use_cache)

    # ---- accounting -------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def parameter_counts(self) -> dict[str, int]:
        counts = {m: sum(p.numel() for p in enc.parameters()) for m, enc in self.encoders.items()}
        for name in ("fusion", "decoder", "contrastive", "vqa", "pools"):
            mod = getattr(self, name)
            if mod is not None:
                counts[name] = sum(p.numel() for p in mod.parameters())
        counts["total"] = self.num_parameters()
        return counts

    def tokens_per_sample(self) -> dict[str, int]:
        return {m: enc.num_tokens() for m, enc in self.encoders.items()}

    def flops_per_sample(self) -> dict[str, float]:
        """Training FLOPs (forward + backward) for one sample at the configured maximum lengths, per part.

        Every matmul counted on the length it really sees (2 FLOPs per multiply-add, backward = 2 x forward, as
        behind MFU numbers: Kaplan et al. 2020; PaLM appendix B): the towers' linear layers and attention
        products, the input projections, the contrastive pools and projections (``pools``), the fusion of all
        towers (``fusion``, what VQA runs), the VQA head and the decoder with its own fusion pass over the non-text
        towers and its tied LM head. Checked against `torch.utils.flop_counter` in the tests.
        """
        tokens = self.tokens_per_sample()
        flops: dict[str, float] = {}
        for m, enc in self.encoders.items():
            inputs = sum(
                mod.weight.numel()
                for name, mod in enc.named_modules()
                if isinstance(mod, nn.Linear | nn.Conv2d) and not name.startswith("tower.")
            )
            flops[m] = enc.tower.forward_flops(tokens[m]) + 6.0 * inputs * tokens[m]
        if self.contrastive is not None and self.pools is not None:
            flops["pools"] = sum(
                3.0 * self.pools[m].forward_flops(tokens[m]) + 6.0 * self.contrastive.proj[m].weight.numel()
                for m in self.modalities
            )
        if self.fusion is not None and self.to_fusion is not None:
            to_fusion = sum(
                6.0 * mod.weight.numel() * tokens[m]
                for m, mod in self.to_fusion.items()
                if isinstance(mod, nn.Linear)
            )
            flops["fusion"] = self.fusion.forward_flops(tokens) + to_fusion
        if self.vqa is not None:
            flops["vqa"] = sum(
                6.0 * mod.weight.numel() for mod in self.vqa.modules() if isinstance(mod, nn.Linear)
            )
        if self.decoder is not None and self.fusion is not None:
            # Captioning fuses the non-text towers in a pass of its own (the memory), counted here.
            memory_tokens = {m: t for m, t in tokens.items() if m != "text"}
            n = self.decoder.cfg.max_len
            flops["decoder"] = (
                self.fusion.forward_flops(memory_tokens)
                + self.decoder.tower.forward_flops(n, self.fusion.memory_len(memory_tokens))
                + 6.0 * self.decoder.embedding.weight.numel() * n
            )
        flops["total"] = sum(flops.values())
        return flops
