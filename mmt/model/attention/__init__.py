"""Attention kinds, chosen by ``attention.kind``: mha (dense, SDPA), sparse (local + global), strided
(Child et al. 2019), linear (Katharopoulos et al. 2020), performer (FAVOR+, Choromanski et al. 2021),
reformer (LSH, Kitaev et al. 2020); plus cross-attention for fusion and the decoder."""

from mmt.model.attention.base import SelfAttention, safe_key_mask
from mmt.model.attention.cross import CrossAttention
from mmt.model.attention.linear import LinearAttention
from mmt.model.attention.mha import MultiHeadAttention
from mmt.model.attention.performer import PerformerAttention
from mmt.model.attention.reformer import ReformerAttention
from mmt.model.attention.sparse import LocalGlobalAttention, StridedAttention

__all__ = [
    "CrossAttention",
    "LinearAttention",
    "LocalGlobalAttention",
    "MultiHeadAttention",
    "PerformerAttention",
    "ReformerAttention",
    "SelfAttention",
    "StridedAttention",
    "safe_key_mask",
]
