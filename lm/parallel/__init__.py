"""Everything distributed. Model code never imports this package (DESIGN.md).

``parallelize(module)`` is called from ``LanguageModel.configure_model``; it applies what the
trainer's strategy and the recipe's ``model.init_args.parallel`` (:class:`ParallelConfig`) ask for,
in the order TP -> activation checkpointing -> compile -> FSDP2. Importing this package registers
the strategy short names with Lightning (``ddp``, ``fsdp2``, ``deepspeed_stage_1|2|3``; see
``lm.parallel.strategies``). Sharded checkpoints (DCP, DeepSpeed folders) are turned into one
state dict by ``lm.parallel.consolidate``.
"""
from __future__ import annotations

from lm.parallel.config import ParallelConfig
from lm.parallel.strategies import (
    LM_STRATEGIES,
    DeepSpeedStrategy,
    FSDP2Strategy,
    check_strategy,
    register_strategies,
)

__all__ = ["ParallelConfig", "parallelize", "forward_needs_all_ranks", "FSDP2Strategy", "DeepSpeedStrategy",
           "check_strategy", "LM_STRATEGIES"]

register_strategies()


def _blocks(model) -> list:
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"lm.parallel: {type(model).__name__} has no `blocks` to parallelize")
    return list(blocks)


def parallelize(module) -> None:
    """Applies the parallel plan to ``module.model`` in place; idempotent (Lightning may call
    ``configure_model`` once per fit/validate/test in a process).

    ``module`` is a LightningModule with a ``model`` (blocks in ``model.blocks``) and optionally a
    ``parallel`` :class:`ParallelConfig`; without a trainer (or on one device) only the per-block
    switches apply.
    """
    cfg = ParallelConfig.of(module)
    model = module.model
    blocks = _blocks(model)
    if cfg.activation_checkpointing:
        from lm.parallel.fsdp import apply_activation_checkpointing

        apply_activation_checkpointing(blocks)
    if cfg.compile:
        from lm.parallel.fsdp import apply_compile

        apply_compile(blocks, mode=cfg.compile_mode, backend=cfg.compile_backend)
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    from lightning.pytorch.strategies import ModelParallelStrategy

    if isinstance(strategy, ModelParallelStrategy):  # FSDP2Strategy, or Lightning's class given as an object
        from lm.parallel.fsdp import apply_fsdp

        mesh = module.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError("trainer.strategy: tensor parallelism is not implemented for lm models yet "
                             "(use tensor_parallel_size=1)")
        dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
        apply_fsdp(model, blocks, dp_mesh, precision=str(trainer.precision),
                   reshard_after_forward=cfg.reshard_after_forward)


def forward_needs_all_ranks(module) -> bool:
    """True when the model's forward runs collectives (FSDP2 all-gathers, ZeRO-3 parameter
    gathers), so every rank must call it together -- e.g. to generate a sample at the end of fit."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        hasattr(p, "ds_id") for p in module.parameters())
