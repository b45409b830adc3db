"""Mamba: the selective state-space token mixer.

Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (arXiv:2312.00752).
Parameter names follow transformers' ``MambaMixer`` (in_proj, conv1d, x_proj, dt_proj, A_log, D,
out_proj), so exporting to ``MambaForCausalLM`` is a rename (``lm.tools.export_ssm``).

Legend: B batch, T sequence, M model dim, E inner dim (expand * M), N state size, R dt rank,
K conv kernel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.mixers.ssm_scan import selective_scan
from lm.registry import MIXERS

_KEY = "model.config.mixer_options"
__all__ = ["Mamba", "MambaCache", "selective_scan"]


class MambaCache:
    """Constant-size decoding state of one Mamba layer: the last K conv inputs and the SSM state."""

    def __init__(self, batch: int, d_inner: int, d_conv: int, d_state: int, device, dtype):
        self.conv_state = torch.zeros(batch, d_inner, d_conv, device=device, dtype=dtype)  # [B, E, K]
        self.ssm_state = torch.zeros(batch, d_inner, d_state, device=device, dtype=torch.float32)  # [B, E, N]

    def nbytes(self) -> int:
        return self.conv_state.nbytes + self.ssm_state.nbytes


class DtProjection(nn.Module):
    """``dt_proj``: R -> E with bias, Mamba's dt initialisation (weights U(+-R^-1/2), bias =
    softplus^-1 of a log-uniform dt in [dt_min, dt_max]).

    A leaf module rather than an ``nn.Linear`` so the model-wide N(0, init_std) Linear init of
    ``DecoderLM.reset_parameters`` calls this ``reset_parameters`` instead of zeroing the bias.
    """

    def __init__(self, rank: int, inner: int, dt_min: float, dt_max: float, dt_init_floor: float):
        super().__init__()
        self.rank, self.dt_min, self.dt_max, self.dt_init_floor = rank, dt_min, dt_max, dt_init_floor
        self.weight = nn.Parameter(torch.empty(inner, rank))
        self.bias = nn.Parameter(torch.empty(inner))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.rank ** -0.5
        nn.init.uniform_(self.weight, -std, std)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.bias.shape, device=self.bias.device) * (hi - lo) + lo)
        dt = dt.clamp(min=self.dt_init_floor)
        self.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def forward(self, dt_R: torch.Tensor) -> torch.Tensor:
        """Pre-softplus dt in fp32 (bias added in fp32, as transformers does)."""
        return (dt_R @ self.weight.t()).float() + self.bias.float()


@MIXERS.register("mamba")
class Mamba(nn.Module):
    """Mamba selective SSM mixer (Gu & Dao 2023): ``out_proj(SSM(silu(conv(x))) * silu(z))``.

    ``in_proj`` gives the SSM input x and the gate z (E = expand * dim each); a depthwise causal conv
    (kernel ``d_conv``) mixes neighbours; ``x_proj`` makes the input-dependent dt (rank R), B and C;
    ``A = -exp(A_log)`` (S4D-real init: A_n = -(n+1)) and the ``D`` skip are input-independent.
    Training runs the blockwise two-level scan (``lm.mixers.ssm_scan``); decoding keeps a constant-size
    ``MambaCache`` and steps the recurrence; a prefill through the cache runs the parallel form and
    leaves the final conv/SSM states in the cache.
    """

    def __init__(self, cfg, layer_idx: int = 0, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False, chunk_size: int = 64):
        super().__init__()
        for name, val in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand), ("chunk_size", chunk_size)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{_KEY}.{name}: must be a positive integer, got {val!r}")
        if dt_rank == "auto":
            dt_rank = math.ceil(cfg.dim / 16)
        if not isinstance(dt_rank, int) or isinstance(dt_rank, bool) or dt_rank <= 0:
            raise ValueError(f"{_KEY}.dt_rank: must be 'auto' or a positive integer, got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"{_KEY}.dt_min: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = expand * cfg.dim, d_state, d_conv, dt_rank
        self.chunk_size = chunk_size
        E = self.d_inner
        self.in_proj = nn.Linear(cfg.dim, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, bias=conv_bias)  # weight [E, 1, K]; padded by hand
        self.x_proj = nn.Linear(E, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = DtProjection(dt_rank, E, dt_min, dt_max, dt_init_floor)
        A_EN = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(E, 1)
        self.A_log = nn.Parameter(torch.log(A_EN))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, cfg.dim, bias=bias)
        self.out_proj.is_residual_out = True

    def init_cache(self, batch: int, max_len: int, device, dtype) -> MambaCache:
        return MambaCache(batch, self.d_inner, self.d_conv, self.d_state, device, dtype)

    def _ssm_inputs(self, xc: torch.Tensor):
        dt, B, C = self.x_proj(xc).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C, -torch.exp(self.A_log.float())

    def forward(self, x_BTM: torch.Tensor, *, cache: MambaCache | None = None, start_pos: int = 0,
                **ctx) -> torch.Tensor:
        x_BTE, z_BTE = self.in_proj(x_BTM).chunk(2, dim=-1)
        if cache is not None and x_BTM.shape[1] == 1:
            y_BTE = self.step(x_BTE[:, 0], cache)[:, None]
        else:
            y_BTE = self.parallel(x_BTE, cache)
        y_BTE = y_BTE * F.silu(z_BTE.float())
        return self.out_proj(y_BTE.to(x_BTM.dtype))

    def parallel(self, x_BTE: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """Conv + chunked scan over T tokens (training, or a prefill that continues from and updates
        the cache's states); fp32 y_BTE before the gate."""
        x_BET = x_BTE.transpose(1, 2)
        if cache is not None:
            x_BET = torch.cat([cache.conv_state[..., 1:].to(x_BET.dtype), x_BET], dim=-1)
            cache.conv_state = x_BET[..., -self.d_conv:].to(cache.conv_state.dtype).clone()
        else:
            x_BET = F.pad(x_BET, (self.d_conv - 1, 0))
        xc_BTE = F.silu(F.conv1d(x_BET, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)).transpose(1, 2)
        dt_BTE, B_BTN, C_BTN, A_EN = self._ssm_inputs(xc_BTE)
        y_BTE, h_BEN = selective_scan(xc_BTE, dt_BTE, A_EN, B_BTN, C_BTN,
                                      cache.ssm_state if cache is not None else None, self.chunk_size)
        if cache is not None:
            cache.ssm_state = h_BEN
        return y_BTE + xc_BTE.float() * self.D.float()

    def step(self, x_BE: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """One recurrent decoding step from the conv and SSM states (updated in the cache); fp32 y_BE
        before the gate."""
        conv_BEK = torch.cat([cache.conv_state[..., 1:], x_BE[..., None].to(cache.conv_state.dtype)], dim=-1)
        cache.conv_state = conv_BEK
        xc_BE = (conv_BEK * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xc_BE = xc_BE + self.conv1d.bias
        xc_BE = F.silu(xc_BE).to(x_BE.dtype)
        dt_BE, B_BN, C_BN, A_EN = self._ssm_inputs(xc_BE)
        h_BEN = torch.exp(dt_BE[..., None] * A_EN) * cache.ssm_state \
            + (dt_BE * xc_BE.float())[..., None] * B_BN.float()[:, None, :]
        cache.ssm_state = h_BEN
        return torch.einsum("ben,bn->be", h_BEN, C_BN.float()) + xc_BE.float() * self.D.float()
