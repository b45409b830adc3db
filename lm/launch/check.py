"""Checks a launch against its recipe before anything is submitted.

The recipe is parsed with the job's own arguments (so unknown keys and wrong types fail as ``lm fit``
would), its model and data module are built on the meta device (inconsistent values such as
``dim % num_heads`` fail here, not an hour later in the queue), and the strategy must fit the world
size: a known name; for ``fsdp2`` a tensor-parallel size dividing the world and, with
``--global-batch-size``, a global batch the world divides. The trainer itself is not built: a login
node without GPUs can launch a GPU job.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

from lm.launch.job import Job, LaunchError


@dataclass
class RecipeFacts:
    strategy: str  # short name or class path
    batch_size: Optional[int]  # data.batch_size (per rank) after the overrides, if the data module has one
    tensor_parallel_size: int = 1
    data_parallel_size: Any = "auto"


def _get(ns: Any, key: str, default: Any = None) -> Any:
    try:
        value = ns[key] if not hasattr(ns, "get") else ns.get(key, default)
    except (KeyError, TypeError):
        return default
    return default if value is None else value


def recipe_facts(job: Job, extra: list[str] = ()) -> RecipeFacts:
    """Parses the recipe with the job's arguments and builds its model and data on the meta device."""
    import torch

    from lm.training.recipe import LMCLI, make_cli

    class _Check(LMCLI):
        def instantiate_trainer(self, **kwargs):  # never: the login node may lack the job's devices
            return None

        def _add_configure_optimizers_method_to_model(self, subcommand):
            return None

        def _set_seed(self):  # parsing must not touch the global RNGs (nor print "Seed set")
            return None

    args = job.fit_args()[1:]  # without "fit": parse only, nothing runs
    args = [a for a in args if not a.startswith("--ckpt_path")] + list(extra)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = make_cli(args, run=False, cli_class=_Check)
    cfg = cli.config
    strategy = _get(cfg.trainer, "strategy", "auto")
    tp, dp = 1, "auto"
    if not isinstance(strategy, str):  # class_path form
        init = _get(strategy, "init_args", {}) or {}
        tp, dp = _get(init, "tensor_parallel_size", 1), _get(init, "data_parallel_size", "auto")
        strategy = _get(strategy, "class_path", "?")
    data_init = _get(_get(cfg, "data", {}), "init_args", {})
    batch = _get(data_init, "batch_size", None) if data_init else None
    return RecipeFacts(strategy=str(strategy), batch_size=batch, tensor_parallel_size=tp, data_parallel_size=dp)


def is_fsdp2(strategy: str) -> bool:
    return strategy.lower() == "fsdp2" or strategy.rsplit(".", 1)[-1] in ("FSDP2Strategy", "ModelParallelStrategy")


def check_job(job: Job, global_batch: Optional[int] = None) -> list[str]:
    """Raises ``LaunchError``/``ValueError`` (one line) for a job that cannot work; returns the overrides
    the job adds to the recipe (the per-rank ``--data.batch_size`` of ``--global-batch-size``)."""
    import lm.parallel

    if global_batch is not None and global_batch < 1:
        raise LaunchError(f"--global-batch-size: must be positive, got {global_batch}")
    facts = recipe_facts(job)
    lm.parallel.check_strategy(facts.strategy)  # "trainer.strategy: unknown strategy 'x'; choose one of ..."
    world, shape = job.world_size, f"{job.nodes} nodes x {job.devices_per_node} devices"
    fsdp2 = is_fsdp2(facts.strategy)
    if fsdp2:
        tp = 1 if facts.tensor_parallel_size in (None, "auto") else int(facts.tensor_parallel_size)
        if world % tp:
            raise LaunchError(f"trainer.strategy: fsdp2 with tensor_parallel_size={tp} needs a world size "
                              f"divisible by {tp}, got {world} ({shape})")
        dp = facts.data_parallel_size
        if dp not in (None, "auto") and int(dp) * tp != world:
            raise LaunchError(f"trainer.strategy: fsdp2 data_parallel_size={dp} x tensor_parallel_size={tp} "
                              f"is not the world size {world} ({shape})")
    if global_batch is None:
        return []
    if facts.batch_size is None:
        raise LaunchError("--global-batch-size: the recipe's data module has no batch_size")
    if global_batch % world:
        why = "fsdp2 shards every step's batch evenly over the ranks" if fsdp2 else "every rank takes the same batch"
        raise LaunchError(f"--global-batch-size: {global_batch} is not divisible by the world size {world} "
                          f"({shape}, strategy {facts.strategy}): {why}; use a multiple of {world}")
    return [f"--data.batch_size={global_batch // world}"]
