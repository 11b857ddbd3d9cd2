"""Captioning decoder: causal self-attention + cross-attention to the fused memory, LM head tied to the text
embedding, KV-cached greedy and beam-search generation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmt.config.model import DecoderConfig, ModelConfig
from mmt.model.block import Tower


class CaptionDecoder(nn.Module):
    def __init__(
        self,
        cfg: DecoderConfig,
        spec: ModelConfig,
        embedding: nn.Embedding,
        memory_dim: int,
        bos_id: int,
        eos_id: int,
        pad_id: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        # Shared with the text encoder: input embedding and output projection are one matrix (tied weights).
        self.embedding = embedding
        self.tower = Tower(spec, cfg.max_len, causal=True, cross=True, context_dim=memory_dim)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @property
    def supports_kv_cache(self) -> bool:
        return all(blk.attn.supports_kv_cache for blk in self.tower.blocks)

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        caches: list[dict[str, Any]] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        x = self.embedding(ids)
        x = self.tower(x, mask, context=memory, context_mask=memory_mask, caches=caches, offset=offset)
        return x @ self.embedding.weight.t().to(x.dtype)

    def _new_caches(self) -> list[dict[str, Any]] | None:
        return [{} for _ in self.tower.blocks] if self.supports_kv_cache else None

    def _step_logits(
        self,
        seq: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        caches: list[dict[str, Any]] | None,
    ) -> torch.Tensor:
        """Log-probabilities of the next token after ``seq``: with a cache only the last token is fed."""
        if caches is None:
            return F.log_softmax(self(seq, None, memory, memory_mask)[:, -1].float(), dim=-1)
        t = seq.shape[1] - 1
        return F.log_softmax(
            self(seq[:, -1:], None, memory, memory_mask, caches, offset=t)[:, -1].float(), dim=-1
        )

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        use_cache: bool = True,
        length_penalty: float = 1.0,
    ) -> torch.Tensor:
        """(B, <= 1 + max_new_tokens) token ids starting with ``bos``; finished rows are padded with ``pad``."""
        max_new_tokens = min(max_new_tokens, self.cfg.max_len - 1)
        if num_beams > 1:
            return self._beam_search(
                memory, memory_mask, max_new_tokens, num_beams, use_cache, length_penalty
            )
        b = memory.shape[0]
        seq = torch.full((b, 1), self.bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        caches = self._new_caches() if use_cache else None
        for _ in range(max_new_tokens):
            nxt = self._step_logits(seq, memory, memory_mask, caches).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            done = done | (nxt == self.eos_id)
            if bool(done.all()):
                break
        return seq

    def _beam_search(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        max_new_tokens: int,
        k: int,
        use_cache: bool,
        length_penalty: float,
    ) -> torch.Tensor:
        b, dev = memory.shape[0], memory.device
        memory = memory.repeat_interleave(k, dim=0)
        memory_mask = memory_mask.repeat_interleave(k, dim=0) if memory_mask is not None else None
        seq = torch.full((b * k, 1), self.bos_id, dtype=torch.long, device=dev)
        scores = torch.zeros(b, k, device=dev)
        scores[:, 1:] = float("-inf")  # all beams start identical: keep one alive at first
        done = torch.zeros(b * k, dtype=torch.bool, device=dev)
        lengths = torch.zeros(b * k, device=dev)
        caches = self._new_caches() if use_cache else None
        for _ in range(max_new_tokens):
            logp = self._step_logits(seq, memory, memory_mask, caches)  # (B*k, V)
            vocab = logp.shape[-1]
            # A finished beam only extends with pad at no cost.
            frozen = torch.full_like(logp, float("-inf"))
            frozen[:, self.pad_id] = 0.0
            logp = torch.where(done[:, None], frozen, logp)
            cand = (scores.view(b * k, 1) + logp).view(b, k * vocab)
            scores, flat = cand.topk(k, dim=-1)
            beam = flat // vocab
            token = flat % vocab
            src = (beam + torch.arange(b, device=dev)[:, None] * k).view(-1)
            seq = torch.cat([seq[src], token.view(-1, 1)], dim=1)
            prev_done = done[src]
            done = prev_done | (token.view(-1) == self.eos_id)
            lengths = lengths[src] + (~prev_done).float()
            if caches is not None:
                for c in caches:
                    c["self"]["k"], c["self"]["v"] = c["self"]["k"][src], c["self"]["v"][src]
            if bool(done.all()):
                break
        norm = scores.view(-1) / lengths.clamp(min=1.0).pow(length_penalty)
        best = norm.view(b, k).argmax(-1) + torch.arange(b, device=dev) * k
        return seq[best]
