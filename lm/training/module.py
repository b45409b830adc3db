"""The thin LightningModule of decoder LMs: next-token loss, perplexity, optimizer and schedule.

Everything else (throughput, NaN guard, sampling, later EWC/replay/pruning) is a callback; every
distributed concern is applied in ``configure_model`` from ``lm.parallel``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F

from lm.models import DecoderConfig, DecoderLM
from lm.parallel.config import ParallelConfig
from lm.training.optim import OptimConfig, build_optimizer

IGNORE_INDEX = -100


class LanguageModel(L.LightningModule):
    """Trains a ``DecoderLM`` on batches ``{"input_ids": [B,T], "labels": [B,T]}``.

    Labels equal to -100 are ignored (synthetic tasks score only their answer positions).
    """

    def __init__(self, config: DecoderConfig = DecoderConfig(), optim: OptimConfig = OptimConfig(),
                 parallel: ParallelConfig = ParallelConfig()):
        super().__init__()
        self.config = config if isinstance(config, DecoderConfig) else DecoderConfig.from_dict(config)
        self.optim = optim
        self.parallel = parallel if isinstance(parallel, ParallelConfig) else ParallelConfig(**parallel)
        self.model = DecoderLM(self.config)
        self.tokenizer_json: Optional[str] = None  # travels in the checkpoint for generate/export

    # -- data hooks ---------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            if dm.vocab_size > self.config.vocab_size:
                raise ValueError(
                    f"model.config.vocab_size: {self.config.vocab_size} is smaller than the tokenizer's "
                    f"vocabulary ({dm.vocab_size}, data.vocab_size)")
            self.tokenizer_json = tok.to_str()

    def configure_model(self) -> None:
        """Parallelism is applied from outside the model (``lm.parallel``), never in model code."""
        from lm.parallel import parallelize

        parallelize(self)

    def forward(self, input_ids_BT: torch.Tensor, **kw) -> torch.Tensor:
        return self.model(input_ids_BT, **kw)

    def loss(self, batch: dict, with_accuracy: bool = False):
        """Mean next-token cross-entropy over scored positions (labels != -100); optionally
        also the accuracy of the argmax prediction there (the synthetic tasks' metric)."""
        logits_BTV = self.model(batch["input_ids"])
        labels_BT = batch["labels"]
        loss = F.cross_entropy(logits_BTV.flatten(0, 1).float(), labels_BT.flatten(), ignore_index=IGNORE_INDEX)
        if not with_accuracy:
            return loss
        scored = labels_BT != IGNORE_INDEX
        acc = (logits_BTV.argmax(-1)[scored] == labels_BT[scored]).float().mean()
        return loss, acc

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward (e.g. MoE load balance): any submodule with
        ``pop_aux_losses() -> {name: scalar}`` contributes; same names are summed over layers."""
        out: dict[str, torch.Tensor] = {}
        for m in self.model.modules():
            if hasattr(m, "pop_aux_losses"):
                for k, v in m.pop_aux_losses().items():
                    out[k] = out[k] + v if k in out else v
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lm_loss = self.loss(batch)
        aux = self.aux_losses()
        loss = lm_loss + sum(aux.values()) if aux else lm_loss
        for k, v in aux.items():
            self.log(f"train/{k}", v)
        if not torch.isfinite(loss):
            from lm.errors import NonFiniteLossError

            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}; stopping, "
                "the last good checkpoint is kept")
        self.log("train/loss", lm_loss, prog_bar=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate("test", batch, dataloader_idx)

    def _evaluate(self, split: str, batch: dict, dataloader_idx: int) -> None:
        """Logs ``{split}/loss`` and ``{split}/acc``; with several loaders (e.g. evaluation at
        several sequence lengths) the data module's ``val_names[i]`` suffixes the keys."""
        loss, acc = self.loss(batch, with_accuracy=True)
        self.aux_losses()  # discard: evaluation scores the LM loss only
        names = getattr(getattr(self.trainer, "datamodule", None), "val_names", None)
        suffix = f"_{names[dataloader_idx]}" if names else ""
        self.log(f"{split}/loss{suffix}", loss, prog_bar=not suffix, sync_dist=True, add_dataloader_idx=False)
        self.log(f"{split}/acc{suffix}", acc, sync_dist=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/ppl", math.exp(min(float(loss), 30.0)), sync_dist=False)

    def configure_optimizers(self) -> Any:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        opt, sched = build_optimizer(self.model, self.optim, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- checkpoint contents: plain types only, so checkpoints load with weights_only=True ----
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lm"] = {"config": self.config.to_dict(), "tokenizer": self.tokenizer_json, "format": 1}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from lm.checkpoint import check_compatible

        if "state_dict" in checkpoint:  # FSDP2 (DCP) and DeepSpeed load and check the weights themselves
            check_compatible(self.model, checkpoint["state_dict"], prefix="model.")
        self.tokenizer_json = checkpoint.get("lm", {}).get("tokenizer", self.tokenizer_json)
