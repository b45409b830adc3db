"""End-of-fit report: validation loss/perplexity and a generated sample, printed on rank 0."""
from __future__ import annotations

import math

import lightning as L
import torch


class FitReport(L.Callback):
    """Prints ``val/loss``, ``val/ppl`` and a sample from the trained model when ``fit`` ends."""

    def __init__(self, prompt: str = "The ", max_new_tokens: int = 48, temperature: float = 0.8,
                 top_k: int = 40, seed: int = 0):
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed

    def on_fit_end(self, trainer, pl_module) -> None:
        from lm.parallel import forward_needs_all_ranks

        collective = forward_needs_all_ranks(pl_module)  # FSDP2 / ZeRO-3: every rank runs the forward
        if not trainer.is_global_zero and not collective:
            return
        if trainer.is_global_zero:
            loss = trainer.callback_metrics.get("val/loss")
            if loss is None:
                print("[lm] no validation loss was computed (limit_val_batches=0?)")
            else:
                print(f"[lm] val/loss {float(loss):.4f}  val/ppl {math.exp(min(float(loss), 30)):.2f}")
        dm = trainer.datamodule
        tok = getattr(dm, "tokenizer", None)
        if tok is None or not hasattr(pl_module.model, "init_cache"):
            return
        from lm.tools.generate import generate_text

        was_training = pl_module.training
        pl_module.eval()
        with torch.autocast(pl_module.device.type, enabled=False):
            text = generate_text(pl_module.model, tok, self.prompt, eos_id=getattr(dm, "eos_id", None),
                                 max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                 top_k=self.top_k, seed=self.seed)
        pl_module.train(was_training)
        if trainer.is_global_zero:
            print(f"[lm] sample: {text!r}")
