"""Mixture-of-Experts feed-forward layer (``ffn: moe``): top-k router, expert capacity, aux losses.

Shazeer et al. 2017 (sparsely-gated MoE); Lepikhin et al. 2020 (GShard: top-2, capacity, first
choices before second); Fedus et al. 2021 (Switch Transformer: top-1, capacity factor, load-balance
loss α·N·Σ fᵢ·Pᵢ, router jitter); Zoph et al. 2022 (ST-MoE: router z-loss); Jiang et al. 2024
(Mixtral: top-2 of 8 SwiGLU experts, softmax → top-k → renormalise, no capacity).

Legend: B batch, T sequence, D model dim, S tokens (B*T), E experts, K top_k, R routes (K*S,
choice-major: route ``r = j*S + s`` is token s's j-th choice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lm.nn.mlp import GeluMLP, SwiGLU
from lm.registry import FFNS

EXPERTS = {"swiglu": SwiGLU, "gelu": GeluMLP}
AUX_LOSS, Z_LOSS = "moe_aux_loss", "moe_z_loss"  # logged by LanguageModel as train/{name}


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """Slots per expert, exactly as DeepSpeed's ``_capacity``:
    ``max(ceil(S / E * capacity_factor * K), min_capacity)``, the product taken in float32."""
    cap = torch.ceil((num_tokens / num_experts) * torch.tensor(capacity_factor * top_k))
    return max(int(cap), int(min_capacity))


@dataclass
class Routing:
    """The routing decisions of one forward pass (``route``)."""

    expert_SK: torch.Tensor  # chosen experts, long
    weight_SK: torch.Tensor  # combine weights (fp32); 0 where the route was dropped
    keep_SK: torch.Tensor  # bool: route fits in its expert's capacity
    order_R: torch.Tensor  # kept routes (choice-major indices), grouped by expert, in priority order
    kept_E: torch.Tensor  # kept routes per expert (sizes of the groups of order_R)
    counts_E: torch.Tensor  # routes assigned per expert before dropping
    capacity: Optional[int]  # None: no capacity limit
    aux_loss: torch.Tensor  # load-balance loss, unscaled (N·Σ fᵢ·Pᵢ)
    z_loss: torch.Tensor  # router z-loss, unscaled (mean logsumexp²)


def _group(expert_R: torch.Tensor, priority_R: Optional[torch.Tensor]) -> torch.Tensor:
    """Route indices grouped by expert; inside a group by descending ``priority_R`` (ties and
    ``None``: route order, i.e. first choices first, then token position)."""
    if priority_R is None:
        return torch.sort(expert_R, stable=True).indices
    by_priority = torch.sort(priority_R, descending=True, stable=True).indices
    return by_priority[torch.sort(expert_R[by_priority], stable=True).indices]


def route(logits_SE: torch.Tensor, top_k: int, capacity_factor: Optional[float] = None, min_capacity: int = 4,
          rts: bool = True) -> Routing:
    """Top-k routing with DeepSpeed's gating semantics (``deepspeed.moe.sharded_moe``).

    - experts: k=1 argmax of the softmax (``top1gating``); k=2 argmax, then the argmax of the
      remaining logits (``top2gating`` with ``top2_2nd_expert_sampling=False``); k>2 ``topk``.
    - weights: k=1 the softmax probability (Switch); k>=2 the probabilities of the kept routes
      renormalised over the kept routes (equal to Mixtral's top-k renormalisation without drops).
    - capacity (``capacity_factor`` not None): ``expert_capacity`` slots per expert; an expert's
      surplus routes are dropped (weight 0: the token passes through the residual only). Priority:
      k=1 with ``rts`` random (DeepSpeed's Random Token Selection: one ``torch.rand(S, E)`` draw per
      call, as ``top1gating`` draws it, so equal RNG states give equal drops); k=1 without ``rts``
      and k=2 token position, all first choices before any second choice (GShard); k>2 the highest
      router probability (``topkgating``'s default ``drop_policy="probs"``).
    - aux loss: N·Σᵢ fᵢ·Pᵢ with Pᵢ the mean router probability and fᵢ the fraction of tokens whose
      first choice is i (k<=2), or of all routes (k>2), before dropping — DeepSpeed's ``l_aux``.
    """
    S, E = logits_SE.shape
    K = top_k
    logits = logits_SE.float()
    probs_SE = F.softmax(logits, dim=-1)
    if K == 1:
        expert_SK = probs_SE.argmax(-1, keepdim=True)
    elif K == 2:
        first_S = probs_SE.argmax(-1)
        second_S = logits.masked_fill(F.one_hot(first_S, E).bool(), float("-inf")).argmax(-1)
        expert_SK = torch.stack([first_S, second_S], dim=1)
    else:
        expert_SK = torch.topk(probs_SE, K, dim=-1).indices
    gate_SK = probs_SE.gather(1, expert_SK)
    rand_SE = torch.rand(S, E, device=logits.device) if K == 1 and rts else None

    expert_R = expert_SK.t().reshape(-1)
    counts_E = torch.bincount(expert_R, minlength=E)
    chosen_E = torch.bincount(expert_SK[:, 0], minlength=E) if K <= 2 else counts_E
    f_E = chosen_E.float() / chosen_E.sum()
    aux_loss = E * torch.sum(probs_SE.mean(0) * f_E)
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()

    if capacity_factor is None:
        order_R, keep_R, capacity, kept_E = _group(expert_R, None), None, None, counts_E
    else:
        capacity = expert_capacity(S, E, K, capacity_factor, min_capacity)
        if rand_SE is not None:
            priority_R = rand_SE.gather(1, expert_SK)[:, 0]
        elif K > 2:
            priority_R = gate_SK.t().reshape(-1)
        else:
            priority_R = None
        grouped_R = _group(expert_R, priority_R)
        start_E = torch.cumsum(counts_E, 0) - counts_E
        rank_R = torch.arange(S * K, device=logits.device) - start_E[expert_R[grouped_R]]
        fits_R = rank_R < capacity
        keep_R = torch.empty_like(fits_R).scatter_(0, grouped_R, fits_R)
        order_R, kept_E = grouped_R[fits_R], counts_E.clamp(max=capacity)

    keep_SK = torch.ones_like(expert_SK, dtype=torch.bool) if keep_R is None else keep_R.view(K, S).t()
    weight_SK = gate_SK * keep_SK
    if K > 1:
        weight_SK = weight_SK / weight_SK.sum(-1, keepdim=True).clamp(min=torch.finfo(weight_SK.dtype).eps)
    return Routing(expert_SK, weight_SK, keep_SK, order_R, kept_E, counts_E, capacity, aux_loss, z_loss)


class TopKRouter(nn.Linear):
    """The router: ``logits_SE = x_SD @ W_ED.T`` in fp32, with Switch's multiplicative jitter
    (input × U(1-ε, 1+ε), training only; drawn as DeepSpeed's ``multiplicative_jitter``)."""

    def __init__(self, dim: int, num_experts: int, jitter: float = 0.0):
        super().__init__(dim, num_experts, bias=False)
        self.jitter = jitter

    def forward(self, x_SD: torch.Tensor) -> torch.Tensor:
        x = x_SD.float()
        if self.training and self.jitter > 0:
            low, high = torch.tensor(1.0 - self.jitter, device=x.device), torch.tensor(1.0 + self.jitter, device=x.device)
            x = x * (low + torch.rand(x.shape, device=x.device) * (high - low))
        return F.linear(x, self.weight.float())


def _option_key(cfg, layer_idx: int, name: str) -> str:
    """``model.config.ffn_options.<name>``, or the ``layer_pattern`` entry that set the options."""
    pattern = getattr(cfg, "layer_pattern", None)
    if pattern:
        i = layer_idx % len(pattern)
        if pattern[i].ffn_options is not None:
            return f"model.config.layer_pattern[{i}].ffn_options.{name}"
    return f"model.config.ffn_options.{name}"


@FFNS.register("moe")
class MoE(nn.Module):
    """Mixture-of-Experts FFN: a ``TopKRouter`` and ``num_experts`` MLP experts, all on this device.

    Switch top-1: ``top_k=1, capacity_factor=1.25``; Mixtral top-2: ``top_k=2`` (no capacity).
    See ``route`` for the routing, capacity, drop priority and aux-loss semantics (DeepSpeed's).

    Dispatch: the kept routes are sorted by expert (``Routing.order_R``), each expert runs once on
    its contiguous group of tokens (a loop over experts, never over tokens; every expert runs, on
    an empty group if need be, so all parameters get gradients as DDP expects), and the weighted
    outputs are summed back per token with ``index_add_`` in fp32.

    Losses: ``pop_aux_losses()`` returns ``{"moe_aux_loss": balance_alpha·N·Σ fᵢ·Pᵢ,
    "moe_z_loss": z_loss_coef·mean(logsumexp(logits)²)}`` of the last forward (terms with a zero
    coefficient are left out); ``LanguageModel`` adds them to the training loss.
    ``last_stats`` holds the last forward's routing statistics (detached): ``load`` [E] (fraction
    of routes per expert, before dropping), ``cv`` (its std/mean), ``dropped`` (fraction of routes
    over capacity), ``aux_loss`` and ``z_loss`` (unscaled) — ``lm.callbacks.moe.ExpertLoad`` logs them.

    DeepSpeed hand-off: the parameters are ``router.weight`` [E, D] and one expert module per
    expert, ``experts.{i}.gate_proj|up_proj|down_proj.weight`` (SwiGLU) or ``experts.{i}.up_proj|
    down_proj.weight`` (GELU) — the layout of ``deepspeed.moe.layer.MoE(hidden_size=D,
    expert=<one expert module>, ...)``, whose names are ``deepspeed_moe.gate.wg.weight`` and
    ``deepspeed_moe.experts.deepspeed_experts.{i}.*`` (``deepspeed_key``).
    ``deepspeed_moe_kwargs()`` gives the constructor arguments that reproduce this layer; with
    ``ep_size=1`` and these weights the two give the same outputs and ``l_aux`` (tested).
    DeepSpeed's jitter ε is fixed at 1e-2, so only ``jitter`` 0 or 1e-2 carries over.

    Options (``ffn_options``): ``num_experts``, ``top_k``, ``capacity_factor`` (None: no dropping),
    ``eval_capacity_factor`` (None: as in training), ``min_capacity``, ``rts`` (top-1 random token
    selection), ``expert`` (swiglu | gelu), ``hidden`` (expert hidden size; default as the dense
    MLP), ``balance_alpha`` (α, default 1e-2), ``z_loss_coef`` (default 1e-3, ST-MoE), ``jitter``,
    ``ep_size`` (expert-parallel ranks; the experts must divide evenly).
    """

    def __init__(self, cfg, layer_idx: int = 0, *, num_experts: int = 8, top_k: int = 2,
                 capacity_factor: Optional[float] = None, eval_capacity_factor: Optional[float] = None,
                 min_capacity: int = 4, rts: bool = True, expert: str = "swiglu", hidden: Optional[int] = None,
                 balance_alpha: float = 1e-2, z_loss_coef: float = 1e-3, jitter: float = 0.0, ep_size: int = 1):
        super().__init__()

        def key(name):
            return _option_key(cfg, layer_idx, name)

        if num_experts < 1:
            raise ValueError(f"{key('num_experts')}: must be at least 1, got {num_experts}")
        if top_k < 1 or top_k > num_experts:
            raise ValueError(f"{key('top_k')}: must be between 1 and num_experts={num_experts}, got {top_k}")
        for name, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if cf is not None and not (cf > 0 and math.isfinite(cf)):
                raise ValueError(f"{key(name)}: must be positive (or null for no capacity limit), got {cf}")
        if eval_capacity_factor is not None and capacity_factor is None:
            raise ValueError(f"{key('eval_capacity_factor')}: set capacity_factor too (training has no capacity limit)")
        if min_capacity < 0:
            raise ValueError(f"{key('min_capacity')}: must be >= 0, got {min_capacity}")
        if expert not in EXPERTS:
            raise ValueError(f"{key('expert')}: unknown expert {expert!r} (known: {', '.join(EXPERTS)})")
        if hidden is not None and hidden <= 0:
            raise ValueError(f"{key('hidden')}: must be positive, got {hidden}")
        for name, v in (("balance_alpha", balance_alpha), ("z_loss_coef", z_loss_coef)):
            if v < 0:
                raise ValueError(f"{key(name)}: must be >= 0, got {v}")
        if not 0 <= jitter < 1:
            raise ValueError(f"{key('jitter')}: must be in [0, 1), got {jitter}")
        if ep_size < 1:
            raise ValueError(f"{key('ep_size')}: must be at least 1, got {ep_size}")
        if num_experts % ep_size:
            raise ValueError(f"{key('ep_size')}: num_experts={num_experts} is not divisible by ep_size={ep_size}")
        self.layer_idx, self.dim = layer_idx, cfg.dim
        self.num_experts, self.top_k, self.min_capacity, self.rts = num_experts, top_k, min_capacity, rts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor is None else eval_capacity_factor
        self.balance_alpha, self.z_loss_coef, self.ep_size, self.expert_kind = balance_alpha, z_loss_coef, ep_size, expert
        self.router = TopKRouter(cfg.dim, num_experts, jitter)
        kw = {"bias": False} if expert == "gelu" else {}
        self.experts = nn.ModuleList(EXPERTS[expert](cfg, layer_idx, hidden=hidden, **kw) for _ in range(num_experts))
        self.hidden = self.experts[0].down_proj.in_features
        self._aux: dict[str, torch.Tensor] = {}
        self.last_stats: Optional[dict[str, torch.Tensor]] = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_SD = x_BTD.reshape(-1, x_BTD.shape[-1])
        S = x_SD.shape[0]
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        r = route(self.router(x_SD), self.top_k, cf, self.min_capacity, self.rts)
        token_R = r.order_R % S
        weight_R = r.weight_SK.t().reshape(-1)[r.order_R]
        groups = x_SD.index_select(0, token_R).split(r.kept_E.tolist())
        y_RD = torch.cat([expert(g) for expert, g in zip(self.experts, groups)])
        out_SD = x_SD.new_zeros(S, x_SD.shape[1], dtype=torch.float32)
        out_SD.index_add_(0, token_R, y_RD.float() * weight_R[:, None])
        self._record(r, S)
        return out_SD.to(x_BTD.dtype).view_as(x_BTD)

    def _record(self, r: Routing, S: int) -> None:
        aux = {}
        if self.balance_alpha:
            aux[AUX_LOSS] = self.balance_alpha * r.aux_loss
        if self.z_loss_coef:
            aux[Z_LOSS] = self.z_loss_coef * r.z_loss
        self._aux = aux
        load_E = r.counts_E.float() / (S * self.top_k)
        self.last_stats = {
            "load": load_E, "cv": load_E.std(unbiased=False) / load_E.mean(),
            "dropped": 1.0 - r.kept_E.sum().float() / (S * self.top_k),
            "aux_loss": r.aux_loss.detach(), "z_loss": r.z_loss.detach(),
        }

    def pop_aux_losses(self) -> dict[str, torch.Tensor]:
        """The scaled aux losses of the last forward, once (``LanguageModel.aux_losses``)."""
        aux, self._aux = self._aux, {}
        return aux

    # -- DeepSpeed hand-off (no deepspeed import here: model code stays single-device) --------
    def deepspeed_moe_kwargs(self) -> dict:
        """Arguments of ``deepspeed.moe.layer.MoE`` (besides ``expert``) that reproduce this layer."""
        if self.router.jitter not in (0.0, 1e-2):
            raise ValueError(f"jitter={self.router.jitter}: DeepSpeed's 'Jitter' policy has a fixed epsilon of 1e-2")
        drop = self.capacity_factor is not None
        return dict(hidden_size=self.dim, num_experts=self.num_experts, ep_size=self.ep_size, k=self.top_k,
                    capacity_factor=self.capacity_factor if drop else 1.0,
                    eval_capacity_factor=self.eval_capacity_factor if drop else 1.0,
                    min_capacity=self.min_capacity, noisy_gate_policy="Jitter" if self.router.jitter else None,
                    drop_tokens=drop, use_rts=self.rts, top2_2nd_expert_sampling=False)

    @staticmethod
    def deepspeed_key(name: str) -> str:
        """Our parameter name (relative to this layer) -> ``deepspeed.moe.layer.MoE``'s (ep_size=1;
        with expert parallelism rank ``p`` holds experts ``p*E/ep .. (p+1)*E/ep - 1`` as local 0..)."""
        if name == "router.weight":
            return "deepspeed_moe.gate.wg.weight"
        if name.startswith("experts."):
            return "deepspeed_moe.experts.deepspeed_experts." + name[len("experts."):]
        raise KeyError(f"no DeepSpeed name for MoE parameter {name!r}")

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, expert={self.expert_kind}, hidden={self.hidden}, "
                f"capacity_factor={self.capacity_factor}, balance_alpha={self.balance_alpha}, "
                f"z_loss_coef={self.z_loss_coef}")
