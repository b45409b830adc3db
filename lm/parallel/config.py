"""``model.init_args.parallel`` in a recipe: the per-block switches of ``lm.parallel.parallelize``.

The *strategy* (DDP, FSDP2, ZeRO) is a trainer flag (``--trainer.strategy``); what is applied to
each Block (activation checkpointing, ``torch.compile``, FSDP2 resharding) is configured here, in one
place, so the same recipe runs on one CPU and on many GPU nodes. The switches are numerically
neutral: activation checkpointing recomputes exactly, and the checkpoint format does not depend on
any of them (a run may be resumed with them changed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ParallelConfig:
    """Per-block parallel plan, applied in the order activation checkpointing -> compile -> FSDP2.

    Args:
        activation_checkpointing: recompute each Block's activations in the backward pass
            (``torch.utils.checkpoint``, non-reentrant) instead of storing them.
        compile: ``torch.compile`` each Block's forward (the FSDP2/DeepSpeed hooks stay outside the
            compiled region).
        compile_mode: ``torch.compile(mode=...)``; None is torch's default.
        compile_backend: ``torch.compile(backend=...)``: ``inductor`` (generated kernels), or e.g.
            ``aot_eager`` (graph capture only: quick, for debugging).
        reshard_after_forward: FSDP2 only: free each Block's gathered parameters after its forward
            and gather them again for the backward (ZeRO-3 memory); False keeps them until the
            backward (ZeRO-2 memory, one all-gather less per block).
        expert_parallel_size: DeepSpeed expert parallelism (``lm.parallel.moe``): the ``ffn: moe``
            layers' experts are split over groups of this many ranks (1: every rank holds all
            experts). Needs ``trainer.strategy`` deepspeed_stage_1 or deepspeed_stage_2, and must
            divide the world size and every MoE layer's ``num_experts``. Unlike the switches above it
            changes the checkpoint layout (one DeepSpeed file per expert), so a run resumes with the
            size it was saved with; ``lm export`` / ``lm.load_model`` read any size.
    """

    activation_checkpointing: bool = False
    compile: bool = False
    compile_mode: Optional[str] = None
    compile_backend: str = "inductor"
    reshard_after_forward: bool = True
    expert_parallel_size: int = 1
    # Sequence parallelism (lm.parallel.sequence): p > 1 splits every sequence over groups of p ranks,
    # DeepSpeed-Ulysses all-to-all attention ("ulysses") or ring attention ("ring": PyTorch context
    # parallel, CUDA only). Needs ddp or fsdp2 and p dividing the world size and data.seq_len (ulysses:
    # also num_heads and num_kv_heads). Numerically neutral; checkpoints are the plain model's.
    sequence_parallel_size: int = 1
    sequence_parallel_mode: str = "ulysses"

    def __post_init__(self):
        from lm.parallel.sequence import validate_config

        validate_config(self.sequence_parallel_size, self.sequence_parallel_mode)
        for key in ("activation_checkpointing", "compile", "reshard_after_forward"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"model.parallel.{key}: must be true or false, got {getattr(self, key)!r}")
        ep = self.expert_parallel_size
        if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1:
            raise ValueError(f"model.parallel.expert_parallel_size: must be an integer >= 1, got {ep!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"model.parallel.compile_mode: {self.compile_mode!r} is not one of "
                             f"{', '.join(map(str, COMPILE_MODES))}")

    @classmethod
    def of(cls, module) -> "ParallelConfig":
        """The plan of a LightningModule (its ``parallel`` attribute; dicts are accepted)."""
        cfg = getattr(module, "parallel", None)
        if cfg is None:
            return cls()
        if isinstance(cfg, dict):
            return cls(**cfg)
        return cfg
