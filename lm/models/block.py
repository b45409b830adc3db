"""The one Block (DESIGN.md): ``x = x + mixer(norm(x)); x = x + ffn(norm(x))``.

Legend: B batch, T sequence, D model dim.
"""
from __future__ import annotations

import torch
from torch import nn

import lm.mixers  # noqa: F401  (registers the mixers)
import lm.nn.mlp  # noqa: F401  (registers the ffns)
import lm.nn.moe  # noqa: F401  (registers ffn "moe")
import lm.nn.norm  # noqa: F401  (registers the norms)
from lm.registry import FFNS, MIXERS, NORMS


class Block(nn.Module):
    """Pre-norm residual block with a pluggable token mixer and feed-forward layer."""

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        spec = cfg.layer(layer_idx)
        where = f"model.config.layer[{layer_idx}]"
        self.mixer_norm = NORMS.build(cfg.norm, cfg.dim, cfg.norm_eps, key="model.config.norm")
        self.mixer = MIXERS.build(spec.mixer, cfg, layer_idx, options=spec.mixer_options, key=f"{where}.mixer")
        self.ffn = None
        if spec.ffn != "none":
            self.ffn_norm = NORMS.build(cfg.norm, cfg.dim, cfg.norm_eps)
            self.ffn = FFNS.build(spec.ffn, cfg, layer_idx, options=spec.ffn_options, key=f"{where}.ffn")

    def forward(self, x_BTD: torch.Tensor, *, cache=None, **ctx) -> torch.Tensor:
        x_BTD = x_BTD + self.mixer(self.mixer_norm(x_BTD), cache=cache, **ctx)
        if self.ffn is not None:
            ffn_kw = {"cache": cache} if getattr(self.ffn, "needs_cache", False) else {}  # e.g. RWKV channel-mix shift
            x_BTD = x_BTD + self.ffn(self.ffn_norm(x_BTD), **ffn_kw)
        return x_BTD
