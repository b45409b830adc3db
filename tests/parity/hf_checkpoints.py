"""Shared by the HF export parity tests: real Lightning checkpoints, exported once per case."""
from __future__ import annotations

from typing import Callable

import lightning as L
import torch

from lm.models import DecoderConfig
from lm.tools.export import export_hf
from lm.training.module import LanguageModel


def save_lightning_checkpoint(path, cfg: DecoderConfig, tokenizer_json: str | None = None, steps: int = 1) -> str:
    """A checkpoint exactly as training writes it: ``Trainer.fit`` for ``steps`` steps (weights, and
    for MoE the router and experts, moved away from their initialisation), then ``save_checkpoint``."""
    module = LanguageModel(config=cfg)
    module.tokenizer_json = tokenizer_json
    ids = torch.randint(0, cfg.vocab_size, (4, 16))
    loader = torch.utils.data.DataLoader([{"input_ids": i, "labels": i} for i in ids], batch_size=2)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, loader)
    trainer.save_checkpoint(str(path))
    return str(path)


def export_once(tmp_path_factory, config_of: Callable[[str], DecoderConfig], tokenizer_json: str | None = None,
                steps: int = 1) -> Callable[[str], tuple[str, str, str]]:
    """``get(case) -> (ckpt, out_dir, arch)``: the case's checkpoint and HF export, built on first use."""
    done: dict[str, tuple[str, str, str]] = {}

    def get(case: str) -> tuple[str, str, str]:
        if case not in done:
            root = tmp_path_factory.mktemp(case)
            torch.manual_seed(0)
            ckpt = save_lightning_checkpoint(root / "model.ckpt", config_of(case), tokenizer_json, steps)
            out, arch = export_hf(ckpt, str(root / "hf"))
            done[case] = (ckpt, str(out), arch)
        return done[case]

    return get
