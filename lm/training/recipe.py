"""LightningCLI wiring of recipes: run-folder conventions and building a recipe without running it.

Resuming (``lm.launch.preempt``): ``--ckpt_path=auto`` resumes from the newest of ``last.ckpt`` and
the preemption (hpc) checkpoint, or starts fresh when there is none; under SLURM no ``ckpt_path`` means
``auto`` too (Lightning alone would only look for hpc checkpoints). Runs under SLURM (or with
``LM_PREEMPTION=1``, as ``lm launch --local`` sets) get the :class:`~lm.launch.preempt.Preemption`
callback; ``LM_PREEMPTION=0`` turns it off. A W&B logger without an explicit id gets the one kept in
``ROOT/wandb_run_id`` (written by rank 0 on the first run), with ``resume="allow"``, so a requeued
job logs to the same W&B run and its step axis (``trainer/global_step``) continues.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

from pathlib import Path

import torch
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.fabric.plugins.environments.slurm import _is_srun_used
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from lm.callbacks import Throughput
from lm.launch.preempt import Preemption, resolve_resume
from lm.training.checkpoint_io import AtomicCheckpointIO
import lm.parallel  # noqa: F401  (registers the strategy short names)
from lm.training.module import LanguageModel

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


class LMCLI(LightningCLI):
    """LightningCLI plus the run-folder conventions: ``ROOT/checkpoints/last.ckpt`` always kept,
    atomic checkpoint writes, CSV logs under ``ROOT/logs`` unless the recipe names a logger, and
    the throughput/MFU callback."""

    def _instantiate_trainer(self, config, callbacks):
        lm.parallel.check_strategy(config.get("strategy"))  # one line naming trainer.strategy
        root = config.get("default_root_dir") or os.getcwd()
        config["default_root_dir"] = root
        given = list(config.get("callbacks") or []) + list(callbacks)
        ckpts = [c for c in given if isinstance(c, ModelCheckpoint)]
        if not ckpts and config.get("enable_checkpointing", True) is not False:
            callbacks.append(ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), save_last=True))
        for cb in ckpts:
            cb.dirpath = cb.dirpath or os.path.join(root, "checkpoints")
            cb.save_last = True if cb.save_last is None else cb.save_last
        if not any(isinstance(c, Throughput) for c in given):
            callbacks.append(Throughput())
        if config.get("logger") in (None, True):
            config["logger"] = CSVLogger(save_dir=root, name="logs")
        if not config.get("plugins"):
            config["plugins"] = [AtomicCheckpointIO()]
        _keep_wandb_run_id(config.get("logger"), root)
        if _wants_preemption() and not any(isinstance(c, Preemption) for c in given):
            callbacks.append(Preemption())  # appended last: Lightning runs Checkpoint callbacks last, in order
            if _is_srun_used() and not any(isinstance(p, ClusterEnvironment) for p in config["plugins"]):
                # Preemption handles the signals; Lightning's requeue handler would save inside the handler
                config["plugins"] = [*config["plugins"], SLURMEnvironment(auto_requeue=False)]
        return super()._instantiate_trainer(config, callbacks)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        ckpt = kwargs.get("ckpt_path")
        if subcommand == "fit" and (ckpt == "auto" or (ckpt is None and _is_srun_used())):
            kwargs["ckpt_path"] = resolve_resume(self.trainer)
        return kwargs


WANDB_ID_FILE = "wandb_run_id"


def _wants_preemption() -> bool:
    flag = os.environ.get("LM_PREEMPTION")
    if flag is not None:
        return flag not in ("0", "false", "")
    return "SLURM_JOB_ID" in os.environ


def _keep_wandb_run_id(logger, root: str) -> None:
    """Gives every W&B logger without an id the run id stored in ``ROOT/wandb_run_id`` (created by
    rank 0; only rank 0 starts a W&B run), so requeued runs continue the same W&B run."""
    loggers = logger if isinstance(logger, (list, tuple)) else [logger]
    wandb_loggers = [lg for lg in loggers if type(lg).__name__ == "WandbLogger" and not getattr(lg, "_id", None)]
    if not wandb_loggers:
        return
    from lightning.fabric.utilities.rank_zero import _get_rank

    path = Path(root) / WANDB_ID_FILE
    if path.exists():
        run_id = path.read_text().strip()
    elif (_get_rank() or 0) == 0:
        import secrets
        import string

        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    else:
        return
    for lg in wandb_loggers:
        lg._wandb_init.update(id=run_id, resume=lg._wandb_init.get("resume") or "allow")
        lg._id = run_id


def make_cli(args: Sequence[str] | None, run: bool = True, cli_class: type[LMCLI] = LMCLI) -> LMCLI:
    """``cli_class``: an LMCLI subclass (``lm launch`` parses recipes with one that builds no trainer)."""
    return cli_class(
        LanguageModel,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False},  # lm loaders shard by rank themselves
        auto_configure_optimizers=False,
        parser_kwargs={"exit_on_error": False, **{c: {"exit_on_error": False} for c in TRAINER_COMMANDS}},
    )


def run_cli(args: Sequence[str] | None) -> None:
    make_cli(args)


def build_recipe(path: str, overrides: Sequence[str] = (), meta: bool = False) -> LMCLI:
    """Parses and instantiates a recipe (model, data module, trainer) without running it.

    ``meta=True`` builds the model on the meta device, so GPU-size recipes build on a laptop.
    """
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx:
        return make_cli(["-c", path, *overrides], run=False)
