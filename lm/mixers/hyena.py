"""Hyena: an implicit long-convolution token mixer.

Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models" (arXiv:2302.10866),
following the reference ``HyenaOperator`` of HazyResearch/safari: an input projection to
(order + 1) * dim, a short depthwise causal conv, then ``order - 1`` rounds of
``v <- h_o * (v . x_o) + bias_o * (v . x_o)`` with implicit long filters ``h_o`` (sinusoidal positional
features -> MLP with sine activations -> exponential decay), and ``y = out_proj(v . x_0)``.
The long convolutions run by FFT in O(T log T) (``fft_conv``).

Legend: B batch, T new tokens, P tokens so far, L filter length, D model dim, O order - 1 filters,
E (order + 1) * D projected channels, Z positional-feature dim (``emb_dim``), F filter MLP width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.registry import MIXERS

_KEY = "model.config.mixer_options"


def fft_conv(u_BDL: torch.Tensor, k_DL: torch.Tensor, bias_D: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise convolution ``y_t = sum_{s<=t} k_{t-s} u_s (+ bias * u_t)`` by FFT (fp32).

    Zero-padding to 2L makes the circular FFT convolution linear, so no output sees the future.
    """
    L = u_BDL.shape[-1]
    n = 2 * L
    u = u_BDL.float()
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k_DL[..., :L].float(), n=n), n=n)[..., :L]
    if bias_D is not None:
        y = y + u * bias_D.float()[:, None]
    return y.to(u_BDL.dtype)


def positional_features(max_len: int, emb_dim: int, L: int | None = None, device=None):
    """Hyena's filter inputs for positions 0..L-1 of a filter defined up to ``max_len``: ``t`` in
    [0, 1] and (emb_dim - 1) / 2 complex exponentials (real and imaginary parts); returns
    (z_LZ, t_L1) in fp32."""
    L = max_len if L is None else L
    pos_L1 = torch.arange(L, dtype=torch.float32, device=device)[:, None]
    t_L1 = pos_L1 / max(max_len - 1, 1)
    bands = (emb_dim - 1) // 2
    f_1F = torch.linspace(1e-4, bands - 1, bands, device=device)[None]
    z = torch.exp(-1j * f_1F * (2 * math.pi * pos_L1 / max_len))
    return torch.cat([t_L1, z.real, z.imag], dim=-1), t_L1


class HyenaFilter(nn.Module):
    """Implicit long filters of one Hyena layer: ``h(t) = MLP_sin(z(t)) * exp(-|delta| t)`` for
    ``num_filters * dim`` channels, plus the per-channel ``bias`` (the D skip of each long conv).

    One leaf module holding its MLP weights directly, so the model-wide N(0, init_std) Linear init
    calls this ``reset_parameters`` (PyTorch's Linear init, sine frequency ``w``) instead of
    flattening the sine MLP.
    """

    def __init__(self, dim: int, num_filters: int, max_len: int, emb_dim: int, filter_order: int,
                 num_inner_mlps: int = 2, w: float = 1.0, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2):
        super().__init__()
        self.dim, self.num_filters, self.w = dim, num_filters, w
        self.max_len, self.emb_dim = max_len, emb_dim
        channels = dim * num_filters
        # the fixed inputs (positions, decay rates) are recomputed in fp32 per call, never stored, so
        # a bf16 model does not round them
        self.decay_range = (math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct)
        self.w_in = nn.Parameter(torch.empty(filter_order, emb_dim))
        self.b_in = nn.Parameter(torch.empty(filter_order))
        self.w_hidden = nn.Parameter(torch.empty(num_inner_mlps, filter_order, filter_order))
        self.b_hidden = nn.Parameter(torch.empty(num_inner_mlps, filter_order))
        self.w_out = nn.Parameter(torch.empty(channels, filter_order))
        self.freq = nn.Parameter(torch.empty(num_inner_mlps + 1, filter_order))  # Sin(freq * x)
        self.bias = nn.Parameter(torch.empty(channels))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        def linear_init(w, b=None):
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

        linear_init(self.w_in, self.b_in)
        for i in range(self.w_hidden.shape[0]):
            linear_init(self.w_hidden[i], self.b_hidden[i])
        linear_init(self.w_out)
        self.freq.fill_(self.w)
        nn.init.normal_(self.bias)

    def forward(self, L: int) -> torch.Tensor:
        """The filters for positions 0..L-1: [O, D, L] (fp32)."""
        z_LZ, t_L1 = positional_features(self.max_len, self.emb_dim, L, self.w_in.device)
        deltas_C = torch.linspace(*self.decay_range, self.w_out.shape[0], device=self.w_in.device)
        freq = self.freq.float()
        h = torch.sin(freq[0] * F.linear(z_LZ, self.w_in.float(), self.b_in.float()))
        for i in range(self.w_hidden.shape[0]):
            h = torch.sin(freq[i + 1] * F.linear(h, self.w_hidden[i].float(), self.b_hidden[i].float()))
        h_LC = F.linear(h, self.w_out.float()) * torch.exp(-t_L1 * deltas_C.abs())
        return h_LC.t().reshape(self.num_filters, self.dim, L)


class HyenaCache:
    """Hyena has no constant-size recurrence: decoding keeps what the long convolutions need.

    ``tail_BEK`` holds the last K-1 projected inputs (for the short conv); ``levels_OBDP`` holds,
    per long filter, its input ``v . x_o`` at every position seen so far (these never change once
    computed, by causality), so a new token costs one O(P) dot product per channel and filter, and a
    prefill one FFT convolution over the prefix. ``filters`` are computed once per cache (decoding
    assumes fixed weights). Memory grows as O(P), like a KV cache.
    """

    def __init__(self, batch: int, dim: int, order: int, short_k: int, max_len: int, device, dtype):
        self.tail_BEK = torch.zeros(batch, (order + 1) * dim, short_k - 1, device=device, dtype=dtype)
        self.levels_OBDP = torch.zeros(order - 1, batch, dim, max_len, device=device, dtype=dtype)
        self.filters_ODL: torch.Tensor | None = None

    def nbytes(self) -> int:
        n = self.tail_BEK.nbytes + self.levels_OBDP.nbytes
        return n + (self.filters_ODL.nbytes if self.filters_ODL is not None else 0)


@MIXERS.register("hyena")
class Hyena(nn.Module):
    """Order-N Hyena operator (Poli et al. 2023): data-controlled gating interleaved with implicit
    long convolutions, sub-quadratic in the sequence length (FFT)."""

    def __init__(self, cfg, layer_idx: int = 0, *, order: int = 2, filter_order: int = 64, emb_dim: int = 33,
                 short_filter_order: int = 3, max_len: int | None = None, num_inner_mlps: int = 2,
                 bias: bool = True):
        super().__init__()
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not isinstance(order, int) or order < 2:
            raise ValueError(f"{_KEY}.order: Hyena needs order >= 2, got {order!r}")
        if not isinstance(emb_dim, int) or emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"{_KEY}.emb_dim: must be an odd integer >= 3, got {emb_dim!r}")
        for name, val in (("filter_order", filter_order), ("short_filter_order", short_filter_order),
                          ("max_len", max_len)):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{_KEY}.{name}: must be a positive integer, got {val!r}")
        if not isinstance(num_inner_mlps, int) or num_inner_mlps < 0:
            raise ValueError(f"{_KEY}.num_inner_mlps: must be a non-negative integer, got {num_inner_mlps!r}")
        D, E = cfg.dim, (order + 1) * cfg.dim
        self.dim, self.order, self.max_len, self.short_k = D, order, max_len, short_filter_order
        self.in_proj = nn.Linear(D, E, bias=bias)
        self.short_filter = nn.Conv1d(E, E, short_filter_order, groups=E)  # weight [E, 1, K]; padded by hand
        self.filter = HyenaFilter(D, order - 1, max_len, emb_dim, filter_order, num_inner_mlps)
        self.out_proj = nn.Linear(D, D, bias=bias)
        self.out_proj.is_residual_out = True

    def init_cache(self, batch: int, max_len: int, device, dtype) -> HyenaCache:
        return HyenaCache(batch, self.dim, self.order, self.short_k, min(max_len, self.max_len), device, dtype)

    def forward(self, x_BTD: torch.Tensor, *, cache: HyenaCache | None = None, start_pos: int = 0,
                **ctx) -> torch.Tensor:
        T = x_BTD.shape[1]
        end = start_pos + T if cache is not None else T
        if end > self.max_len:
            raise ValueError(f"{_KEY}.max_len: a sequence of {end} tokens exceeds Hyena's max_len={self.max_len} "
                             "(the implicit filters are defined up to max_len)")
        u_BET = self.in_proj(x_BTD).transpose(1, 2)
        if cache is None:
            u_BET = F.pad(u_BET, (self.short_k - 1, 0))
        else:
            u_BET = torch.cat([cache.tail_BEK.to(u_BET.dtype), u_BET], dim=-1)
            cache.tail_BEK = u_BET[..., u_BET.shape[-1] - (self.short_k - 1):].detach().clone()
        uc_BET = F.conv1d(u_BET, self.short_filter.weight, self.short_filter.bias, groups=u_BET.shape[1])
        *xs, v_BDT = uc_BET.split(self.dim, dim=1)
        bias_OD = self.filter.bias.view(self.order - 1, self.dim)
        if cache is None:
            k_ODL = self.filter(T)
        else:
            if cache.filters_ODL is None:
                cache.filters_ODL = self.filter(cache.levels_OBDP.shape[-1]).detach()
            k_ODL = cache.filters_ODL
        for o, x_i in enumerate(reversed(xs[1:])):
            v_BDT = v_BDT * x_i
            if cache is None:
                v_BDT = fft_conv(v_BDT, k_ODL[o], bias_OD[o])
            else:
                v_BDT = self._cached_conv(cache, o, v_BDT, k_ODL[o], bias_OD[o], start_pos)
        return self.out_proj((v_BDT * xs[0]).transpose(1, 2))

    @staticmethod
    def _cached_conv(cache: HyenaCache, o: int, v_BDT, k_DL, bias_D, start_pos: int) -> torch.Tensor:
        """Long conv outputs for the T new positions, from all inputs of filter ``o`` seen so far."""
        T = v_BDT.shape[-1]
        end = start_pos + T
        cache.levels_OBDP[o, :, :, start_pos:end] = v_BDT.detach()
        hist_BDP = torch.cat([cache.levels_OBDP[o, :, :, :start_pos], v_BDT], dim=-1)  # keeps the graph of v
        if T == 1:  # decode: one dot product per channel over the history
            y = (hist_BDP.float() * k_DL[:, :end].flip(-1)).sum(-1, keepdim=True)
        else:  # prefill: one FFT convolution over the prefix, keep the new positions
            y = fft_conv(hist_BDP, k_DL[:, :end])[..., start_pos:].float()
        return (y + v_BDT.float() * bias_D.float()[:, None]).to(v_BDT.dtype)
