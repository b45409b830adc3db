"""Differentiable block-sparse attention in pure PyTorch: the CPU training path of every layout.

The structure of Longformer's "sliding chunks" and BigBird's block-sparse implementation (Beltagy
et al. 2020; Zaheer et al. 2020, App. D): queries are cut into blocks of b, each query block
gathers the W key/value blocks its table row names, scores ``[b, W*b]`` per block plus ``[b, G]``
columns for the global keys, one softmax over both; the G global query rows are recomputed against
all earlier keys. Time and memory are O(T * (W*b + G) + G * T): linear in the length at a fixed
window; no [T, T] tensor.

The local part is one autograd Function with the memory plan of flash attention (Dao et al. 2022):
query blocks run in chunks of about ``chunk_size`` tokens; the forward keeps only the output and
the row log-sum-exp, the backward recomputes a chunk's probabilities and scatter-adds its key and
value gradients into one preallocated gradient per tensor (``index_add_``). Memory is q, k, v, the
output and one chunk's scores; time is linear (a gather per chunk under plain autograd would give
every chunk's backward a full-size zero gradient to scatter into: O(T^2 / chunk)).

Legend: B batch, H heads, T length (padded to N*b), D head dim, N layout blocks, n blocks of a
chunk, b layout block size, W table width, G global positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lm.mixers.sparse.layout import BlockLayout


def _local_mask(layout: BlockLayout, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx_HNW, allowed_HNbWb)``: the table and which gathered keys each query may use (the
    rule, causal, table padding, and not a global key: those come in through their own columns so
    no key is counted twice). Cached per length."""
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
        return idx_HNW, keep
    return layout._cached("blocksparse", length, device, make)


def gathered_keys(layout: BlockLayout, length: int) -> int:
    """Score entries per head the block-sparse path computes for ``length`` tokens (a count, so a
    test can check the work is linear in T): N*b*W*b local + T*G global columns + G*T global rows."""
    n = layout.num_blocks(length)
    W = layout.build_table(1).shape[-1]
    G = len([g for g in layout.global_tokens if g < length])
    return n * layout.block_size * (W * layout.block_size + G) + G * length


def _flat_index(idx_HnW: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Table entries as rows of a [B, H*N, b, D] view (head h's block j is row h*N + j)."""
    H = idx_HnW.shape[0]
    return (idx_HnW + num_blocks * torch.arange(H, device=idx_HnW.device)[:, None, None]).reshape(-1)


def _gather(t_BHTD: torch.Tensor, rows: torch.Tensor, n: int, W: int, b: int) -> torch.Tensor:
    B, H, T, D = t_BHTD.shape
    return t_BHTD.reshape(B, H * (T // b), b, D).index_select(1, rows).view(B, H, n, W * b, D)


class _BlockSparse(torch.autograd.Function):
    """Local + global-column attention of every query block (the global rows are done outside)."""

    @staticmethod
    def forward(ctx, q_BHTD, k_BHTD, v_BHTD, idx_HNW, keep_HNbWb, g_G, scale: float, step: int):
        B, H, T, D = q_BHTD.shape
        N, W = idx_HNW.shape[1:]
        b, G = T // N, g_G.numel()
        qpos_Nb = torch.arange(T, device=q_BHTD.device).view(N, b)
        kglob, vglob = k_BHTD[:, :, g_G], v_BHTD[:, :, g_G]
        out = torch.empty_like(q_BHTD).view(B, H, N, b, D)
        lse = q_BHTD.new_empty(B, H, N, b, dtype=torch.float32)
        for n0 in range(0, N, step):
            c = slice(n0, n0 + step)
            s_all, kg, vg = _scores(q_BHTD, k_BHTD, v_BHTD, kglob, idx_HNW[:, c], keep_HNbWb[:, c],
                                    g_G, qpos_Nb[c], scale, n0, N)
            lse_c = torch.logsumexp(s_all, -1)
            p = torch.exp(s_all - lse_c[..., None]).to(q_BHTD.dtype)
            o = torch.einsum("bhnqk,bhnkd->bhnqd", p[..., :W * b], vg)
            if G:
                o = o + torch.einsum("bhnqg,bhgd->bhnqd", p[..., W * b:], vglob)
            out[:, :, c], lse[:, :, c] = o, lse_c
        out = out.view(B, H, T, D)
        ctx.save_for_backward(q_BHTD, k_BHTD, v_BHTD, idx_HNW, keep_HNbWb, g_G, out, lse)
        ctx.scale, ctx.step = scale, step
        return out

    @staticmethod
    def backward(ctx, dout_BHTD):
        q, k, v, idx_HNW, keep_HNbWb, g_G, out, lse = ctx.saved_tensors
        scale, step = ctx.scale, ctx.step
        B, H, T, D = q.shape
        N, W = idx_HNW.shape[1:]
        b, G = T // N, g_G.numel()
        qpos_Nb = torch.arange(T, device=q.device).view(N, b)
        kglob, vglob = k[:, :, g_G], v[:, :, g_G]
        dout = dout_BHTD.contiguous().view(B, H, N, b, D)
        delta = (dout.float() * out.view(B, H, N, b, D).float()).sum(-1)  # [B, H, N, b]
        dq = torch.empty_like(q).view(B, H, N, b, D)
        # fp32 accumulators: a key block collects the gradients of up to W query blocks' chunks
        dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (k, v))
        dk_rows, dv_rows = dk.view(B, H * N, b, D), dv.view(B, H * N, b, D)
        dkglob = q.new_zeros(B, H, G, D, dtype=torch.float32)
        dvglob = torch.zeros_like(dkglob)
        for n0 in range(0, N, step):
            c = slice(n0, n0 + step)
            s_all, kg, vg = _scores(q, k, v, kglob, idx_HNW[:, c], keep_HNbWb[:, c], g_G, qpos_Nb[c],
                                    scale, n0, N)
            p = torch.exp(s_all - lse[:, :, c, :, None])  # fp32; masked entries are exactly 0
            do_c = dout[:, :, c]
            n = do_c.shape[2]
            dp = torch.einsum("bhnqd,bhnkd->bhnqk", do_c, vg).float()
            if G:
                dp = torch.cat([dp, torch.einsum("bhnqd,bhgd->bhnqg", do_c, vglob).float()], -1)
            ds = (p * (dp - delta[:, :, c, :, None]) * scale).to(q.dtype)
            p = p.to(q.dtype)
            q_c = q.view(B, H, N, b, D)[:, :, c]
            dq_c = torch.einsum("bhnqk,bhnkd->bhnqd", ds[..., :W * b], kg)
            rows = _flat_index(idx_HNW[:, c], N)
            dk_rows.index_add_(1, rows, torch.einsum("bhnqk,bhnqd->bhnkd", ds[..., :W * b], q_c)
                               .reshape(B, H * n * W, b, D).float())
            dv_rows.index_add_(1, rows, torch.einsum("bhnqk,bhnqd->bhnkd", p[..., :W * b], do_c)
                               .reshape(B, H * n * W, b, D).float())
            if G:
                dq_c = dq_c + torch.einsum("bhnqg,bhgd->bhnqd", ds[..., W * b:], kglob)
                dkglob += torch.einsum("bhnqg,bhnqd->bhgd", ds[..., W * b:], q_c).float()
                dvglob += torch.einsum("bhnqg,bhnqd->bhgd", p[..., W * b:], do_c).float()
            dq[:, :, c] = dq_c
        if G:
            dk.index_add_(2, g_G, dkglob)
            dv.index_add_(2, g_G, dvglob)
        return dq.view(B, H, T, D), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def _scores(q, k, v, kglob, idx_HnW, keep_HnbWb, g_G, qpos_nb, scale, n0, N):
    """fp32 masked scores of the query blocks n0 .. n0+n, [B, H, n, b, W*b + G] (local columns, then
    the global ones), and the gathered k / v blocks."""
    B, H, T, D = q.shape
    n, W = idx_HnW.shape[1:]
    b = T // N
    rows = _flat_index(idx_HnW, N)
    kg, vg = _gather(k, rows, n, W, b), _gather(v, rows, n, W, b)
    q_c = q.view(B, H, N, b, D)[:, :, n0:n0 + n]
    s_loc = (torch.einsum("bhnqd,bhnkd->bhnqk", q_c, kg).float() * scale).masked_fill(~keep_HnbWb, float("-inf"))
    if not g_G.numel():
        return s_loc, kg, vg
    # global columns: every query reads the global keys at or before it
    s_glob = torch.einsum("bhnqd,bhgd->bhnqg", q_c, kglob).float() * scale
    s_glob = s_glob.masked_fill(g_G.view(1, 1, -1) > qpos_nb[..., None], float("-inf"))
    return torch.cat([s_loc, s_glob], -1), kg, vg


def block_sparse_attention(q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor,
                           layout: BlockLayout, scale: float | None = None, chunk_size: int = 0) -> torch.Tensor:
    """Causal attention restricted to ``layout`` (its ``mask``), differentiable, O(T) memory.

    ``chunk_size > 0``: query blocks run in chunks of about that many tokens (forward and the
    recomputing backward), so at most one chunk's scores are alive; 0: all blocks at once.
    Every row keeps at least its own key (a non-global query its own block, a global one its own
    global column), so no softmax row is empty.
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
    q, k, v = (F.pad(t, (0, 0, 0, pad)) if pad else t.contiguous() for t in (q_BHTD, k_BKTD, v_BKTD))
    idx_HNW, keep_HNbWb = _local_mask(layout, T, device)
    g_G = layout.globals_below(T, device)
    step = max(1, chunk_size // b) if chunk_size > 0 else N
    out_BHTD = _BlockSparse.apply(q, k, v, idx_HNW, keep_HNbWb, g_G, scale, step)[:, :, :T]

    # global rows: a global query attends to every earlier position (G x T, linear in T)
    if g_G.numel():
        allowed_GT = torch.arange(T, device=device)[None, :] <= g_G[:, None]
        out_BHGD = F.scaled_dot_product_attention(q_BHTD[:, :, g_G], k[:, :, :T], v[:, :, :T],
                                                  attn_mask=allowed_GT, scale=scale)
        out_BHTD = out_BHTD.index_copy(2, g_G, out_BHGD)
    return out_BHTD
