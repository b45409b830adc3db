"""The two backends of a block layout: differentiable block-sparse PyTorch, and FlexAttention.

**Block-sparse** (the CPU training path of every layout), the structure of Longformer's "sliding
chunks" and BigBird's block-sparse implementation (Beltagy et al. 2020; Zaheer et al. 2020, App. D):
queries are cut into blocks of b, each query block gathers the W key/value blocks its table row
names (one indexing op, so autograd scatters the gradients back), scores ``[b, W*b]`` per block plus
``[b, G]`` columns for the global keys, one softmax over both; the G global query rows are
recomputed against all earlier keys. Time and memory are O(T * (W*b + G) + G * T): linear in the
length at a fixed window; no [T, T] tensor.

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
from torch.utils.checkpoint import checkpoint

from lm.mixers.sparse.layout import BlockLayout


# -- block-sparse PyTorch ------------------------------------------------------------------------
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


def _attend_blocks(q_BHnbD, k_BHTD, v_BHTD, idx_HnW, keep_HnbWb, g_G, qpos_nb, scale: float):
    """Outputs of query blocks ``q_BHnbD`` (a run of n consecutive blocks, positions ``qpos_nb``):
    one softmax over their gathered table blocks and the global columns."""
    B, H, n, b, D = q_BHnbD.shape
    W = idx_HnW.shape[-1]
    head_H11 = torch.arange(H, device=q_BHnbD.device)[:, None, None]
    k_BHNbD, v_BHNbD = k_BHTD.view(B, H, -1, b, D), v_BHTD.view(B, H, -1, b, D)
    kg_BHnkD = k_BHNbD[:, head_H11, idx_HnW].reshape(B, H, n, W * b, D)
    vg_BHnkD = v_BHNbD[:, head_H11, idx_HnW].reshape(B, H, n, W * b, D)
    s_loc = torch.einsum("bhnqd,bhnkd->bhnqk", q_BHnbD, kg_BHnkD) * scale
    s_all = s_loc.masked_fill(~keep_HnbWb, float("-inf"))
    G = g_G.numel()
    if G:  # global columns: every query reads the global keys at or before it
        s_glob = torch.einsum("bhnqd,bhgd->bhnqg", q_BHnbD, k_BHTD[:, :, g_G]) * scale
        s_glob = s_glob.masked_fill(g_G.view(1, 1, G) > qpos_nb[..., None], float("-inf"))
        s_all = torch.cat([s_all, s_glob], dim=-1)
    # every row keeps at least its own key (a non-global query: its own block; a global one: its
    # own global column), so no row is all -inf
    p_all = torch.softmax(s_all, dim=-1, dtype=torch.float32).to(q_BHnbD.dtype)
    out_BHnbD = torch.einsum("bhnqk,bhnkd->bhnqd", p_all[..., : W * b], vg_BHnkD)
    if G:
        out_BHnbD = out_BHnbD + torch.einsum("bhnqg,bhgd->bhnqd", p_all[..., W * b:], v_BHTD[:, :, g_G])
    return out_BHnbD


def block_sparse_attention(q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor,
                           layout: BlockLayout, scale: float | None = None, chunk_size: int = 0) -> torch.Tensor:
    """Causal attention restricted to ``layout`` (its ``mask``), differentiable, O(T) memory.

    ``chunk_size > 0``: query blocks run in chunks of about that many tokens and, under autograd,
    each chunk is recomputed in backward (activation checkpointing, as flash attention recomputes
    its scores): memory is then q, k, v, the output and one chunk's scores, not all T * W * b.
    """
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
    g_G = layout.globals_below(T, device)
    qpos_Nb = torch.arange(N * b, device=device).view(N, b)
    q_BHNbD = q.view(B, H, N, b, D)
    step = max(1, chunk_size // b) if chunk_size > 0 else N
    if step >= N:
        out_BHNbD = _attend_blocks(q_BHNbD, k, v, idx_HNW, keep_HNbWb, g_G, qpos_Nb, scale)
    else:
        recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        outs = []
        for n0 in range(0, N, step):
            args = (q_BHNbD[:, :, n0:n0 + step], k, v, idx_HNW[:, n0:n0 + step], keep_HNbWb[:, n0:n0 + step],
                    g_G, qpos_Nb[n0:n0 + step], scale)
            outs.append(checkpoint(_attend_blocks, *args, use_reentrant=False) if recompute else _attend_blocks(*args))
        out_BHNbD = torch.cat(outs, dim=2)
    out_BHTD = out_BHNbD.reshape(B, H, N * b, D)[:, :, :T]

    # global rows: a global query attends to every earlier position (G x T, linear in T)
    if g_G.numel():
        allowed_GT = torch.arange(T, device=device)[None, :] <= g_G[:, None]
        out_BHGD = F.scaled_dot_product_attention(q_BHTD[:, :, g_G], k[:, :, :T], v[:, :, :T],
                                                  attn_mask=allowed_GT, scale=scale)
        out_BHTD = out_BHTD.index_copy(2, g_G, out_BHGD)
    return out_BHTD


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
