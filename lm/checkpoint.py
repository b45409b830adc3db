"""Checkpoint reading: ``weights_only`` loads, architecture checks, ``lm.load_model``.

Pure torch (no Lightning import), so ``lm generate``/``lm export`` start fast; the atomic writer
Lightning uses is ``lm.training.checkpoint_io.AtomicCheckpointIO``.

A Lightning checkpoint of ``LanguageModel`` carries ``checkpoint["lm"] = {"config", "tokenizer"}``
as plain types, so everything here loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lm.errors import CheckpointMismatchError


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a Lightning checkpoint with ``weights_only=True``; clear errors for bad paths.

    ``path`` is a checkpoint file, a run folder or checkpoints folder (its ``last.ckpt``), or a
    sharded checkpoint folder of FSDP2 (DCP) or DeepSpeed (e.g. ``checkpoints/last.ckpt/``), which
    ``lm.parallel.consolidate`` merges into one full ``state_dict`` next to the ``lm`` entry.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "last.ckpt").exists()):
        path = path / "checkpoints" / "last.ckpt" if (path / "checkpoints").is_dir() else path / "last.ckpt"
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {str(path.parent)!r} is a folder without last.ckpt")
    if path.is_dir():  # imports Lightning (and DeepSpeed for its folders): only sharded checkpoints pay it
        from lm.parallel.consolidate import consolidate

        ckpt = consolidate(path)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "lm" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointMismatchError(f"checkpoint {str(path)!r} was not written by lm (no 'lm' entry)")
    return ckpt


def check_compatible(model: torch.nn.Module, state_dict: dict, prefix: str = "") -> None:
    """Raises with the mismatched keys and shapes when a state dict is of another architecture."""
    own = {prefix + k: v for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(k for k in set(state_dict) - set(own) if k.startswith(prefix))
    shapes = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict) if tuple(state_dict[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{name}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}")
        raise CheckpointMismatchError(f"checkpoint does not match the model architecture ({'; '.join(parts)})")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Returns the ``DecoderLM`` of a checkpoint in eval mode; ``model(input_ids)`` gives logits."""
    from lm.models import DecoderConfig, DecoderLM

    ckpt = read_checkpoint(path)
    cfg = DecoderConfig.from_dict(ckpt["lm"]["config"])
    model = DecoderLM(cfg)
    sd = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    check_compatible(model, sd)
    model.load_state_dict(sd)
    model.tokenizer_json = ckpt["lm"].get("tokenizer")
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` stored in a checkpoint."""
    from tokenizers import Tokenizer

    tok = read_checkpoint(path)["lm"].get("tokenizer")
    if tok is None:
        raise CheckpointMismatchError(f"checkpoint {str(path)!r} carries no tokenizer")
    return Tokenizer.from_str(tok)
