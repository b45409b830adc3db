"""Feed-forward layers of the Block, registered by name (``ffn: swiglu | gelu | none``).

Legend: B batch, T sequence, D model dim, F hidden dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm.registry import FFNS


def default_hidden(dim: int, kind: str, multiple_of: int = 64) -> int:
    """4*dim for GELU; 2/3 of that for SwiGLU (equal parameters), rounded up as Llama does."""
    if kind == "gelu":
        return 4 * dim
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@FFNS.register("swiglu")
class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"), the Llama FFN."""

    def __init__(self, cfg, layer_idx: int = 0, *, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.ffn_hidden or default_hidden(cfg.dim, "swiglu")
        self.gate_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=False)
        self.down_proj.is_residual_out = True

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


@FFNS.register("gelu")
class GeluMLP(nn.Module):
    """GELU MLP (Hendrycks & Gimpel 2016) as in GPT-2/BERT."""

    def __init__(self, cfg, layer_idx: int = 0, *, hidden: int | None = None, bias: bool = True):
        super().__init__()
        hidden = hidden or cfg.ffn_hidden or default_hidden(cfg.dim, "gelu")
        self.up_proj = nn.Linear(cfg.dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=bias)
        self.down_proj.is_residual_out = True

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x_BTD), approximate="tanh"))


@FFNS.register("none")
class NoFFN(nn.Module):
    """No feed-forward sub-layer (e.g. Mamba blocks); the Block skips it and its norm."""

    def __init__(self, cfg=None, layer_idx: int = 0):
        super().__init__()

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        return torch.zeros_like(x_BTD)
