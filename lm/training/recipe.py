"""LightningCLI wiring of recipes: run-folder conventions and building a recipe without running it."""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from lm.callbacks import Throughput
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
        return super()._instantiate_trainer(config, callbacks)


def make_cli(args: Sequence[str] | None, run: bool = True) -> LMCLI:
    return LMCLI(
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
