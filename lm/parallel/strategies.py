"""Strategy short names for ``--trainer.strategy``, the same on CPU (gloo) and GPU (nccl).

* ``ddp``: Lightning's own.
* ``fsdp2``: :class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` with every process in the
  data-parallel dimension (tensor parallel size 1); ``lm.parallel.parallelize`` applies
  ``fully_shard`` per Block and on the root from ``configure_model``. Checkpoints are DCP folders.
* ``deepspeed``, ``deepspeed_stage_1|2|3`` (and Lightning's offload variants): :class:`DeepSpeedStrategy`,
  Lightning's DeepSpeed strategy that also runs on the CPU accelerator (gloo) for tests; on GPUs it
  is Lightning's unchanged. Checkpoints are DeepSpeed folders.

Sharded checkpoints are written into a temporary sibling folder and swapped into place once every
rank has finished, so a run killed mid-save keeps its previous checkpoint (as ``AtomicCheckpointIO``
does for files; this assumes a file system shared by the ranks, as resuming does anyway).
Before loading one, its parameter names and shapes are checked against the model, so a checkpoint
of another architecture fails with the message of ``lm.checkpoint.check_compatible``.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy

#: the names lm documents and tests (any other registered Lightning name is accepted too)
LM_STRATEGIES = ("auto", "ddp", "fsdp2", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3")


def _swap_in(strategy, path: Path, write: Callable[[Path], None]) -> None:
    """Writes a checkpoint folder at ``path`` via ``write(tmp)`` on all ranks, then rank 0 swaps it in."""
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    if strategy.is_global_zero and tmp.exists():
        shutil.rmtree(tmp)
    strategy.barrier("lm_ckpt_tmp")
    write(tmp)
    strategy.barrier("lm_ckpt_written")
    if strategy.is_global_zero:
        if old.exists():
            shutil.rmtree(old)
        if path.is_dir():
            path.rename(old)
        elif path.exists():
            path.unlink()
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    strategy.barrier("lm_ckpt_swapped")


def _remove(strategy, filepath, remove_file: Callable) -> None:
    """Removes an old checkpoint (ModelCheckpoint's top-k): folders on rank 0, files as Lightning does."""
    path = Path(filepath)
    if path.is_dir():
        if strategy.is_global_zero:
            shutil.rmtree(path, ignore_errors=True)
    else:
        remove_file(filepath)


def _check_architecture(module, path: Path) -> None:
    """Raises ``CheckpointMismatchError`` when the sharded checkpoint at ``path`` is of another model."""
    from lm.checkpoint import check_compatible
    from lm.parallel.consolidate import checkpoint_shapes, model_shapes

    model = getattr(module, "model", None)
    if model is None or not path.is_dir():
        return
    saved = {k: torch.empty(s, device="meta") for k, s in checkpoint_shapes(path).items()}
    own = {k: torch.empty(s, device="meta") for k, s in model_shapes(model).items()}

    class _Shapes:  # check_compatible only asks the model for its state dict
        def state_dict(self):
            return own

    try:
        check_compatible(_Shapes(), saved, prefix="model.")
    except ValueError as e:
        hint = _expert_parallel_hint(saved, own)
        if hint:
            raise type(e)(f"{e}; {hint}") from None
        raise


def _expert_parallel_hint(saved: dict, own: dict) -> str:
    """Why an architecture check failed when expert parallelism differs (lm.parallel.moe renames
    the MoE layers and keeps only the local experts), else ''."""
    def experts_per_rank(keys):
        ids = {k.split(".deepspeed_experts.")[1].split(".")[0] for k in keys if ".deepspeed_experts." in k}
        return len(ids)

    a, b = experts_per_rank(saved), experts_per_rank(own)
    if a == b:
        return ""
    if not a:
        return "it was saved without expert parallelism: resume with model.parallel.expert_parallel_size=1"
    return (f"it was saved with expert parallelism ({a} experts per rank and layer, the model has {b or 'all'}): "
            "resume with the model.parallel.expert_parallel_size it was saved with")


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) data parallelism over all processes, with DCP checkpoints.

    ``data_parallel_size="auto"`` is the world size divided by ``tensor_parallel_size`` (default 1),
    so ``--trainer.devices`` and ``--trainer.num_nodes`` alone decide the mesh.
    """

    strategy_name = "fsdp2"

    def __init__(self, data_parallel_size: Any = "auto", tensor_parallel_size: Any = 1,
                 save_distributed_checkpoint: bool = True, **kwargs: Any):
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        tp = 1 if self._tensor_parallel_size == "auto" else int(self._tensor_parallel_size)
        self._tensor_parallel_size = tp
        if self._data_parallel_size == "auto":
            world = self.num_nodes * self.num_processes
            if world % tp:
                raise ValueError(f"trainer.strategy: tensor_parallel_size={tp} does not divide the world size {world}")
            self._data_parallel_size = world // tp
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        if not self._save_distributed_checkpoint or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        _swap_in(self, path, lambda tmp: super(FSDP2Strategy, self).save_checkpoint(checkpoint, tmp))

    def remove_checkpoint(self, filepath) -> None:
        _remove(self, filepath, super().remove_checkpoint)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        _check_architecture(self.lightning_module, path)
        return super().load_checkpoint(path, weights_only)


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy; on the CPU accelerator it also runs (gloo, for tests).

    On CUDA every method is Lightning's. On CPU: no CUDA check or device-index validation, the
    root device is the CPU, and ``deepspeed.initialize`` gets the local rank as its device rank.
    """

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self._on_cpu():
            return super().setup_environment()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if not self._on_cpu():
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        if self._on_cpu():
            return torch.device("cpu")
        return super().root_device

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if optimizer is not None and any(hasattr(m, "deepspeed_moe") for m in model.modules()):
            from lm.parallel.moe import split_moe_param_groups

            split_moe_param_groups(optimizer, lr_scheduler)  # ZeRO needs the experts in their own groups
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, ds_optimizer

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        _swap_in(self, path, lambda tmp: super(DeepSpeedStrategy, self).save_checkpoint(checkpoint, tmp))

    def remove_checkpoint(self, filepath) -> None:
        _remove(self, filepath, super().remove_checkpoint)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict:
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            _check_architecture(self.lightning_module, path)
        return super().load_checkpoint(path, weights_only)


def register_strategies() -> None:
    """Registers ``fsdp2`` and puts :class:`DeepSpeedStrategy` behind every Lightning DeepSpeed name
    (with the same arguments, e.g. ``stage=2``). Idempotent."""
    for name, entry in list(StrategyRegistry.items()):
        if entry["strategy"] is _LightningDeepSpeedStrategy:
            StrategyRegistry.register(name, DeepSpeedStrategy, description=entry["description"], override=True,
                                      **entry["init_params"])
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, override=True,
        description="FSDP2 fully_shard per block (Lightning ModelParallelStrategy), DCP checkpoints", save_distributed_checkpoint=True, tensor_parallel_size=1)


def check_strategy(strategy: Any) -> None:
    """``ValueError`` naming ``trainer.strategy`` for a strategy name nobody registered."""
    if not isinstance(strategy, str) or strategy.lower() == "auto" or strategy.lower() in StrategyRegistry:
        return
    others = sorted(set(StrategyRegistry) - set(LM_STRATEGIES))
    raise ValueError(f"trainer.strategy: unknown strategy {strategy!r}; choose one of {', '.join(LM_STRATEGIES)} "
                     f"(also accepted: {', '.join(others)})")
