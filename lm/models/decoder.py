"""Decoder-only language model: token embedding, Blocks, final norm, LM head.

Single-device PyTorch; parallelism is applied from ``lm.parallel`` (DESIGN.md).
Legend: B batch, T sequence, D model dim, V vocabulary.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lm.models.block import Block
from lm.models.config import DecoderConfig
from lm.nn.cache import DecodeCache
from lm.registry import NORMS


class DecoderLM(nn.Module):
    """``model(input_ids_BT) -> logits_BTV``; with ``cache=model.init_cache(B)`` it decodes
    incrementally and its logits equal those of the full forward pass."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_norm = NORMS.build(cfg.norm, cfg.dim, cfg.norm_eps) if cfg.embed_norm else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = NORMS.build(cfg.norm, cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """N(0, init_std) weights, zero biases; residual output projections scaled by 1/sqrt(2L)
        (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.cfg.num_layers) if getattr(m, "is_residual_out", False) else 1.0
                nn.init.normal_(m.weight, std=std * scale)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, "reset_parameters") and m is not self and not list(m.children()):
                m.reset_parameters()

    def init_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> DecodeCache:
        p = self.embed.weight
        max_len = max_len or self.cfg.max_seq_len
        layers = [b.mixer.init_cache(batch_size, max_len, device or p.device, dtype or p.dtype) for b in self.blocks]
        return DecodeCache(layers)

    def forward(self, input_ids_BT: torch.Tensor, *, cache: DecodeCache | None = None, **ctx) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids_BT, cache=cache, **ctx))

    def hidden_states(self, input_ids_BT: torch.Tensor, *, cache: DecodeCache | None = None, **ctx) -> torch.Tensor:
        """``ctx`` goes to every block's mixer unchanged (e.g. ``lm.parallel``'s sequence-parallel plan)."""
        start_pos = cache.pos if cache is not None else 0
        x_BTD = self.embed(input_ids_BT)
        if self.embed_norm is not None:
            x_BTD = self.embed_norm(x_BTD)
        for i, block in enumerate(self.blocks):
            x_BTD = block(x_BTD, cache=cache.layers[i] if cache is not None else None, start_pos=start_pos, **ctx)
        if cache is not None:
            cache.pos += input_ids_BT.shape[1]
        return self.norm(x_BTD)

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding and not self.cfg.tie_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N (matmuls, fwd+bwd) + 12·L·D·T (attention scores, PaLM app. B)."""
        n = sum(p.numel() for p in self.parameters()) - self.embed.weight.numel() * (not self.cfg.tie_embeddings)
        # attention scores: 12 * heads * head_dim * (keys each query sees), per attention layer
        spans = [min(seq_len, getattr(b.mixer, "window", seq_len)) for b in self.blocks if hasattr(b.mixer, "num_heads")]
        return 6 * n + 12 * self.cfg.num_heads * self.cfg.head_size * sum(spans)
