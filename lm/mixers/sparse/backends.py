"""The two backends of a block layout: differentiable block-sparse PyTorch
(``lm.mixers.sparse.blocksparse``: the CPU training path), and FlexAttention (here).

**FlexAttention** (Dong et al. 2024, "Flex Attention: A Programming Model for Generating Optimized
Attention Kernels") skips the key blocks a ``BlockMask`` leaves out and applies a ``mask_mod``
inside the blocks it visits. The block mask is built straight from the layout's key-block table
(``BlockMask.from_kv_blocks``), coarsened to flex's block size, plus the blocks that hold global
keys/queries; ``mask_mod`` is the layout's token-level mask with the same expression for every
layout (its tensors differ), so all layouts share one compiled kernel per shape. The mask is never
evaluated densely (``create_block_mask`` would vmap ``mask_mod`` over [T, T]). Forward works on CPU
and GPU; there is no FlexAttention backward on CPU. ``dynamic=False``: a new sequence length
compiles again (a training run uses one length).

Legend: B batch, H query heads, K kv heads, T length (Tp padded to N*b), D head dim, N layout
blocks, b layout block size, W table width, G global positions, F flex blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lm.mixers.sparse.layout import BlockLayout


# -- FlexAttention ------------------------------------------------------------------------------
_COMPILED = {}


def compiled_flex_attention():
    """``torch.compile(flex_attention)``, made once per process (compiling is 10-20 s on CPU)."""
    if "fn" not in _COMPILED:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["fn"]


def flex_block_size(layout: BlockLayout, device: torch.device) -> int:
    """Flex's block: 128 on GPU (its kernels' tile), 32 on CPU, or the layout's block if larger;
    a multiple of the layout block so every layout block lies in one flex block."""
    target = 128 if device.type == "cuda" else 32
    b = layout.block_size
    if b >= target:
        return b
    if target % b:
        raise ValueError(f"model.config.mixer_options.block_size: the flex backend needs a block size dividing "
                         f"{target} or a multiple of it, got {b}")
    return target


def _mask_mod(in_table_HNN: torch.Tensor, span_H: torch.Tensor, dil_H: torch.Tensor, is_global_L: torch.Tensor,
              block: int):
    """The layout's token mask as a flex ``mask_mod`` (indices clamped: flex also calls it on the
    padding past T)."""
    last_block, last_pos = in_table_HNN.shape[-1] - 1, is_global_L.shape[0] - 1

    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        qb = torch.clamp(q_idx // block, max=last_block)
        kb = torch.clamp(kv_idx // block, max=last_block)
        local = in_table_HNN[h, qb, kb] & (diff < span_H[h]) & (diff % dil_H[h] == 0)
        glob = is_global_L[torch.clamp(q_idx, max=last_pos)] | is_global_L[torch.clamp(kv_idx, max=last_pos)]
        return (diff >= 0) & (local | glob)

    return mask_mod


def flex_block_mask(layout: BlockLayout, length: int, device: torch.device):
    """The layout's ``BlockMask`` for ``length`` tokens, cached per length on the layout."""
    from torch.nn.attention.flex_attention import BlockMask

    def make():
        fb, b = flex_block_size(layout, device), layout.block_size
        c, N, H = fb // b, layout.num_blocks(length), layout.num_heads
        nF = -(-length // fb)
        dense_HNN = layout.block_mask_dense(N, device)
        pad = nF * c - N
        coarse_HFF = F.pad(dense_HNN, (0, pad, 0, pad)).view(H, nF, c, nF, c).any(4).any(2)
        rows_F = torch.arange(nF, device=device)
        g_G = layout.globals_below(length, device)
        if g_G.numel():
            gb = torch.unique(g_G // fb)
            coarse_HFF[:, :, gb] |= rows_F[:, None] >= gb[None, :]  # global keys, for later rows
            coarse_HFF[:, gb, :] |= rows_F[None, :] <= gb[:, None]  # global queries read all earlier
        coarse_HFF &= rows_F[None, :] <= rows_F[:, None]
        num_HF = coarse_HFF.sum(-1).to(torch.int32)
        idx_HFF = torch.argsort(coarse_HFF.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        is_global_L = torch.zeros(nF * fb, dtype=torch.bool, device=device)
        is_global_L[g_G] = True
        span_H, dil_H = layout.rule_params(device)
        mm = _mask_mod(dense_HNN, span_H, dil_H, is_global_L, b)
        return BlockMask.from_kv_blocks(num_HF[None], idx_HFF[None], BLOCK_SIZE=fb, mask_mod=mm,
                                        seq_lengths=(length, length))

    return layout._cached("flex", length, device, make)


def flex_sparse_attention(q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor, layout: BlockLayout,
                          scale: float | None = None) -> torch.Tensor:
    """Causal attention restricted to ``layout`` through compiled FlexAttention."""
    T, D = q_BHTD.shape[2], q_BHTD.shape[3]
    if q_BHTD.device.type == "cpu" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (q_BHTD, k_BKTD, v_BKTD)):
        raise ValueError("model.config.mixer_options.backend: 'flex' has no backward on CPU; "
                         "use backend 'blocksparse' (or 'auto') to train on CPU")
    bm = flex_block_mask(layout, T, q_BHTD.device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    return compiled_flex_attention()(q_BHTD, k_BKTD, v_BKTD, block_mask=bm, scale=scale,
                                     enable_gqa=k_BKTD.shape[1] != q_BHTD.shape[1])
