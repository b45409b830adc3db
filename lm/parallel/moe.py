"""Expert parallelism: lm's MoE layers become DeepSpeed expert-parallel MoE layers (DeepSpeed-MoE,
Rajbhandari et al. 2022), from outside the model.

``model.parallel.expert_parallel_size: P`` (or a layer's ``ffn_options.ep_size``) under a DeepSpeed
strategy makes ``lm.parallel.parallelize`` call :func:`apply_expert_parallel`, which replaces every
``lm.nn.moe.MoE`` by an :class:`ExpertParallelMoE` -- a ``deepspeed.moe.layer.MoE`` whose rank ``p``
(in its expert-parallel group) holds global experts ``p*E/P .. (p+1)*E/P - 1``.

What is DeepSpeed's and what is ours:

- DeepSpeed's: the layer class (so the engine finds it: expert process groups, the expert
  gradient reduction over the expert-data-parallel group, one checkpoint file per expert), its
  ``Experts`` container and the dispatch -> all-to-all -> experts -> all-to-all -> combine of
  ``MOELayer``.
- Ours: the gate. ``RouteGate`` sits in ``MOELayer.gate`` and calls ``lm.nn.moe.route`` -- the very
  function of the local path -- and hands DeepSpeed the sparse routes it expects (expert index per
  route, -1 if dropped; slot in the expert's buffer; combine weight). DeepSpeed's own gates agree
  with ``route`` for k<=2 (tests/unit/test_moe.py) but not everywhere: top-1 without RTS drops an
  implementation-defined subset (``torch.topk`` over ties; we keep the earliest tokens), k>2 needs
  ``topkgating``'s drop policy, its jitter has a fixed epsilon of 1e-2, and it has no z-loss or
  drop statistics. With our gate the local and expert-parallel routings are one code path, so
  they cannot drift apart; ``ep_size=1`` gives the local layer's outputs, losses and gradients.

Capacity is per rank, as in DeepSpeed and GShard: ``expert_capacity`` of the rank's own tokens, and
drops are decided among the rank's own tokens -- the same as the local layer under data
parallelism with that per-rank batch. The buffer exchanged by the all-to-all has, per expert, the
maximum over the expert-parallel group of that capacity (no capacity: of the kept routes), so ranks
with unequal batches still exchange equal shapes.

Weights: the swap *moves* the local layer's weights in -- the router becomes ``gate.wg`` and local
expert ``j`` of rank ``p`` is the model's global expert ``p*E/P + j`` (after a broadcast from rank 0,
so every rank slices the same set). Each expert therefore keeps the initialisation its global index
gave it in the single-device model (distinct per expert, independent of ``P`` and of the rank),
rather than DeepSpeed's deep copies of one template. Parameter names become DeepSpeed's
(``deepspeed_moe.gate.wg.weight``, ``deepspeed_moe.experts.deepspeed_experts.{local}.*``);
``lm.parallel.consolidate`` maps a checkpoint back to the single-device names and global indices.

Legend: S tokens on this rank, E experts (global), K top_k, C slots per expert in the buffer.
"""
from __future__ import annotations

from typing import Optional

import torch
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.sharded_moe import TopKGate

from lm.nn.moe import MoE, route


class RouteGate(TopKGate):
    """``MOELayer.gate`` computed by ``lm.nn.moe.route`` with lm's router (``wg`` is the local
    layer's ``TopKRouter``, jitter included). Returns the sparse-route tuple of DeepSpeed 0.19's
    ``MOELayer.forward``: ``(l_aux, C, E, indices_KS, locations_KS, gates_KS, exp_counts_E)``."""

    def __init__(self, local: MoE):
        super().__init__(local.dim, local.num_experts, k=local.top_k,
                         capacity_factor=local.capacity_factor or 1.0,
                         eval_capacity_factor=local.eval_capacity_factor or 1.0,
                         min_capacity=local.min_capacity, drop_tokens=local.capacity_factor is not None,
                         use_rts=local.rts, top2_2nd_expert_sampling=False)
        self.wg = local.router  # an nn.Linear: DeepSpeed's name ``gate.wg.weight`` stays
        self.capacity_factor, self.eval_capacity_factor = local.capacity_factor, local.eval_capacity_factor
        self.routing = None  # the last forward's ``Routing`` (for the aux/z losses and statistics)

    def _set_ep_group(self, ep_group):  # the engine sets it again after apply_expert_parallel did
        if self.ep_group is not None and self.ep_group is not ep_group:
            raise RuntimeError("RouteGate: a different expert-parallel group was already set")
        self.ep_group = ep_group

    def forward(self, input_SD: torch.Tensor, used_token=None, sparse_routes: bool = False, use_tutel: bool = False):
        if not sparse_routes or use_tutel or used_token is not None:
            raise RuntimeError("RouteGate serves DeepSpeed's sparse-route MOELayer only (no tutel, no used_token)")
        S, E, K = input_SD.shape[0], self.wg.out_features, self.k
        r = route(self.wg(input_SD), K, self.capacity_factor if self.training else self.eval_capacity_factor,
                  self.min_capacity, self.use_rts)
        self.routing = r
        expert_R = r.expert_SK.t().reshape(-1)  # choice-major, as order_R indexes
        start_E = torch.cumsum(r.kept_E, 0) - r.kept_E
        slot_R = torch.zeros_like(expert_R)
        slot_R[r.order_R] = torch.arange(r.order_R.numel(), device=expert_R.device) - start_E[expert_R[r.order_R]]
        keep_R = r.keep_SK.t().reshape(-1)
        indices_KS = torch.where(keep_R, expert_R, torch.full_like(expert_R, -1)).view(K, S).int()
        C = torch.as_tensor(r.capacity if r.capacity is not None else int(r.kept_E.max()), device=input_SD.device)
        if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
            torch.distributed.all_reduce(C, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
        C = max(int(C), 1)
        return r.aux_loss, C, E, indices_KS, slot_R.view(K, S).int(), r.weight_SK.t().contiguous(), r.counts_E


class ExpertParallelMoE(DeepSpeedMoE):
    """``deepspeed.moe.layer.MoE`` built from an ``lm.nn.moe.MoE``, with that layer's interface:
    ``forward(x_BTD) -> y_BTD``, ``pop_aux_losses()`` and ``last_stats`` (of this rank's tokens).

    ``ep_rank`` is this rank's index in its expert-parallel group (which global experts it holds).
    """

    # the same loss and statistics bookkeeping as the local layer (one implementation)
    _record = MoE._record
    pop_aux_losses = MoE.pop_aux_losses

    def __init__(self, local: MoE, ep_size: int, ep_rank: int = 0):
        if local.num_experts % ep_size:
            raise ValueError(f"expert_parallel_size={ep_size} does not divide num_experts={local.num_experts} "
                             f"(layer {local.layer_idx})")
        super().__init__(hidden_size=local.dim, expert=local.experts[0], num_experts=local.num_experts,
                         ep_size=ep_size, k=local.top_k, min_capacity=local.min_capacity,
                         drop_tokens=local.capacity_factor is not None, use_rts=local.rts,
                         top2_2nd_expert_sampling=False)
        self.deepspeed_moe.gate = RouteGate(local)
        self.ep_rank = ep_rank
        first = ep_rank * self.num_local_experts
        with torch.no_grad():
            for j, expert in enumerate(self.deepspeed_moe.experts.deepspeed_experts):
                for p, src in zip(expert.parameters(), local.experts[first + j].parameters()):
                    p.copy_(src)  # in place: keeps DeepSpeed's allreduce=False / group_name tags
        self.layer_idx, self.dim, self.top_k = local.layer_idx, local.dim, local.top_k
        self.balance_alpha, self.z_loss_coef, self.expert_kind = local.balance_alpha, local.z_loss_coef, local.expert_kind
        self._aux: dict[str, torch.Tensor] = {}
        self.last_stats: Optional[dict[str, torch.Tensor]] = None

    @property
    def router(self):
        return self.deepspeed_moe.gate.wg

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        y_BTD = self.deepspeed_moe(x_BTD, None).view_as(x_BTD)
        self._record(self.deepspeed_moe.gate.routing, x_BTD.numel() // x_BTD.shape[-1])
        return y_BTD

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"local_experts={self.num_local_experts}, top_k={self.top_k}")


def _ep_sizes(model: torch.nn.Module, expert_parallel_size: int) -> dict[str, int]:
    """``{module name: ep size}`` of the MoE layers to swap: a layer's own ``ffn_options.ep_size``
    when it is > 1, else ``model.parallel.expert_parallel_size``; ValueError naming the key."""
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, MoE):
            continue
        if m.ep_size > 1 and expert_parallel_size > 1 and m.ep_size != expert_parallel_size:
            raise ValueError(f"model.parallel.expert_parallel_size: {expert_parallel_size} contradicts layer "
                             f"{m.layer_idx}'s ffn_options.ep_size={m.ep_size} (set one of them)")
        ep = m.ep_size if m.ep_size > 1 else expert_parallel_size
        if m.num_experts % ep:
            raise ValueError(f"model.parallel.expert_parallel_size: num_experts={m.num_experts} (layer "
                             f"{m.layer_idx}) is not divisible by {ep}")
        if ep > 1:
            out[name] = ep
    return out


def expert_parallel_sizes(model: torch.nn.Module, expert_parallel_size: int) -> set[int]:
    """The expert-parallel sizes the model's MoE layers ask for (empty: no expert parallelism)."""
    return set(_ep_sizes(model, expert_parallel_size).values())


def apply_expert_parallel(model: torch.nn.Module, expert_parallel_size: int) -> list[ExpertParallelMoE]:
    """Swaps the MoE layers that ask for expert parallelism for :class:`ExpertParallelMoE`, in place.

    Needs ``torch.distributed`` and ``deepspeed.comm`` initialised (the DeepSpeed strategy has done
    both by ``configure_model``). Creates DeepSpeed's expert and expert-data-parallel groups
    (``set_deepspeed_parallelism``, DeepSpeed's registry, which its engine reads) and hands each
    layer its group. Idempotent: swapped layers are no longer ``lm.nn.moe.MoE``.
    """
    import torch.distributed as dist

    sizes = _ep_sizes(model, expert_parallel_size)
    swapped = []
    for name, ep in sizes.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        local = getattr(parent, attr)
        if dist.is_initialized():
            with torch.no_grad():  # every rank slices the same global experts: rank 0's
                for p in local.experts.parameters():
                    dist.broadcast(p.data, src=0)
        from deepspeed.utils import groups

        group_name = f"ep_size_{ep}"  # DeepSpeed's naming (MoE.expert_group_name)
        if group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(ep)
        layer = ExpertParallelMoE(local, ep, groups._get_expert_parallel_rank(group_name))
        layer.set_deepspeed_parallelism()  # finds the groups and hands the layer its own
        setattr(parent, attr, layer.to(next(local.parameters()).device))
        swapped.append(layer)
    return swapped


def has_expert_parallel(module: torch.nn.Module) -> bool:
    """True when the forward runs expert all-to-alls (every rank must call it together)."""
    return any(isinstance(m, ExpertParallelMoE) and m.ep_size > 1 for m in module.modules())


def split_moe_param_groups(optimizer: torch.optim.Optimizer, lr_scheduler=None) -> None:
    """Splits ``optimizer``'s param groups into non-expert and expert groups
    (``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``), as DeepSpeed's
    ZeRO optimizer requires of a model with MoE layers, in place; a ``LambdaLR``-like scheduler built
    on the optimizer gets the new groups' lambdas and base lrs (those of the group each came from).
    No-op when the groups are split already or no parameter is an expert parameter."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    groups = optimizer.param_groups
    if any(g.get("moe") for g in groups) or not any(is_moe_param(p) for g in groups for p in g["params"]):
        return
    for i, g in enumerate(groups):
        g.setdefault("name", f"lm_group{i}")
        g["lm_origin"] = i  # copied into the expert groups split off it
    new = [g for g in split_params_into_different_moe_groups_for_optimizer(list(groups)) if g["params"]]
    optimizer.param_groups = new
    if lr_scheduler is not None:
        for attr in ("lr_lambdas", "base_lrs"):
            values = getattr(lr_scheduler, attr, None)
            if isinstance(values, list) and len(values) == len(groups):
                setattr(lr_scheduler, attr, [values[g["lm_origin"]] for g in new])
        if hasattr(lr_scheduler, "_last_lr"):
            lr_scheduler._last_lr = [g["lr"] for g in new]
