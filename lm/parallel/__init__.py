"""Everything distributed. Model code never imports this package (DESIGN.md).

``parallelize(module)`` is called from ``LanguageModel.configure_model``; it applies what the
trainer's strategy and the recipe's ``model.init_args.parallel`` (:class:`ParallelConfig`) ask for,
in the order TP -> expert/sequence parallel -> activation checkpointing -> compile -> FSDP2.
Importing this package registers the strategy short names with Lightning (``ddp``, ``fsdp2``,
``deepspeed_stage_1|2|3``; see ``lm.parallel.strategies``). Sharded checkpoints (DCP, DeepSpeed
folders) are turned into one state dict by ``lm.parallel.consolidate``.
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
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None)
    _expert_parallel(model, cfg, strategy)
    if cfg.sequence_parallel_size > 1:  # Ulysses / ring attention (lm.parallel.sequence)
        from lm.parallel.sequence import sequence_parallel

        sequence_parallel(module, cfg, strategy)
    if cfg.activation_checkpointing:
        from lm.parallel.fsdp import apply_activation_checkpointing

        apply_activation_checkpointing(blocks)
    if cfg.compile:
        from lm.parallel.fsdp import apply_compile

        apply_compile(blocks, mode=cfg.compile_mode, backend=cfg.compile_backend)
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


def _expert_parallel(model, cfg: ParallelConfig, strategy) -> None:
    """Swaps in DeepSpeed's expert-parallel MoE (``lm.parallel.moe``) when the recipe asks for it;
    one-line ValueErrors naming the key for what cannot work."""
    from lm.nn.moe import MoE

    key = "model.parallel.expert_parallel_size"
    if any(hasattr(m, "deepspeed_moe") for m in model.modules()):
        return  # swapped already (configure_model runs once per fit/validate/test)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if cfg.expert_parallel_size > 1 and not moes:
        raise ValueError(f"{key}: {cfg.expert_parallel_size} but the model has no MoE layer (ffn: moe)")
    wanted = sorted({m.ep_size for m in moes if m.ep_size > 1} | ({cfg.expert_parallel_size} - {1}))
    if not wanted:
        return
    from lightning.pytorch.strategies import DeepSpeedStrategy as _DS

    if not isinstance(strategy, _DS):
        got = type(strategy).__name__ if strategy is not None else "no trainer"
        raise ValueError(f"{key}: expert parallelism (size {wanted[-1]}) runs under DeepSpeed: set "
                         f"--trainer.strategy=deepspeed_stage_1 or deepspeed_stage_2 (got {got})")
    if strategy.zero_stage_3:
        raise ValueError(f"{key}: DeepSpeed's MoE layer does not support ZeRO stage 3; use "
                         "--trainer.strategy=deepspeed_stage_1 or deepspeed_stage_2")
    world = strategy.num_nodes * strategy.num_processes  # what set_world_ranks gives the cluster
    for ep in wanted:
        if ep > world:
            raise ValueError(f"{key}: {ep} is larger than the world size {world} (trainer.devices x trainer.num_nodes)")
        if world % ep:
            raise ValueError(f"{key}: {ep} does not divide the world size {world}")
    from lm.parallel.moe import apply_expert_parallel

    apply_expert_parallel(model, cfg.expert_parallel_size)


def forward_needs_all_ranks(module) -> bool:
    """True when the model's forward runs collectives (FSDP2 all-gathers, ZeRO-3 parameter
    gathers, expert-parallel all-to-alls), so every rank must call it together -- e.g. to generate
    a sample at the end of fit."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules()) or any(
        hasattr(p, "ds_id") for p in module.parameters()) or any(
        getattr(m, "ep_size", 1) > 1 and hasattr(m, "deepspeed_moe") for m in module.modules())
