"""RWKV-4: the time-mix token mixer and the channel-mix feed-forward layer.

Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era" (arXiv:2305.13048); the
architecture transformers' ``RwkvForCausalLM`` implements, with its parameter names (time_decay,
time_first, time_mix_*, key/value/receptance/output), so export is a rename (``lm.tools.export_ssm``).

The WKV recurrence per channel c, with decay ``w = exp(time_decay)`` and bonus ``u = time_first``::

    wkv_t = (sum_{s<t} e^{-(t-1-s) w + k_s} v_s + e^{u + k_t} v_t) / (same sums without v)

Legend: B batch, T sequence, D model dim, C attention channels, F ffn hidden, N chunks, L chunk length.
States are kept max-normalised, as in the reference CUDA kernel: a triple (num, den, m) stands for
``(num * e^m, den * e^m)``, so no exponential of a key can overflow.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.registry import FFNS, MIXERS

_KEY = "model.config.mixer_options"
_EMPTY = -1e38  # max-exponent of an empty state (as transformers and the RWKV kernels use)


def _merge(n1, d1, m1, n2, d2, m2):
    """Sum of two max-normalised (num, den, m) states."""
    m = torch.maximum(m1, m2)
    e1, e2 = torch.exp(m1 - m), torch.exp(m2 - m)
    return n1 * e1 + n2 * e2, d1 * e1 + d2 * e2, m


def wkv_parallel(time_decay_C: torch.Tensor, time_first_C: torch.Tensor, k_BTC: torch.Tensor, v_BTC: torch.Tensor,
                 state=None, chunk_size: int = 32):
    """WKV over T tokens in parallel (fp32); ``state`` (num, den, max) [B, C] each continues a sequence.

    Chunked doubling scan on the inclusive states ``S_t = sum_{s<=t} e^{-(t-s) w + k_s} (v_s, 1)``:
    within each chunk (all chunks at once) log2(L) steps merge windows ``S_t <- S_t + e^{-k w}
    S_{t-k}`` for k = 1, 2, 4, ... in max-normalised form; the states at the chunk starts follow
    sequentially over the N chunks; every position then adds its chunk-start state decayed by
    ``e^{-(j+1) w}``. The output merges the exclusive state ``S_{t-1}`` with the bonus term
    ``e^{u + k_t} v_t``. Returns (wkv_BTC fp32, final state).
    """
    Bsz, T, C = k_BTC.shape
    w_C = torch.exp(time_decay_C.float())
    k, v = k_BTC.float(), v_BTC.float()
    L = max(1, min(chunk_size, T))
    nC = -(-T // L)
    pad = nC * L - T
    kp, vp = (F.pad(t, (0, 0, 0, pad)) for t in (k, v)) if pad else (k, v)
    n, m = vp.view(Bsz, nC, L, C), kp.view(Bsz, nC, L, C)
    d = torch.ones_like(n)
    s = 1
    while s < L:
        n2, d2, m2 = _merge(n[:, :, s:], d[:, :, s:], m[:, :, s:], n[:, :, :-s], d[:, :, :-s], m[:, :, :-s] - s * w_C)
        n, d, m = (torch.cat([a[:, :, :s], b], dim=2) for a, b in ((n, n2), (d, d2), (m, m2)))
        s *= 2
    if state is None:
        n0, d0, m0 = k.new_zeros(Bsz, C), k.new_zeros(Bsz, C), k.new_full((Bsz, C), _EMPTY)
    else:
        n0, d0, m0 = (t.float() for t in state)
    init = (n0, d0, m0)
    starts = []
    # unbind, not n[:, c, -1]: each indexing's backward would write a full-size zero gradient
    # (O(N^2) work over the loop); unbind's backward is one stack
    for c, (nc, dc, mc) in enumerate(zip(*(t[:, :, -1].unbind(1) for t in (n, d, m)))):
        starts.append((n0, d0, m0))
        if c + 1 < nC:
            n0, d0, m0 = _merge(nc, dc, mc, n0, d0, m0 - L * w_C)
    N0, D0, M0 = (torch.stack(z, dim=1)[:, :, None] for z in zip(*starts))  # [B, N, 1, C]
    j_L1 = torch.arange(1, L + 1, device=k.device, dtype=k.dtype)[:, None]
    S = _merge(n, d, m, N0, D0, M0 - j_L1 * w_C)
    Sn, Sd, Sm = (t.reshape(Bsz, nC * L, C)[:, :T] for t in S)
    final = (Sn[:, -1], Sd[:, -1], Sm[:, -1])
    pn, pd, pm = (torch.cat([i[:, None], t[:, :-1]], dim=1) for i, t in zip(init, (Sn, Sd, Sm)))
    bonus = time_first_C.float() + k
    mo = torch.maximum(pm, bonus)
    e1, e2 = torch.exp(pm - mo), torch.exp(bonus - mo)
    return (e1 * pn + e2 * v) / (e1 * pd + e2), final


def wkv_step(time_decay_C, time_first_C, k_BC, v_BC, state):
    """One recurrent WKV step (fp32) from the (num, den, max) state; returns (wkv_BC, new state)."""
    num, den, mx = state
    k, v = k_BC.float(), v_BC.float()
    bonus = time_first_C.float() + k
    mo = torch.maximum(mx, bonus)
    e1, e2 = torch.exp(mx - mo), torch.exp(bonus - mo)
    out = (e1 * num + e2 * v) / (e1 * den + e2)
    new = _merge(num, den, mx - torch.exp(time_decay_C.float()), v, torch.ones_like(v), k)
    return out, new


class RwkvCache:
    """Constant-size decoding state of one RWKV layer: the time-mix token shift ``shift_BD`` and
    WKV state (num, den, max) [B, C] in fp32, and the channel-mix token shift ``ffn_shift_BD``
    (the Block hands this cache to a ``needs_cache`` ffn)."""

    def __init__(self, batch: int, dim: int, channels: int, device, dtype):
        self.shift_BD = torch.zeros(batch, dim, device=device, dtype=dtype)
        self.ffn_shift_BD = torch.zeros(batch, dim, device=device, dtype=dtype)
        z = torch.zeros(batch, channels, device=device, dtype=torch.float32)
        self.wkv = (z, z.clone(), torch.full_like(z, _EMPTY))

    def nbytes(self) -> int:
        return self.shift_BD.nbytes + self.ffn_shift_BD.nbytes + sum(t.nbytes for t in self.wkv)


def _shifted(x_BTD: torch.Tensor, prev_BD: torch.Tensor | None) -> torch.Tensor:
    """Token shift: position t sees x_{t-1}; position 0 sees ``prev`` (zeros at a sequence start)."""
    if prev_BD is None:
        return F.pad(x_BTD, (0, 0, 1, -1))
    return torch.cat([prev_BD[:, None].to(x_BTD.dtype), x_BTD[:, :-1]], dim=1)


def _ratios(cfg, layer_idx: int) -> tuple[float, float]:
    return layer_idx / max(cfg.num_layers - 1, 1), 1.0 - layer_idx / cfg.num_layers


@MIXERS.register("rwkv")
class RwkvTimeMix(nn.Module):
    """RWKV-4 time mixing (Peng et al. 2023): token shift, ``r = sigmoid(W_r x_r)``, ``k, v``,
    ``output(r * WKV(k, v))``; WKV is a linear recurrence with a per-channel exponential decay,
    trained with the chunked parallel scan (``wkv_parallel``) and decoded with a constant state.
    """

    def __init__(self, cfg, layer_idx: int = 0, *, attention_hidden: int | None = None, chunk_size: int = 32):
        super().__init__()
        if attention_hidden is not None and attention_hidden <= 0:
            raise ValueError(f"{_KEY}.attention_hidden: must be positive, got {attention_hidden}")
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"{_KEY}.chunk_size: must be a positive integer, got {chunk_size!r}")
        D, C = cfg.dim, attention_hidden or cfg.dim
        self.dim, self.channels, self.chunk_size = D, C, chunk_size
        r01, r10 = _ratios(cfg, layer_idx)
        ddd = (torch.arange(D, dtype=torch.float32) / D)[None, None]
        h = torch.arange(C, dtype=torch.float32)
        zigzag = ((h + 1) % 3 - 1) * 0.5
        self.time_decay = nn.Parameter(-5 + 8 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * r01))
        self.time_first = nn.Parameter(math.log(0.3) + zigzag)
        self.time_mix_key = nn.Parameter(ddd ** r10)
        self.time_mix_value = nn.Parameter(ddd ** r10 + 0.3 * r01)
        self.time_mix_receptance = nn.Parameter(ddd ** (0.5 * r10))
        self.key = nn.Linear(D, C, bias=False)
        self.value = nn.Linear(D, C, bias=False)
        self.receptance = nn.Linear(D, C, bias=False)
        self.output = nn.Linear(C, D, bias=False)
        self.output.is_residual_out = True

    def init_cache(self, batch: int, max_len: int, device, dtype) -> RwkvCache:
        return RwkvCache(batch, self.dim, self.channels, device, dtype)

    def forward(self, x_BTD: torch.Tensor, *, cache: RwkvCache | None = None, start_pos: int = 0,
                **ctx) -> torch.Tensor:
        xx = _shifted(x_BTD, cache.shift_BD if cache is not None else None)
        if cache is not None:
            cache.shift_BD = x_BTD[:, -1].detach().clone()
        mk, mv, mr = self.time_mix_key, self.time_mix_value, self.time_mix_receptance
        k = self.key(x_BTD * mk + xx * (1 - mk))
        v = self.value(x_BTD * mv + xx * (1 - mv))
        r = torch.sigmoid(self.receptance(x_BTD * mr + xx * (1 - mr)))
        if cache is not None and x_BTD.shape[1] == 1:
            wkv, state = wkv_step(self.time_decay, self.time_first, k[:, 0], v[:, 0], cache.wkv)
            wkv = wkv[:, None]
        else:
            wkv, state = wkv_parallel(self.time_decay, self.time_first, k, v,
                                      cache.wkv if cache is not None else None, self.chunk_size)
        if cache is not None:
            cache.wkv = state
        return self.output(r * wkv.to(r.dtype))


@FFNS.register("rwkv_channel_mix")
class RwkvChannelMix(nn.Module):
    """RWKV-4 channel mixing (Peng et al. 2023): token shift, ``sigmoid(W_r x_r) * W_v relu(W_k x_k)^2``.

    Its token shift needs the previous token while decoding: ``needs_cache = True`` asks the Block
    to pass the layer's cache. The shift state lives in ``cache.ffn_shift_BD``: an ``RwkvCache``
    has it preallocated; any other mixer's cache (e.g. attention's in a hybrid) gets it attached on
    the first call. Without a cache every call starts a fresh sequence (training).
    """

    needs_cache = True

    def __init__(self, cfg, layer_idx: int = 0, *, hidden: int | None = None):
        super().__init__()
        D = cfg.dim
        F_ = hidden or cfg.ffn_hidden or 4 * D
        _, r10 = _ratios(cfg, layer_idx)
        ddd = (torch.arange(D, dtype=torch.float32) / D)[None, None]
        self.time_mix_key = nn.Parameter(ddd ** r10)
        self.time_mix_receptance = nn.Parameter(ddd ** r10)
        self.key = nn.Linear(D, F_, bias=False)
        self.receptance = nn.Linear(D, D, bias=False)
        self.value = nn.Linear(F_, D, bias=False)
        self.value.is_residual_out = True

    def forward(self, x_BTD: torch.Tensor, cache=None) -> torch.Tensor:
        prev = getattr(cache, "ffn_shift_BD", None) if cache is not None else None
        if cache is not None and prev is None:
            prev = x_BTD.new_zeros(x_BTD.shape[0], x_BTD.shape[2])
        xx = _shifted(x_BTD, prev)
        if cache is not None:
            cache.ffn_shift_BD = x_BTD[:, -1].detach().clone()
        mk, mr = self.time_mix_key, self.time_mix_receptance
        k = torch.square(torch.relu(self.key(x_BTD * mk + xx * (1 - mk))))
        return torch.sigmoid(self.receptance(x_BTD * mr + xx * (1 - mr))) * self.value(k)
