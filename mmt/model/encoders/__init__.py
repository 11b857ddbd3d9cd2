"""Per-modality encoders: turn raw inputs (or precomputed features) into (B, N, D) token sequences."""

from mmt.model.encoders.audio import AudioEncoder
from mmt.model.encoders.image import ImageEncoder
from mmt.model.encoders.text import TextEncoder

__all__ = ["AudioEncoder", "ImageEncoder", "TextEncoder"]
