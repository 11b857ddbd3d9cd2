"""Typed configuration of the multimodal model: the `model.*` section of every mmt config.

`ModelConfig` holds the transformer settings every tower shares; `MultiModalConfig` extends it with the towers
(`text`, `image`, `audio`: each an `EncoderConfig`), the fusion, the captioning decoder and the task heads.
A tower field left at ``None`` inherits the shared value, so ``model.attention.kind=linear`` switches every tower
while ``model.image.depth=12`` changes only the image tower.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mmt.config.errors import ConfigError
from mmt.config.fields import cfg_field


@dataclass
class AttentionConfig:
    kind: str = cfg_field("mha", doc="self-attention kind", registry="attention")
    window: int = cfg_field(
        32, doc="sparse: block size of the local window (a query sees its block and the neighbours)", ge=1
    )
    num_global: int = cfg_field(
        1, doc="sparse: leading tokens that attend to and are attended by every position", ge=0
    )
    stride: int = cfg_field(
        32, doc="strided: the stride of Child et al. 2019 (half the heads local, half strided)", ge=1
    )
    feature_map: str = cfg_field("elu", doc="linear: kernel feature map phi", choices=("elu", "relu"))
    chunk_size: int = cfg_field(
        64,
        doc="linear / performer (causal) and reformer: chunk length (memory O(N * chunk), not O(N^2))",
        ge=1,
    )
    num_features: int = cfg_field(
        64, doc="performer: random features m (error vs softmax falls like 1/sqrt(m))", ge=1
    )
    num_buckets: int = cfg_field(8, doc="reformer: LSH buckets per hash round (1 or even)", ge=1)
    num_hashes: int = cfg_field(1, doc="reformer: hash rounds (more rounds: fewer missed neighbours)", ge=1)
    projection_seed: int = cfg_field(
        0, doc="performer / reformer: seed of the fixed random projections (same on every rank)", ge=0
    )
    dropout: float = cfg_field(0.0, doc="dropout on attention weights (dense kinds only)", ge=0.0, le=1.0)


@dataclass
class ModelConfig:
    """Transformer settings shared by every tower, the fusion layers and the decoder."""

    dim: int = cfg_field(64, doc="model width", ge=1)
    depth: int = cfg_field(2, doc="blocks per tower", ge=0)
    num_heads: int = cfg_field(4, doc="attention heads (must divide dim)", ge=1)
    ffn: str = cfg_field("swiglu", doc="feed-forward kind", registry="ffn")
    ffn_mult: float = cfg_field(
        4.0, doc="hidden width / dim (gated kinds use 2/3 of it to match parameters)", gt=0
    )
    norm: str = cfg_field("layernorm", doc="normalisation kind", registry="norm")
    positional: str = cfg_field("learned", doc="positional encoding kind", registry="positional")
    dropout: float = cfg_field(0.0, doc="residual dropout", ge=0.0, le=1.0)
    attention: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass
class EncoderConfig:
    """One tower. ``None`` fields inherit from the shared `ModelConfig`."""

    dim: int | None = cfg_field(None, doc="tower width (None: model.dim)", ge=1)
    depth: int | None = cfg_field(None, doc="blocks (None: model.depth)", ge=0)
    num_heads: int | None = cfg_field(None, doc="attention heads (None: model.num_heads)", ge=1)
    ffn: str | None = cfg_field(None, doc="feed-forward kind (None: model.ffn)", registry="ffn")
    ffn_mult: float | None = cfg_field(None, doc="(None: model.ffn_mult)", gt=0)
    norm: str | None = cfg_field(None, doc="(None: model.norm)", registry="norm")
    positional: str | None = cfg_field(None, doc="(None: model.positional)", registry="positional")
    dropout: float | None = cfg_field(None, doc="(None: model.dropout)", ge=0.0, le=1.0)
    attention: AttentionConfig | None = cfg_field(None, doc="(None: model.attention)")
    input: str = cfg_field(
        "raw",
        doc="raw (tokens / pixels / waveform), spectrogram (audio) or features (precomputed)",
        choices=("raw", "spectrogram", "features"),
    )
    feature_dim: int = cfg_field(0, doc="width of precomputed feature inputs (input=features)", ge=0)
    pool: str = cfg_field("attention", doc="how the sequence becomes one vector", registry="pooling")


@dataclass
class TextEncoderConfig(EncoderConfig):
    tokenizer: str = cfg_field("byte", doc="'byte' (nothing downloaded) or a path to a tokenizers JSON file")
    vocab_size: int = cfg_field(259, doc="must match the tokenizer (byte: 259)", ge=1)
    max_len: int = cfg_field(64, doc="maximum tokens, special tokens included", ge=2)


@dataclass
class ImageEncoderConfig(EncoderConfig):
    image_size: int = cfg_field(32, doc="square input side in pixels (input=raw)", ge=1)
    patch_size: int = cfg_field(8, doc="ViT patch side", ge=1)
    channels: int = cfg_field(3, doc="input channels", ge=1)
    max_tokens: int = cfg_field(256, doc="maximum tokens for input=features", ge=1)


@dataclass
class AudioEncoderConfig(EncoderConfig):
    sample_rate: int = cfg_field(16000, doc="waveform sample rate (input=raw)", ge=1)
    n_mels: int = cfg_field(64, doc="mel bands", ge=1)
    n_fft: int = cfg_field(400, doc="STFT size", ge=2)
    hop_length: int = cfg_field(160, doc="STFT hop", ge=1)
    patch_frames: int = cfg_field(4, doc="spectrogram frames per token", ge=1)
    max_seconds: float = cfg_field(2.0, doc="longest clip (sets the positional table)", gt=0)
    max_tokens: int = cfg_field(256, doc="maximum tokens for input=features", ge=1)


@dataclass
class FusionConfig:
    kind: str = cfg_field("concat", doc="cross-modal fusion strategy", registry="fusion")
    depth: int = cfg_field(1, doc="fusion blocks (concat, cross_attention, bottleneck)", ge=0)
    num_bottleneck: int = cfg_field(4, doc="bottleneck tokens (Nagrani et al. 2021)", ge=1)
    tensor_dim: int = cfg_field(
        8, doc="per-modality width before the outer product (Zadeh et al. 2017)", ge=1
    )
    pool: str = cfg_field("attention", doc="how the fused sequence becomes one vector", registry="pooling")


@dataclass
class DecoderConfig:
    """Captioning decoder: causal self-attention + cross-attention to the fused memory."""

    depth: int | None = cfg_field(None, doc="(None: model.depth)", ge=1)
    num_heads: int | None = cfg_field(None, doc="(None: model.num_heads)", ge=1)
    ffn: str | None = cfg_field(None, doc="(None: model.ffn)", registry="ffn")
    ffn_mult: float | None = cfg_field(None, doc="(None: model.ffn_mult)", gt=0)
    norm: str | None = cfg_field(None, doc="(None: model.norm)", registry="norm")
    positional: str | None = cfg_field(None, doc="(None: model.positional)", registry="positional")
    dropout: float | None = cfg_field(None, doc="(None: model.dropout)", ge=0.0, le=1.0)
    attention: AttentionConfig | None = cfg_field(None, doc="(None: model.attention)")
    max_len: int = cfg_field(64, doc="longest caption in tokens", ge=2)


@dataclass
class HeadsConfig:
    contrastive: bool = cfg_field(True, doc="CLIP-style projection of each tower into a shared space")
    embed_dim: int = cfg_field(64, doc="shared embedding width", ge=1)
    init_temperature: float = cfg_field(0.07, doc="initial softmax temperature", gt=0)
    max_logit_scale: float = cfg_field(100.0, doc="clamp of 1/temperature", gt=0)
    vqa_answers: int = cfg_field(0, doc="VQA answer vocabulary size (0: no VQA head)", ge=0)


@dataclass
class MultiModalConfig(ModelConfig):
    """The model: shared settings + towers + fusion + decoder + heads. What `mmt.create_model` takes."""

    name: str = cfg_field("tiny", doc="a label for logs")
    text: TextEncoderConfig | None = cfg_field(None, doc="text tower (None: no text)")
    image: ImageEncoderConfig | None = cfg_field(None, doc="image tower (None: no image)")
    audio: AudioEncoderConfig | None = cfg_field(None, doc="audio tower (None: no audio)")
    fusion: FusionConfig = field(default_factory=FusionConfig)
    decoder: DecoderConfig | None = cfg_field(None, doc="captioning decoder (None: no captioning)")
    heads: HeadsConfig = field(default_factory=HeadsConfig)

    def modalities(self) -> list[str]:
        return [m for m in ("text", "image", "audio") if getattr(self, m) is not None]

    def resolved(self, part: str = "") -> ModelConfig:
        """The settings ``part`` is built with, every field decided: the tower's own non-None fields over the
        shared ones. ``part``: '' (the shared settings: fusion), a tower name, or ``decoder`` (whose width is the
        text tower's, the embedding it ties to). The one place tower inheritance is resolved (config checks and
        the model builder both read it)."""
        tower = getattr(self, part) if part else None
        values = {}
        for f in dataclasses.fields(ModelConfig):
            own = getattr(tower, f.name, None)
            values[f.name] = own if own is not None else getattr(self, f.name)
        spec = ModelConfig(**values)
        if part == "decoder" and self.text is not None:
            spec.dim = self.resolved("text").dim
        return spec

    def check(self, source: str, prefix: str) -> None:
        """Cross-field rules no single field can state; each error names the tower's key."""
        parts = ["", *self.modalities()] + (["decoder"] if self.decoder is not None else [])
        for name in parts:
            key = f"{prefix}{name}." if name else prefix
            spec = self.resolved(name)
            dim, heads, attn, positional = spec.dim, spec.num_heads, spec.attention, spec.positional
            if dim % heads:
                raise ConfigError(source, f"{key}num_heads", f"{heads} heads do not divide the width {dim}")
            if positional == "rotary" and (dim // heads) % 2:
                raise ConfigError(
                    source, f"{key}positional", f"rotary needs an even head dim, got {dim // heads}"
                )
            if attn.kind in ("linear", "performer", "reformer") and positional == "relative":
                raise ConfigError(
                    source,
                    f"{key}attention.kind",
                    f"{attn.kind} attention adds no score bias, so it cannot take positional=relative",
                )
            if attn.kind == "reformer" and attn.num_buckets > 1 and attn.num_buckets % 2:
                raise ConfigError(
                    source,
                    f"{key}attention.num_buckets",
                    f"reformer hashes by argmax over [xR; -xR]: needs 1 or an even count, got {attn.num_buckets}",
                )
            if attn.kind == "strided" and heads < 2:
                raise ConfigError(
                    source, f"{key}num_heads", "strided attention needs >= 2 heads (local + strided)"
                )
        if self.decoder is not None and (self.text is None or self.text.input != "raw"):
            raise ConfigError(
                source, f"{prefix}decoder", "the decoder ties its embedding to a text tower with input=raw"
            )
        for m in self.modalities():
            tower = getattr(self, m)
            if tower.input == "features" and tower.feature_dim <= 0:
                raise ConfigError(source, f"{prefix}{m}.feature_dim", "input=features needs feature_dim > 0")
            if tower.input == "spectrogram" and m != "audio":
                raise ConfigError(
                    source, f"{prefix}{m}.input", "input=spectrogram is for the audio tower only"
                )
        if (
            self.image is not None
            and self.image.input == "raw"
            and self.image.image_size % self.image.patch_size
        ):
            raise ConfigError(
                source,
                f"{prefix}image.patch_size",
                f"{self.image.patch_size} does not divide image_size {self.image.image_size}",
            )
