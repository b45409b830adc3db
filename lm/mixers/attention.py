"""Softmax attention mixers: MHA / GQA / MQA (``num_kv_heads``) and Mistral sliding window.

Vaswani et al. 2017 (MHA); Shazeer 2019 (MQA, "Fast Transformer Decoding"); Ainslie et al. 2023
(GQA); Jiang et al. 2023 (Mistral 7B, sliding window + rolling buffer cache).
Legend: B batch, T queries, S keys, H query heads, K kv heads, D head dim, M model dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm.nn.cache import KVCache, RollingKVCache
from lm.nn.rope import RotaryEmbedding
from lm.registry import MIXERS


def add_qkvo(mixer: nn.Module, cfg, bias: bool = False) -> None:
    """The heads, q/k/v/o projections and RoPE every attention-shaped mixer (softmax, linear,
    kNN memory) has; ``o_proj`` is marked as a residual output for its scaled init."""
    mixer.num_heads, mixer.num_kv_heads, mixer.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_size
    mixer.q_proj = nn.Linear(cfg.dim, mixer.num_heads * mixer.head_dim, bias=bias)
    mixer.k_proj = nn.Linear(cfg.dim, mixer.num_kv_heads * mixer.head_dim, bias=bias)
    mixer.v_proj = nn.Linear(cfg.dim, mixer.num_kv_heads * mixer.head_dim, bias=bias)
    mixer.o_proj = nn.Linear(mixer.num_heads * mixer.head_dim, cfg.dim, bias=bias)
    mixer.o_proj.is_residual_out = True
    mixer.rope = RotaryEmbedding(mixer.head_dim, cfg.max_seq_len, cfg.rope_theta)


def project_qkv(mixer: nn.Module, x_BTM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries ``[B, H, T, D]``, keys and values ``[B, K, T, D]`` of a mixer made by ``add_qkvo``
    (before RoPE)."""
    B, T, _ = x_BTM.shape
    H, K, D = mixer.num_heads, mixer.num_kv_heads, mixer.head_dim
    q_BHTD = mixer.q_proj(x_BTM).view(B, T, H, D).transpose(1, 2)
    k_BKTD = mixer.k_proj(x_BTM).view(B, T, K, D).transpose(1, 2)
    v_BKTD = mixer.v_proj(x_BTM).view(B, T, K, D).transpose(1, 2)
    return q_BHTD, k_BKTD, v_BKTD


@MIXERS.register("attention")
class Attention(nn.Module):
    """Causal multi-head attention with grouped key/value heads and RoPE, through SDPA.

    ``num_kv_heads == num_heads`` is MHA, ``1`` is MQA, anything between is GQA: each group of
    ``num_heads // num_kv_heads`` query heads shares one key/value head, so the KV cache shrinks by
    that factor.
    """

    def __init__(self, cfg, layer_idx: int = 0, *, bias: bool = False):
        super().__init__()
        add_qkvo(self, cfg, bias)

    # -- masks: the one place a variant changes which keys a query may see -------------------
    def allowed(self, q_pos_T: torch.Tensor, k_pos_S: torch.Tensor) -> torch.Tensor:
        """Boolean [T, S]: may the query at absolute position t see the key at position s."""
        return (k_pos_S[None, :] <= q_pos_T[:, None]) & (k_pos_S[None, :] >= 0)

    def attend(self, q_BHTD, k_BKSD, v_BKSD, q_pos_T, k_pos_S, full_causal: bool) -> torch.Tensor:
        gqa = self.num_kv_heads != self.num_heads
        if full_causal:
            return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, is_causal=True, enable_gqa=gqa)
        mask_TS = self.allowed(q_pos_T, k_pos_S)
        return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask_TS, enable_gqa=gqa)

    def init_cache(self, batch: int, max_len: int, device, dtype) -> KVCache:
        return KVCache(batch, self.num_kv_heads, max_len, self.head_dim, device, dtype)

    def forward(self, x_BTM: torch.Tensor, *, cache=None, start_pos: int = 0, **ctx) -> torch.Tensor:
        B, T, _ = x_BTM.shape
        q, k, v = project_qkv(self, x_BTM)
        q, k = self.rope(q, k, start_pos)
        q_pos_T = torch.arange(start_pos, start_pos + T, device=x_BTM.device)
        if cache is None:
            out = self.attend(q, k, v, q_pos_T, q_pos_T, full_causal=self.plain_causal(T))
        else:
            k, v, k_pos_S = cache.update(k, v, start_pos)
            out = self.attend(q, k, v, q_pos_T, k_pos_S, full_causal=False)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def plain_causal(self, T: int) -> bool:
        """Whether a cache-free pass over T tokens is plain causal (SDPA's fast ``is_causal``)."""
        return True


@MIXERS.register("sliding_window")
class SlidingWindowAttention(Attention):
    """Mistral sliding-window attention: each token sees itself and the ``window - 1`` before it.

    Decoding keeps a rolling buffer of ``window`` keys/values, so memory and time per token stay
    flat in the context length; stacked layers still reach ``window * num_layers`` back.
    """

    def __init__(self, cfg, layer_idx: int = 0, *, window: int = 256, bias: bool = False):
        if window <= 0:
            raise ValueError(f"model.config.mixer_options.window: must be positive, got {window}")
        super().__init__(cfg, layer_idx, bias=bias)
        self.window = window

    def allowed(self, q_pos_T, k_pos_S):
        return super().allowed(q_pos_T, k_pos_S) & (q_pos_T[:, None] - k_pos_S[None, :] < self.window)

    def plain_causal(self, T: int) -> bool:
        return T <= self.window

    def init_cache(self, batch: int, max_len: int, device, dtype) -> RollingKVCache:
        return RollingKVCache(batch, self.num_kv_heads, self.window, self.head_dim, device, dtype)
