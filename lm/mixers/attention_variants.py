"""Attention with other position encodings than RoPE: none (NoPE) and learned absolute positions.

Baselines of the length-generalisation experiments (``recipes/mixers/induction_heads_*.yaml``):
Mamba's Table 11 (Gu & Dao 2023) compares MHA with absolute positions, RoPE and xPos.
Legend: B batch, T sequence, M model dim, P position slots.
"""
from __future__ import annotations

import torch
from torch import nn

from lm.mixers.attention import Attention
from lm.registry import MIXERS

_KEY = "model.config.mixer_options"


class _NoRotation(nn.Module):
    def forward(self, q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, start_pos: int = 0):
        return q_BHTD, k_BHTD


@MIXERS.register("attention_nope")
class AttentionNoPE(Attention):
    """Causal multi-head attention without any position encoding (Kazemnejad et al. 2023, "The
    Impact of Positional Encoding on Length Generalization in Transformers"): order is visible only
    through the causal mask. Same parameters as ``attention`` (GQA via ``num_kv_heads``)."""

    def __init__(self, cfg, layer_idx: int = 0, *, bias: bool = False):
        super().__init__(cfg, layer_idx, bias=bias)
        self.rope = _NoRotation()


@MIXERS.register("attention_abs")
class AttentionAbsolute(AttentionNoPE):
    """Causal multi-head attention with learned absolute position embeddings (Vaswani et al. 2017;
    GPT-2's learned table), one table per layer added to the mixer input: ``attn(x + P[pos])``.

    The table has ``max_positions`` slots (default ``model.config.max_seq_len``); rows past the
    training length are never trained, which is exactly why this baseline does not extrapolate.
    """

    def __init__(self, cfg, layer_idx: int = 0, *, max_positions: int | None = None, bias: bool = False):
        super().__init__(cfg, layer_idx, bias=bias)
        max_positions = cfg.max_seq_len if max_positions is None else max_positions
        if not isinstance(max_positions, int) or isinstance(max_positions, bool) or max_positions <= 0:
            raise ValueError(f"{_KEY}.max_positions: must be a positive integer, got {max_positions!r}")
        self.max_positions = max_positions
        self.pos_embedding = nn.Embedding(max_positions, cfg.dim)  # N(0, init_std) by DecoderLM.reset_parameters

    def forward(self, x_BTM: torch.Tensor, *, cache=None, start_pos: int = 0, **ctx) -> torch.Tensor:
        T = x_BTM.shape[1]
        if start_pos + T > self.max_positions:
            raise ValueError(f"{_KEY}.max_positions: position {start_pos + T - 1} is past the "
                             f"{self.max_positions} learned positions of attention_abs")
        pos_T = torch.arange(start_pos, start_pos + T, device=x_BTM.device)
        return super().forward(x_BTM + self.pos_embedding(pos_T).to(x_BTM.dtype), cache=cache,
                               start_pos=start_pos, **ctx)
