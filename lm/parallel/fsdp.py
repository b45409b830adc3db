"""Per-block transformations applied from outside the model: activation checkpointing, compile, FSDP2.

None of them changes a parameter's name (no wrapper modules): like FSDP2's composable
``fully_shard``, activation checkpointing and compile give each Block a dynamic subclass whose
``forward`` adds the behaviour. So state dicts, and the checkpoints of every strategy, carry the
names of the plain model, and ``isinstance(block, Block)`` and ``deepcopy`` keep working.

Order (DESIGN.md): TP -> activation checkpointing -> compile -> FSDP2; the compiled region is the
(checkpointed) block forward, FSDP2's all-gather/reduce-scatter hooks run around it.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn


class _Checkpointed:
    """Mixin: the block's forward is recomputed in the backward pass (only while grads are enabled)."""

    def forward(self, *args, **kwargs):
        inner = super().forward
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)


class _Compiled:
    """Mixin: the block's forward runs ``torch.compile``d (compiled once per class and mode)."""

    _lm_compiled_forward = None

    def forward(self, *args, **kwargs):
        return type(self)._lm_compiled_forward(self, *args, **kwargs)


_DYNAMIC: dict[tuple, type] = {}


def _swap_class(module: nn.Module, mixin: type, key: tuple = (), attrs: dict | None = None) -> bool:
    """Gives ``module`` the class ``(mixin, type(module))`` (as FSDP2's ``fully_shard`` does): parameter
    names, ``isinstance`` and ``deepcopy`` are unchanged. False if it already has the mixin.
    ``attrs(cls)`` gives class attributes of the new class (made once per ``(mixin, cls, *key)``)."""
    cls = type(module)
    if issubclass(cls, mixin):
        return False
    k = (mixin, cls, *key)
    if k not in _DYNAMIC:
        _DYNAMIC[k] = type(f"{mixin.__name__.strip('_')}{cls.__name__}", (mixin, cls), attrs(cls) if attrs else {})
    module.__class__ = _DYNAMIC[k]
    return True


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> int:
    """Recompute each block's forward in the backward pass (non-reentrant ``torch.utils.checkpoint``).

    Evaluation and KV-cache decoding (no grad) run the plain forward. Idempotent; returns how many
    blocks were newly wrapped.
    """
    return sum(_swap_class(b, _Checkpointed) for b in blocks)


def apply_compile(blocks: Iterable[nn.Module], mode: Optional[str] = None, backend: str = "inductor") -> int:
    """``torch.compile`` each block's forward (module hooks, e.g. FSDP2's, stay eager). Idempotent;
    one compiled function per block class, mode and backend."""
    def attrs(cls):
        return {"_lm_compiled_forward": torch.compile(cls.forward, mode=mode, backend=backend)}

    return sum(_swap_class(b, _Compiled, key=(mode, backend), attrs=attrs) for b in blocks)


def mixed_precision_policy(precision: str | None):
    """FSDP2's policy for a Lightning precision flag: bf16 parameters for compute with fp32
    gradient reduction when training in bf16 (``bf16-mixed``/``bf16-true``); None (fp32) otherwise."""
    if precision is None or not str(precision).startswith("bf16"):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def is_fully_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], mesh, *, precision: str | None = None,
               reshard_after_forward: bool = True) -> None:
    """``fully_shard`` each block, then the root (embedding, final norm, head, tied weights).

    The last block is not resharded after its forward: its backward comes right away, so gathering
    it again would only cost time (as in torchtitan). Idempotent.
    """
    from torch.distributed.fsdp import fully_shard

    if is_fully_sharded(model):
        return
    kw = {"mesh": mesh}
    policy = mixed_precision_policy(precision)
    if policy is not None:
        kw["mp_policy"] = policy
    for i, block in enumerate(blocks):
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
