"""Rotary position embedding (Su et al. 2021, RoFormer) in the rotate-half layout of HF Llama.

Legend: B batch, H heads, T sequence, D head dim.
"""
from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Precomputes cos/sin for ``max_seq_len`` positions; extends itself if a longer input comes."""

    def __init__(self, head_dim: int, max_seq_len: int = 2048, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"model.config.head_dim: RoPE needs an even head_dim, got {head_dim}")
        self.head_dim, self.theta = head_dim, theta
        self._build(max_seq_len)

    def _build(self, length: int, device: torch.device | None = None) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device).float() / self.head_dim))
        freqs_TD2 = torch.outer(torch.arange(length, device=device).float(), inv_freq)
        emb_TD = torch.cat((freqs_TD2, freqs_TD2), dim=-1)
        self.register_buffer("cos_TD", emb_TD.cos(), persistent=False)
        self.register_buffer("sin_TD", emb_TD.sin(), persistent=False)

    def forward(self, q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, start_pos: int = 0):
        T = q_BHTD.shape[-2]
        if start_pos + T > self.cos_TD.shape[0] or self.cos_TD.device != q_BHTD.device:
            self._build(max(start_pos + T, self.cos_TD.shape[0]), q_BHTD.device)
        cos = self.cos_TD[start_pos : start_pos + T].to(q_BHTD.dtype)
        sin = self.sin_TD[start_pos : start_pos + T].to(q_BHTD.dtype)
        q = q_BHTD * cos + rotate_half(q_BHTD) * sin
        k = k_BHTD * cos + rotate_half(k_BHTD) * sin
        return q, k
