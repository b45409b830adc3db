"""The ``lm`` command: LightningCLI for ``fit|validate|test|predict``, plus tool subcommands.

``lm fit -c recipes/quickstart.yaml --trainer.max_steps=50`` goes to LightningCLI (so
``--print_config`` and dotted overrides come from jsonargparse); ``lm generate|export|bench``
dispatch to ``lm.tools``. User errors print one line (set ``LM_TRACEBACK=1`` for the traceback).
"""
from __future__ import annotations

import importlib
import os
import sys

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
TOOL_COMMANDS = {
    "generate": ("lm.tools.generate", "sample text from a checkpoint with the KV cache"),
    "export": ("lm.tools.export", "export a checkpoint (e.g. --to hf for transformers)"),
    "bench": ("lm.bench", "benchmarks: train, decode (ratios measured side by side)"),
}

USAGE = "usage: lm {fit,validate,test,predict} -c RECIPE [--key=value ...] | lm {generate,export,bench} ..."


def _lightning_cli(argv: list[str]) -> None:
    from lightning.pytorch import LightningDataModule
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import CSVLogger

    from lm.callbacks import Throughput
    from lm.checkpoint import AtomicCheckpointIO
    from lm.training.module import LanguageModel

    class LMCLI(LightningCLI):
        """Adds the run-folder conventions: ``ROOT/checkpoints/last.ckpt`` always kept, atomic
        checkpoint writes, CSV logs under ``ROOT/logs`` unless the recipe names a logger, and the
        throughput/MFU callback."""

        def _instantiate_trainer(self, config, callbacks):
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

    LMCLI(
        LanguageModel,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if argv == sys.argv[1:] else argv,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False},  # lm loaders shard by rank themselves
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        for name, (_, doc) in TOOL_COMMANDS.items():
            print(f"  lm {name:9s} {doc}")
        return 0
    cmd = argv[0]
    from lm.errors import LMError

    try:
        if cmd in TRAINER_COMMANDS:
            _lightning_cli(argv)
            return 0
        if cmd in TOOL_COMMANDS:
            return int(importlib.import_module(TOOL_COMMANDS[cmd][0]).main(argv[1:]) or 0)
        print(f"lm: error: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
        return 2
    except (LMError, ValueError, FileNotFoundError) as e:
        if os.environ.get("LM_TRACEBACK"):
            raise
        print(f"lm: error: {_root_message(e)}", file=sys.stderr)
        return 2


def _root_message(e: BaseException) -> str:
    """The innermost user-facing message (jsonargparse and Lightning wrap ours)."""
    from lm.errors import LMError

    while e.__cause__ is not None and isinstance(e.__cause__, (LMError, ValueError, FileNotFoundError)):
        e = e.__cause__
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
