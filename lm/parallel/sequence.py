"""Sequence parallelism: DeepSpeed-Ulysses all-to-all attention (ring attention on GPU: ``ring.py``).

Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
Sequence Transformer Models" (arXiv:2309.14509). Each rank of a sequence-parallel (SP) group holds
T/p tokens of the same sequences; around the attention core an all-to-all trades the sequence
split for a head split ([B, T/p, H, D] -> [B, T, H/p, D]), the attention runs on the full sequence
for H/p heads -- so causal (and sliding-window) masks are exact -- and a second all-to-all trades
back. Everything outside attention is per-token and runs on the local T/p tokens unchanged.

Applied from outside the model (DESIGN.md), all by class swapping (no wrapper modules, state dicts
keep the plain model's names), when ``model.parallel.sequence_parallel_size`` is p > 1:

* groups: ranks ``[g*p, (g+1)*p)`` form SP group g (contiguous, so a group stays inside a node);
  the groups are data parallel, gradients are averaged over the whole world as in plain DDP.
* data: the strategy's ``distributed_sampler_kwargs`` report the data-parallel shard
  (``global_rank // p`` of ``world // p``), so the data modules' samplers and Lightning's
  evaluation samplers give every rank of a group the same batch.
* loss (``LanguageModel.loss``): rank r keeps tokens ``[r*T/p, (r+1)*T/p)`` of input_ids and
  labels and runs ``model(ids, sequence_parallel=plan)`` (the plan reaches the mixers as forward
  context, so activation checkpointing's recomputation sees it too). The loss is the token sum on
  the rank times ``p / N_group`` (scored tokens of the whole sequence): DDP's mean over the world
  then gives exactly the single-process gradient, whatever the ranks' shares of scored tokens.
  Its value (logged, NaN-checked) is the group's mean loss.
* attention mixers: ``forward`` offsets ``start_pos`` by the rank's first token (RoPE, absolute
  positions); ``attend`` runs the mixer's own single-device ``attend`` inside DeepSpeed's
  ``DistributedAttention`` with the full sequence's positions.

Legend: B batch, T full sequence, L = T/p tokens on this rank, H query heads, K kv heads, D head dim,
V vocabulary, M model dim.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

KEY = "model.parallel.sequence_parallel_size"
MODE_KEY = "model.parallel.sequence_parallel_mode"
MODES = ("ulysses", "ring")
IGNORE_INDEX = -100  # = lm.training.module.IGNORE_INDEX (not imported: no Lightning at import time)


def validate_config(size, mode) -> None:
    """One-line errors for the two recipe keys (called from ``ParallelConfig``)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{KEY}: must be an integer >= 1, got {size!r}")
    if mode not in MODES:
        raise ValueError(f"{MODE_KEY}: {mode!r} is not one of {', '.join(MODES)}")


@dataclass(eq=False)
class SequenceParallelPlan:
    """This rank's place in its SP group, handed explicitly to the mixers (never a global)."""

    size: int
    rank: int  # inside the SP group
    group: Any  # torch.distributed ProcessGroup of the SP group
    mode: str = "ulysses"
    mesh: Any = None  # ring: the SP DeviceMesh
    _step: ExitStack = field(default_factory=ExitStack, repr=False)

    def __deepcopy__(self, memo):  # process groups cannot be copied: a copied model shares them
        return self

    def local(self, x_BT: torch.Tensor) -> torch.Tensor:
        """Tokens ``[rank*L, (rank+1)*L)`` of every row."""
        T = x_BT.shape[1]
        if T % self.size:
            raise ValueError(f"data.seq_len: {T} is not divisible by {KEY}={self.size}")
        L = T // self.size
        return x_BT[:, self.rank * L:(self.rank + 1) * L]

    def begin_step(self, ids_BT: torch.Tensor, labels_BT: torch.Tensor):
        """This rank's shard of the batch; ring mode also enters PyTorch's context-parallel region,
        which stays open until :meth:`end_step` (after the backward: its SDPA backward is ring too)."""
        self.end_step()
        if self.mode == "ring":
            from lm.parallel.ring import enter_ring

            if ids_BT.shape[1] % self.size:
                self.local(ids_BT)  # raises the data.seq_len error
            return enter_ring(self._step, self.mesh, ids_BT, labels_BT)
        return self.local(ids_BT), self.local(labels_BT)

    def end_step(self) -> None:
        self._step.close()


# -- which mixers can run sequence-parallel ----------------------------------------------------

def _owner(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO that defines ``name`` (skipping lm.parallel's mixins)."""
    return next(c for c in cls.__mro__ if name in c.__dict__ and not c.__module__.startswith("lm.parallel"))


def supports_sequence_parallel(mixer) -> bool:
    """Softmax attention whose ``forward`` is ``Attention``'s (or only shifts positions before it) and
    whose ``attend`` is ``Attention``'s: its masks come from ``allowed(q_pos, k_pos)``, the same for
    every head, so any head subset on the full sequence is exact. Variants with their own kernels
    or per-head layouts (block-sparse, linear), and recurrent mixers (Mamba, RWKV, Hyena), are not."""
    from lm.mixers.attention import Attention
    from lm.mixers.attention_variants import AttentionAbsolute

    if not isinstance(mixer, Attention):
        return False
    cls = type(mixer)
    return _owner(cls, "forward") in (Attention, AttentionAbsolute) and _owner(cls, "attend") is Attention


def check_sequence_parallel(model, size: int, world_size: int, seq_len: Optional[int] = None,
                            mode: str = "ulysses") -> None:
    """One-line ValueErrors naming the key, before any process group is made."""
    validate_config(size, mode)
    if world_size % size:
        raise ValueError(f"{KEY}: {size} does not divide the world size {world_size} "
                         "(trainer.devices x trainer.num_nodes)")
    for i, block in enumerate(model.blocks):
        mixer = block.mixer
        if not supports_sequence_parallel(mixer):
            name = model.cfg.layer(i).mixer if hasattr(model, "cfg") else type(mixer).__name__
            raise ValueError(f"model.config.layer[{i}].mixer: {name!r} cannot run sequence-parallel ({KEY}="
                             f"{size}); it needs softmax attention (attention, sliding_window, "
                             "attention_nope, attention_abs)")
        if mode == "ulysses":  # the all-to-all splits heads; ring attention splits only the sequence
            if mixer.num_heads % size:
                raise ValueError(f"model.config.num_heads: {mixer.num_heads} is not divisible by {KEY}={size} "
                                 "(Ulysses splits the heads over the group)")
            if mixer.num_kv_heads % size:
                raise ValueError(f"model.config.num_kv_heads: {mixer.num_kv_heads} is not divisible by {KEY}="
                                 f"{size} (Ulysses splits the key/value heads over the group)")
    if seq_len is not None and seq_len % size:
        raise ValueError(f"data.seq_len: {seq_len} is not divisible by {KEY}={size}")
    if mode == "ring" and seq_len is not None:  # the ring kernels take no mask but the causal one
        for i, block in enumerate(model.blocks):
            if not block.mixer.plain_causal(seq_len):
                raise ValueError(f"model.config.layer[{i}].mixer: masks more than causal attention at data.seq_len="
                                 f"{seq_len} (e.g. a shorter window), which {MODE_KEY}=ring cannot run: use ulysses")


# -- the class-swap mixins ----------------------------------------------------------------------

class _SequenceParallelAttention:
    """Mixin of an attention mixer: with ``sequence_parallel=plan`` in the forward context (and no
    decode cache) its input is this rank's L tokens; without it, the plain single-device mixer."""

    _lm_sp_plan = None

    def forward(self, x_BLM, *, cache=None, start_pos: int = 0, sequence_parallel=None, **ctx):
        if sequence_parallel is None or cache is not None:
            return super().forward(x_BLM, cache=cache, start_pos=start_pos, **ctx)
        self._lm_sp_plan = sequence_parallel  # read by attend during this call only
        try:
            return super().forward(x_BLM, start_pos=start_pos + sequence_parallel.rank * x_BLM.shape[1], **ctx)
        finally:
            self._lm_sp_plan = None

    def attend(self, q_BHLD, k_BKLD, v_BKLD, q_pos_L, k_pos_L, full_causal: bool):
        plan = self._lm_sp_plan
        if plan is None:
            return super().attend(q_BHLD, k_BKLD, v_BKLD, q_pos_L, k_pos_L, full_causal)
        if plan.mode == "ring":
            from lm.parallel.ring import ring_attend

            return ring_attend(self, plan, q_BHLD, k_BKLD, v_BKLD)
        return ulysses_attend(super().attend, self.plain_causal, plan, q_BHLD, k_BKLD, v_BKLD, q_pos_L)


def ulysses_attend(inner, plain_causal, plan: SequenceParallelPlan, q_BHLD, k_BKLD, v_BKLD, q_pos_L):
    """``inner`` (a single-device ``attend``) on the gathered sequence for H/p heads, between the two
    all-to-alls of ``DistributedAttention``. The gathered sequence starts at ``q_pos_L[0] - rank*L``;
    query t sees keys 0..t exactly as in one process."""
    from deepspeed.sequence.layer import DistributedAttention

    L = q_BHLD.shape[2]
    T = L * plan.size
    pos_T = torch.arange(T, device=q_BHLD.device) + (q_pos_L[0] - plan.rank * L)
    causal = plain_causal(T)

    def local_attention(q_BTHD, k_BTKD, v_BTKD):  # H/p query and K/p kv heads of the whole sequence
        out_BHTD = inner(q_BTHD.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2), pos_T, pos_T, causal)
        return out_BHTD.transpose(1, 2)

    attention = DistributedAttention(local_attention, plan.group, scatter_idx=2, gather_idx=1)
    out_BLHD = attention(q_BHLD.transpose(1, 2), k_BKLD.transpose(1, 2), v_BKLD.transpose(1, 2), 0)
    return out_BLHD.transpose(1, 2)


class _SequenceParallelLoss:
    """Mixin of the LanguageModel: its loss runs on this rank's tokens (see the module docstring)."""

    _lm_sequence_parallel: SequenceParallelPlan

    def loss(self, batch: dict, with_accuracy: bool = False):
        return sequence_parallel_loss(self, batch, with_accuracy)

    def backward(self, loss, *args, **kwargs):
        try:
            super().backward(loss, *args, **kwargs)
        finally:
            self._lm_sequence_parallel.end_step()  # ring: the context-parallel region ends here


def sequence_parallel_loss(module, batch: dict, with_accuracy: bool = False):
    """Next-token cross-entropy over scored positions with the gradient of the single-process mean:
    ``sum_rank(CE) * p / N_group``; the returned value is the group's mean (and accuracy)."""
    import torch.distributed as dist

    plan: SequenceParallelPlan = module._lm_sequence_parallel
    labels_BT = batch["labels"]
    n_group = (labels_BT != IGNORE_INDEX).sum()  # every rank of the group has the whole batch
    ids_BL, labels_BL = plan.begin_step(batch["input_ids"], labels_BT)
    try:
        logits_BLV = module.model(ids_BL, sequence_parallel=plan)
        sum_local = F.cross_entropy(logits_BLV.flatten(0, 1).float(), labels_BL.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="sum")
    finally:
        if not (torch.is_grad_enabled() and module.training):  # no backward follows
            plan.end_step()
    scaled = sum_local * (plan.size / n_group)
    stats = [sum_local.detach()]
    if with_accuracy:
        scored = labels_BL != IGNORE_INDEX
        stats.append((logits_BLV.argmax(-1)[scored] == labels_BL[scored]).sum().to(sum_local.dtype))
    stats = torch.stack(stats)
    dist.all_reduce(stats, group=plan.group)
    stats = stats / n_group
    loss = scaled + (stats[0] - scaled.detach())  # value: the group's mean; gradient: the scaled sum's
    return (loss, stats[1]) if with_accuracy else loss


def _data_parallel_sampler_kwargs(self):
    """The strategy's sampler shard over SP groups, not over ranks (all ranks of a group: one shard)."""
    kw = dict(super(type(self), self).distributed_sampler_kwargs)
    p = self._lm_sequence_parallel_size
    return {**kw, "num_replicas": kw["num_replicas"] // p, "rank": kw["rank"] // p}


_STRATEGY_CLASSES: dict[type, type] = {}


def _swap_strategy_class(strategy, size: int) -> None:
    """A direct subclass with the property above (a mixin base in front of Lightning's ABC-derived
    strategies cannot be assigned to ``__class__``: "object layout differs")."""
    cls = type(strategy)
    if cls in _STRATEGY_CLASSES.values():
        return
    if cls not in _STRATEGY_CLASSES:
        _STRATEGY_CLASSES[cls] = type(f"SequenceParallel{cls.__name__}", (cls,),
                                      {"distributed_sampler_kwargs": property(_data_parallel_sampler_kwargs)})
    strategy._lm_sequence_parallel_size = size
    strategy.__class__ = _STRATEGY_CLASSES[cls]


# -- applying it -------------------------------------------------------------------------------

def make_plan(size: int, mode: str = "ulysses") -> SequenceParallelPlan:
    """Makes every SP group (a collective: all ranks call it, in the same order) and this rank's plan."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if mode == "ring":
        from lm.parallel.ring import ring_mesh

        mesh = ring_mesh(world, size)
        return SequenceParallelPlan(size, mesh.get_local_rank(), mesh.get_group(), mode, mesh)
    import deepspeed

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # deepspeed.comm reuses torch's group
    mine = None
    for g in range(world // size):
        group = dist.new_group(list(range(g * size, (g + 1) * size)))
        if g == rank // size:
            mine = group
    return SequenceParallelPlan(size, rank % size, mine, mode)


def apply_sequence_parallel(module, plan: SequenceParallelPlan, strategy=None) -> None:
    """Swaps the mixins into the attention mixers, the LanguageModel and (if given) the strategy."""
    from lm.parallel.fsdp import _swap_class

    for block in module.model.blocks:
        _swap_class(block.mixer, _SequenceParallelAttention)
    module._lm_sequence_parallel = plan
    _swap_class(module, _SequenceParallelLoss)
    if strategy is not None:
        _swap_strategy_class(strategy, plan.size)


def sequence_parallel(module, cfg, strategy) -> None:
    """``parallelize``'s step: checks, groups, swaps. Idempotent (configure_model may run again)."""
    size, mode = cfg.sequence_parallel_size, cfg.sequence_parallel_mode
    if size == 1 or module.__dict__.get("_lm_sequence_parallel") is not None:
        return
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

    world = getattr(strategy, "world_size", 1)
    if not isinstance(strategy, (DDPStrategy, ModelParallelStrategy)) or isinstance(strategy, DeepSpeedStrategy):
        got = type(strategy).__name__ if strategy is not None else "no trainer"
        raise ValueError(f"{KEY}: {size} needs trainer.strategy=ddp or fsdp2 over {size}+ processes "
                         f"(got {got}, world size {world})")
    from lm.training.module import LanguageModel

    if _owner(type(module), "loss") is not LanguageModel:  # the swap replaces exactly this loss
        raise ValueError(f"{KEY}: {type(module).__name__} has its own loss; sequence parallelism splits "
                         "LanguageModel's next-token loss only")
    seq_len = getattr(getattr(getattr(module, "_trainer", None), "datamodule", None), "seq_len", None)
    check_sequence_parallel(module.model, size, world, seq_len if isinstance(seq_len, int) else None, mode)
    if mode == "ring":
        from lm.parallel.ring import check_ring_device

        check_ring_device(strategy.root_device)
    apply_sequence_parallel(module, make_plan(size, mode), strategy)
