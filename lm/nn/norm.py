"""Normalisation layers, registered by name (``norm: rmsnorm | layernorm``)."""
from __future__ import annotations

import torch
from torch import nn

from lm.registry import NORMS


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 as Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


@NORMS.register("layernorm")
class LayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al. 2016) with bias, as in GPT-2."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps)
