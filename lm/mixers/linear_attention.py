"""Linear attention: kernelised (elu + 1) and Performer FAVOR+, causal through chunked prefix sums.

Katharopoulos et al. 2020, "Transformers are RNNs: Fast Autoregressive Transformers with Linear
Attention" (arXiv:2006.16236): ``softmax(q.k)`` is replaced by a kernel ``phi(q).phi(k)``, so causal
attention is a running sum ``S_t = sum_{s<=t} phi(k_s) v_s^T``, ``z_t = sum phi(k_s)`` and
``out_t = phi(q_t) S_t / phi(q_t) z_t``: O(T) time, and a constant decoding state (S, z).
Choromanski et al. 2021, "Rethinking Attention with Performers" (arXiv:2009.14794): FAVOR+ positive
orthogonal random features make ``phi(q).phi(k)`` an unbiased estimate of ``exp(q.k / sqrt(D))``,
so the Performer approximates softmax attention, better as the number of features F grows.

Legend: B batch, K kv heads, G query heads per kv head, H = K*G, T length, C chunks, L chunk
length, F features, D head dim, M model dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lm.mixers.attention import add_qkvo, project_qkv
from lm.registry import MIXERS

_KEY = "model.config.mixer_options"
EPS = 1e-6


def causal_linear_attention(phi_q_BKGTF: torch.Tensor, phi_k_BKTF: torch.Tensor, v_BKTD: torch.Tensor,
                            state: tuple[torch.Tensor, torch.Tensor] | None = None, chunk_size: int = 64,
                            eps: float = EPS):
    """``out_t = phi(q_t) . S_t / (phi(q_t) . z_t + eps)`` with S, z summed over s <= t, in fp32.

    Chunked: inside a chunk of L the quadratic form (masked ``phi_q phi_k^T``), across chunks the
    exclusive prefix sums of the per-chunk ``phi_k^T v``; memory O(T/L * F * D + T * L) instead of
    the O(T * F * D) of a per-token cumsum. ``state = (S_BKFD, z_BKF)`` continues a sequence.
    Returns ``(out_BKGTD, (S_BKFD, z_BKF))`` with the state after the last position.
    """
    B, K, G, T, Fn = phi_q_BKGTF.shape
    D = v_BKTD.shape[-1]
    L = max(1, min(chunk_size, T))
    C = -(-T // L)
    pq, pk, v = phi_q_BKGTF.float(), phi_k_BKTF.float(), v_BKTD.float()
    if C * L != T:  # zero features past the end add nothing to any sum
        pad = C * L - T
        pq, pk, v = F.pad(pq, (0, 0, 0, pad)), F.pad(pk, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
    pq, pk, v = pq.view(B, K, G, C, L, Fn), pk.view(B, K, C, L, Fn), v.view(B, K, C, L, D)
    kv_BKCFD = torch.einsum("bkclf,bkcld->bkcfd", pk, v)
    k_BKCF = pk.sum(3)
    S_prev = F.pad(kv_BKCFD.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :C]  # sums before chunk c
    z_prev = F.pad(k_BKCF.cumsum(2), (0, 0, 1, 0))[:, :, :C]
    if state is not None:  # (an extra [C, F, D] copy only when continuing a sequence)
        S_prev = S_prev + state[0].float()[:, :, None]
        z_prev = z_prev + state[1].float()[:, :, None]
    tril_LL = torch.ones(L, L, dtype=torch.bool, device=pq.device).tril()
    a = torch.einsum("bkgclf,bkcmf->bkgclm", pq, pk).masked_fill(~tril_LL, 0.0)
    num = torch.einsum("bkgclf,bkcfd->bkgcld", pq, S_prev) + torch.einsum("bkgclm,bkcmd->bkgcld", a, v)
    den = torch.einsum("bkgclf,bkcf->bkgcl", pq, z_prev) + a.sum(-1)
    out = (num / (den[..., None] + eps)).reshape(B, K, G, C * L, D)[:, :, :, :T]
    return out, (S_prev[:, :, -1] + kv_BKCFD[:, :, -1], z_prev[:, :, -1] + k_BKCF[:, :, -1])


def quadratic_linear_attention(phi_q_BKGTF, phi_k_BKTF, v_BKTD, eps: float = EPS) -> torch.Tensor:
    """The same causal kernel attention in its O(T^2) form (the reference of the tests)."""
    a = torch.einsum("bkgtf,bksf->bkgts", phi_q_BKGTF.float(), phi_k_BKTF.float()).tril()
    return torch.einsum("bkgts,bksd->bkgtd", a, v_BKTD.float()) / (a.sum(-1, keepdim=True) + eps)


def orthogonal_gaussian(num_features: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``[F, D]`` rows: blocks of D orthogonal directions (QR of Gaussians), each row rescaled to the
    length of a Gaussian vector (chi_D), so rows are marginally N(0, I) but orthogonal within a
    block (FAVOR+'s ORF: lower variance than i.i.d. features)."""
    blocks = [torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0].T
              for _ in range(-(-num_features // dim))]
    w_FD = torch.cat(blocks)[:num_features]
    return w_FD * torch.randn(num_features, dim, generator=generator).norm(dim=1, keepdim=True)


def favor_features(x_TD: torch.Tensor, w_FD: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Positive random features ``exp(w.x - |x|^2/2) / sqrt(F)`` of ``x / D^(1/4)`` (fp32), so that
    ``E[phi(q).phi(k)] = exp(q.k / sqrt(D))``.

    Stabilisers are per-row constants that cancel between numerator and denominator: a query drops
    ``|q|^2/2`` and its own max over features (its largest feature is 1); a key only subtracts
    ``max(0, max_f |w_f|^2/2 - 60)`` (``w.x - |x|^2/2 <= |w|^2/2``, so no key feature can exceed
    e^60) -- data independent, hence causal and the same in decoding as in training.
    """
    D = x_TD.shape[-1]
    x = x_TD.float() * D ** -0.25
    w = w_FD.float()
    wx = x @ w.T
    if is_query:
        return torch.exp(wx - wx.amax(-1, keepdim=True).detach())
    stab = max(0.0, float(w.square().sum(-1).max()) / 2 - 60.0)
    # 1/sqrt(F) folded into the exponent: one [T, F] tensor less kept for backward
    return torch.exp(wx - (x.square().sum(-1, keepdim=True) / 2 + stab + 0.5 * math.log(w.shape[0])))


class LinearAttentionCache:
    """Constant-size decoding state of one linear-attention layer: S ``[B, K, F, D]``, z ``[B, K, F]``."""

    def __init__(self, batch: int, kv_heads: int, num_features: int, head_dim: int, device):
        self.S_BKFD = torch.zeros(batch, kv_heads, num_features, head_dim, device=device, dtype=torch.float32)
        self.z_BKF = torch.zeros(batch, kv_heads, num_features, device=device, dtype=torch.float32)

    def nbytes(self) -> int:
        return self.S_BKFD.nbytes + self.z_BKF.nbytes


@MIXERS.register("linear_attention")
class LinearAttention(nn.Module):
    """Causal kernelised linear attention with ``phi(x) = elu(x) + 1`` (Katharopoulos et al. 2020),
    GQA (``num_kv_heads``) and RoPE on q, k before the feature map. Trains with the chunked
    prefix-sum form (``chunk_size``), decodes with a constant ``LinearAttentionCache``."""

    def __init__(self, cfg, layer_idx: int = 0, *, chunk_size: int = 64, bias: bool = False):
        super().__init__()
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"{_KEY}.chunk_size: must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        add_qkvo(self, cfg, bias)

    @property
    def num_features(self) -> int:
        return self.head_dim

    def features(self, x_BHTD: torch.Tensor, is_query: bool) -> torch.Tensor:
        return F.elu(x_BHTD.float()) + 1

    def init_cache(self, batch: int, max_len: int, device, dtype) -> LinearAttentionCache:
        return LinearAttentionCache(batch, self.num_kv_heads, self.num_features, self.head_dim, device)

    def forward(self, x_BTM: torch.Tensor, *, cache: LinearAttentionCache | None = None, start_pos: int = 0,
                **ctx) -> torch.Tensor:
        B, T, _ = x_BTM.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = project_qkv(self, x_BTM)
        q, k = self.rope(q, k, start_pos)
        phi_q = self.features(q, is_query=True).view(B, K, H // K, T, -1)
        phi_k = self.features(k, is_query=False)
        state = (cache.S_BKFD, cache.z_BKF) if cache is not None else None
        out_BKGTD, (S, z) = causal_linear_attention(phi_q, phi_k, v, state, self.chunk_size)
        if cache is not None:
            cache.S_BKFD, cache.z_BKF = S.detach(), z.detach()
        out = out_BKGTD.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(out.to(x_BTM.dtype))


@MIXERS.register("performer")
class Performer(LinearAttention):
    """Performer attention, FAVOR+ (Choromanski et al. 2021): positive orthogonal random features
    (``num_features``, default ``D log D``) estimating the softmax kernel, causal by prefix sums.

    Feature redraw schedule: the features are a buffer (saved in checkpoints) redrawn every
    ``feature_redraw_interval`` forward passes in training mode (0: never), fixed in eval. Each draw
    is seeded by (``seed``, layer, draw number), so every data-parallel rank and every resumed run
    draws the same features. Activation-checkpoint recomputation (inside backward) does not count.
    ``chunk_size`` defaults to 128 (~sqrt(F * D) balances the [T/L, F, D] prefix states against the
    [T, L] in-chunk scores; at 4k tokens, F=256: 147 MiB with 64, 123 MiB with 128).
    """

    def __init__(self, cfg, layer_idx: int = 0, *, num_features: int | None = None,
                 feature_redraw_interval: int = 1000, seed: int = 0, chunk_size: int = 128, bias: bool = False):
        super().__init__(cfg, layer_idx, chunk_size=chunk_size, bias=bias)
        D = self.head_dim
        num_features = max(1, int(D * math.log(D))) if num_features is None else num_features
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"{_KEY}.num_features: must be a positive integer, got {num_features!r}")
        if (isinstance(feature_redraw_interval, bool) or not isinstance(feature_redraw_interval, int)
                or feature_redraw_interval < 0):
            raise ValueError(f"{_KEY}.feature_redraw_interval: must be an integer >= 0 (0: never), "
                             f"got {feature_redraw_interval!r}")
        self.redraw_interval, self.seed, self.layer_idx = feature_redraw_interval, seed, layer_idx
        self._num_features = num_features
        self.register_buffer("proj_FD", torch.empty(num_features, D))
        self.calls = self.draws = 0  # Python ints (no device sync per step), saved as extra state
        self.redraw(count=0)

    @property
    def num_features(self) -> int:
        return self._num_features

    @torch.no_grad()
    def redraw(self, count: int | None = None) -> None:
        """Draws features number ``count`` (default: the next one) from its own seeded generator."""
        count = self.draws + 1 if count is None else count
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.layer_idx) * 1_000_003 + count)
        w = orthogonal_gaussian(self.num_features, self.head_dim, gen)
        self.proj_FD.copy_(w.to(self.proj_FD.device, self.proj_FD.dtype))
        self.draws = count

    def get_extra_state(self) -> dict:
        return {"calls": self.calls, "draws": self.draws}

    def set_extra_state(self, state: dict) -> None:
        self.calls, self.draws = int(state["calls"]), int(state["draws"])

    def features(self, x_BHTD: torch.Tensor, is_query: bool) -> torch.Tensor:
        return favor_features(x_BHTD, self.proj_FD, is_query)

    def forward(self, x_BTM: torch.Tensor, **kw) -> torch.Tensor:
        in_backward = torch._C._current_graph_task_id() != -1  # checkpoint recomputation
        if self.training and torch.is_grad_enabled() and not in_backward and self.redraw_interval:
            if self.calls > 0 and self.calls % self.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        return super().forward(x_BTM, **kw)
