"""The selective scan of Mamba (Gu & Dao 2023, arXiv:2312.00752, eq. 2a-2b / Algorithm 2), in fp32:

    h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t        y_t = C_t . h_t

per channel e and state n. Pure PyTorch, with the memory behaviour of the fused CUDA kernel: the
[B, T, E, N] states are never kept for the whole sequence. The sequence is cut into blocks of
``block_len`` tokens (a working set of about ``block_elems`` floats). The forward scans block after
block and keeps only each block's start state ([B, E, N]); the backward walks the blocks in reverse,
recomputes a block's states from its start state and runs the adjoint recurrence

    G_t = C_t dy_t + exp(dt_{t+1} A) * G_{t+1}      (G_t = dLoss/dh_t)

with the analytic gradients of dt, x, A, B, C from G and h (no autograd graph of scan steps).

Inside a block the scan is two-level: the sequence is viewed as C chunks of L steps; the L steps
run one after another for all chunks at once, the C chunk starts follow one after another, and
every position adds its chunk start times its cumulative decay. That is the sequential arithmetic
(no log factor) in L + C vectorised steps instead of T.

Legend: B batch, T sequence, E channels, N states, K block length, C chunks, L chunk length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_BLOCK_ELEMS = {"cpu": 1 << 21, "cuda": 1 << 27}  # floats of one [B, K, E, N] block tensor


def linear_scan(a_BKEN: torch.Tensor, u_BKEN: torch.Tensor, h0_BEN: torch.Tensor, chunk: int,
                reverse: bool = False) -> torch.Tensor:
    """All states of ``h_t = a_t * h_{t-1} + u_t`` over dim 1 from ``h_{-1} = h0`` (``reverse``:
    ``h_t = a_t * h_{t+1} + u_t`` from ``h_K = h0``). No autograd; returns h_BKEN."""
    Bsz, K, E, N = u_BKEN.shape
    L = max(1, min(chunk, K))
    nC = -(-K // L)
    pad = nC * L - K
    if pad:  # a = 1, u = 0 after the last step (in scan order): the state passes through unchanged
        side_K = (0, 0, 0, 0, 0, pad) if not reverse else (0, 0, 0, 0, pad, 0)
        a_BKEN, u_BKEN = F.pad(a_BKEN, side_K, value=1.0), F.pad(u_BKEN, side_K)
    a, u = a_BKEN.view(Bsz, nC, L, E, N), u_BKEN.view(Bsz, nC, L, E, N)
    h, P = torch.empty_like(u), torch.empty_like(a)  # local states, cumulative decays within a chunk
    steps = range(L) if not reverse else range(L - 1, -1, -1)
    first = steps[0]
    h[:, :, first], P[:, :, first] = u[:, :, first], a[:, :, first]
    prev = first
    for l in steps[1:]:
        torch.addcmul(u[:, :, l], a[:, :, l], h[:, :, prev], out=h[:, :, l])
        torch.mul(a[:, :, l], P[:, :, prev], out=P[:, :, l])
        prev = l
    last = prev
    carry, starts = h0_BEN, [None] * nC
    for c in (range(nC) if not reverse else range(nC - 1, -1, -1)):
        starts[c] = carry
        carry = torch.addcmul(h[:, c, last], P[:, c, last], carry)
    h.addcmul_(P, torch.stack(starts, 1)[:, :, None])
    h = h.view(Bsz, nC * L, E, N)
    return (h[:, :K] if not reverse else h[:, pad:]) if pad else h


def _block_len(Bsz: int, E: int, N: int, T: int, device: torch.device, block_elems: int | None) -> int:
    budget = block_elems or DEFAULT_BLOCK_ELEMS.get(device.type, DEFAULT_BLOCK_ELEMS["cuda"])
    return max(1, min(T, max(64, budget // max(1, Bsz * E * N))))


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BTE, dt_BTE, A_EN, B_BTN, C_BTN, h0_BEN, chunk: int, block_elems: int | None):
        dtype = torch.promote_types(x_BTE.dtype, torch.float32)
        x, dt, A, Bm, Cm = (t.to(dtype) for t in (x_BTE, dt_BTE, A_EN, B_BTN, C_BTN))
        Bsz, T, E = x.shape
        N = A.shape[1]
        h = h0_BEN.to(dtype) if h0_BEN is not None else x.new_zeros(Bsz, E, N)
        K = _block_len(Bsz, E, N, T, x.device, block_elems)
        y, starts = x.new_empty(Bsz, T, E), []
        with torch.autocast(x.device.type, enabled=False):
            for t0 in range(0, T, K):
                s = slice(t0, t0 + K)
                starts.append(h)
                a = torch.exp(dt[:, s, :, None] * A)
                u = (dt[:, s] * x[:, s])[..., None] * Bm[:, s, None, :]
                h_BKEN = linear_scan(a, u, h, chunk)
                y[:, s] = torch.einsum("bken,bkn->bke", h_BKEN, Cm[:, s])
                h = h_BKEN[:, -1].clone()
        ctx.save_for_backward(x, dt, A, Bm, Cm, torch.stack(starts, 1))
        ctx.chunk, ctx.K, ctx.has_h0 = chunk, K, h0_BEN is not None
        ctx.dtypes = tuple(t.dtype for t in (x_BTE, dt_BTE, A_EN, B_BTN, C_BTN)) + \
            ((h0_BEN.dtype,) if h0_BEN is not None else (None,))
        return y, h

    @staticmethod
    def backward(ctx, dy_BTE, dh_BEN):
        x, dt, A, Bm, Cm, starts = ctx.saved_tensors
        Bsz, T, E = x.shape
        K, chunk = ctx.K, ctx.chunk
        dy = dy_BTE.to(x.dtype) if dy_BTE is not None else x.new_zeros(Bsz, T, E)
        carry = dh_BEN.to(x.dtype) if dh_BEN is not None else x.new_zeros(Bsz, E, A.shape[1])
        dx, ddt, dB, dC = (torch.empty_like(t) for t in (x, dt, Bm, Cm))
        dA = torch.zeros_like(A)
        ones = x.new_ones(Bsz, 1, E, A.shape[1])
        with torch.autocast(x.device.type, enabled=False):
            for i, t0 in reversed(list(enumerate(range(0, T, K)))):
                s = slice(t0, t0 + K)
                dt_s, x_s, B_s, C_s, dy_s = dt[:, s], x[:, s], Bm[:, s], Cm[:, s], dy[:, s]
                a = torch.exp(dt_s[..., None] * A)
                dtx = dt_s * x_s
                u = dtx[..., None] * B_s[:, :, None, :]
                h = linear_scan(a, u, starts[:, i], chunk)
                g = dy_s[..., None] * C_s[:, :, None, :]
                G = linear_scan(torch.cat([a[:, 1:], ones], 1), g, carry, chunk, reverse=True)
                carry = a[:, 0] * G[:, 0]
                Q = G * (h - u)  # dLoss / d(dt A): G_t * a_t * h_{t-1}
                GB = torch.einsum("bken,bkn->bke", G, B_s)
                dx[:, s] = dt_s * GB
                ddt[:, s] = torch.einsum("bken,en->bke", Q, A) + x_s * GB
                dA += torch.einsum("bken,bke->en", Q, dt_s)
                dB[:, s] = torch.einsum("bken,bke->bkn", G, dtx)
                dC[:, s] = torch.einsum("bken,bke->bkn", h, dy_s)
        grads = [g.to(d) for g, d in zip((dx, ddt, dA, dB, dC), ctx.dtypes)]
        dh0 = carry.to(ctx.dtypes[5]) if ctx.has_h0 else None
        return (*grads, dh0, None, None)


def selective_scan(x_BTE: torch.Tensor, dt_BTE: torch.Tensor, A_EN: torch.Tensor, B_BTN: torch.Tensor,
                   C_BTN: torch.Tensor, h0_BEN: torch.Tensor | None = None, chunk_size: int = 64,
                   block_elems: int | None = None):
    """The selective scan over T steps (module docstring); ``h0_BEN`` continues a sequence.

    Returns ``y_BTE`` (fp32, or fp64 for fp64 inputs; without the D skip) and the state after the
    last step ``h_BEN``. ``chunk_size`` is the inner chunk length L; ``block_elems`` the floats of
    one block tensor (default: 2M on CPU, 128M on CUDA).
    """
    return _SelectiveScan.apply(x_BTE, dt_BTE, A_EN, B_BTN, C_BTN, h0_BEN, chunk_size, block_elems)
