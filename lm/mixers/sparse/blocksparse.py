"""Differentiable block-sparse attention in plain PyTorch: the CPU training path of every layout.

The structure of Longformer's "sliding chunks" and BigBird's block-sparse implementation (Beltagy
et al. 2020; Zaheer et al. 2020, App. D): queries are cut into blocks of b, each query block
gathers the W key/value blocks its table row names (one indexing op, so autograd scatters the
gradients back), scores ``[b, W*b]`` per block plus ``[b, G]`` columns for the global keys, one
softmax over both; the G global query rows are recomputed against all earlier keys. Time and
memory are O(T * (W*b + G) + G * T): linear in the length at a fixed window; no [T, T] tensor.

FlexAttention (``flex.py``) computes the same function; it has no backward on CPU.

Legend: B batch, H query heads, K kv heads, T length (Tp padded to N*b), D head dim, N blocks,
b block size, W table width, G global positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lm.mixers.sparse.layout import BlockLayout


def _local_mask(layout: BlockLayout, length: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(idx_HNW, allowed_HNbWb, kpos_HNWb)``: table, which gathered keys each query may use
    (the rule, causal, table padding, and not a global key: those come in through their own
    columns so no key is counted twice), and the gathered keys' positions. Cached per length."""
    def make():
        b, num_blocks = layout.block_size, layout.num_blocks(length)
        idx_HNW, valid_HNW = layout.table(num_blocks, device)
        H, N, W = idx_HNW.shape
        kpos_HNWb = (idx_HNW[..., None] * b + torch.arange(b, device=device)).view(H, N, W * b)
        qpos_Nb = torch.arange(N * b, device=device).view(N, b)
        diff_HNbWb = qpos_Nb[None, :, :, None] - kpos_HNWb[:, :, None, :]
        span_H, dil_H = layout.rule_params(device)
        keep = layout.rule(diff_HNbWb, span_H, dil_H)
        keep &= valid_HNW.repeat_interleave(b, dim=-1)[:, :, None, :]
        # only globals inside the sequence: a padded query must keep its own (padded) key
        keep &= ~torch.isin(kpos_HNWb, layout.globals_below(length, device))[:, :, None, :]
        return idx_HNW, keep, kpos_HNWb
    return layout._cached("blocksparse", length, device, make)


def gathered_keys(layout: BlockLayout, length: int) -> int:
    """Score entries per head the block-sparse path computes for ``length`` tokens (a count, so a
    test can check the work is linear in T): N*b*W*b local + T*G global columns + G*T global rows."""
    n = layout.num_blocks(length)
    W = layout.build_table(1).shape[-1]
    G = len([g for g in layout.global_tokens if g < length])
    return n * layout.block_size * (W * layout.block_size + G) + G * length


def block_sparse_attention(q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor,
                           layout: BlockLayout, scale: float | None = None) -> torch.Tensor:
    """Causal attention restricted to ``layout`` (its ``mask``), differentiable, O(T) memory."""
    B, H, T, D = q_BHTD.shape
    K = k_BKTD.shape[1]
    assert H == layout.num_heads and H % K == 0, (H, K, layout.num_heads)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if K != H:  # GQA: every query head reads its group's kv head (tables may differ per head)
        k_BKTD, v_BKTD = (t.repeat_interleave(H // K, dim=1) for t in (k_BKTD, v_BKTD))
    b, device = layout.block_size, q_BHTD.device
    N = layout.num_blocks(T)
    pad = N * b - T  # padded keys sit after every real query: causality hides them
    q, k, v = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q_BHTD, k_BKTD, v_BKTD))
    idx_HNW, keep_HNbWb, _ = _local_mask(layout, T, device)
    W = idx_HNW.shape[-1]

    # local part: gather the W key/value blocks of every query block
    head_H11 = torch.arange(H, device=device)[:, None, None]
    k_BHNbD, v_BHNbD = k.view(B, H, N, b, D), v.view(B, H, N, b, D)
    kg_BHNkD = k_BHNbD[:, head_H11, idx_HNW].reshape(B, H, N, W * b, D)
    vg_BHNkD = v_BHNbD[:, head_H11, idx_HNW].reshape(B, H, N, W * b, D)
    q_BHNbD = q.view(B, H, N, b, D)
    s_loc = torch.einsum("bhnqd,bhnkd->bhnqk", q_BHNbD, kg_BHNkD) * scale
    s_loc = s_loc.masked_fill(~keep_HNbWb, float("-inf"))

    # global columns: every query reads the global keys at or before it
    g_G = layout.globals_below(T, device)
    G = g_G.numel()
    if G:
        s_glob = torch.einsum("bhnqd,bhgd->bhnqg", q_BHNbD, k[:, :, g_G]) * scale
        qpos_Nb1 = torch.arange(N * b, device=device).view(N, b, 1)
        s_glob = s_glob.masked_fill(g_G.view(1, 1, G) > qpos_Nb1, float("-inf"))
        s_all = torch.cat([s_loc, s_glob], dim=-1)
    else:
        s_all = s_loc
    # every row keeps at least its own key (a non-global query: its own block; a global one: its
    # own global column), so no row is all -inf
    p_all = torch.softmax(s_all, dim=-1, dtype=torch.float32).to(q.dtype)
    out_BHNbD = torch.einsum("bhnqk,bhnkd->bhnqd", p_all[..., : W * b], vg_BHNkD)
    if G:
        out_BHNbD = out_BHNbD + torch.einsum("bhnqg,bhgd->bhnqd", p_all[..., W * b:], v[:, :, g_G])
    out_BHTD = out_BHNbD.reshape(B, H, N * b, D)[:, :, :T]

    # global rows: a global query attends to every earlier position (G x T, linear in T)
    if G:
        allowed_GT = torch.arange(T, device=device)[None, :] <= g_G[:, None]
        out_BHGD = F.scaled_dot_product_attention(q_BHTD[:, :, g_G], k[:, :, :T], v[:, :, :T],
                                                  attn_mask=allowed_GT, scale=scale)
        out_BHTD = out_BHTD.index_copy(2, g_G, out_BHGD)
    return out_BHTD
