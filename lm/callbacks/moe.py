"""``ExpertLoad``: per-layer MoE routing statistics in the logger, and a heatmap of expert load.

Every ``lm.nn.moe.MoE`` layer keeps the routing statistics of its last forward (``last_stats``).
After each training step this callback logs, per MoE layer ``i``:

- ``moe/layer{i}/load_e{j}``: fraction of the layer's routes sent to expert j (before dropping);
- ``moe/layer{i}/cv``: coefficient of variation (std/mean) of that load — 0 is uniform,
  sqrt(E-1) is every token on one expert;
- ``moe/layer{i}/dropped``: fraction of routes over capacity (those tokens skip the layer);
- ``moe/layer{i}/aux_loss``, ``moe/layer{i}/z_loss``: the unscaled load-balance and z losses;

and the means over layers ``moe/cv``, ``moe/dropped``, ``moe/max_load``. When ``fit`` ends, rank 0
writes ``expert_load.png`` (one heatmap per layer: expert × step, colour = load) and
``expert_load.csv`` (step, layer, load of every expert) to ``trainer.default_root_dir``.

Under expert parallelism (``lm.parallel.moe.ExpertParallelMoE``, same ``last_stats``) and any
data parallelism the statistics are those of rank 0's tokens (no collective per step), the load
still over all E experts.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning as L
import torch

from lm.nn.moe import MoE


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    """The local MoE layers and the expert-parallel ones that replaced them (same interface)."""
    return [m for m in model.modules() if isinstance(m, MoE) or (hasattr(m, "deepspeed_moe") and hasattr(m, "last_stats"))]


class ExpertLoad(L.Callback):
    """Logs the MoE routing statistics every ``every_n_steps`` training steps and accumulates the
    load of every expert of every layer for the end-of-fit heatmap ``filename``."""

    def __init__(self, every_n_steps: int = 1, filename: str = "expert_load.png", per_expert: bool = True):
        if every_n_steps < 1:
            raise ValueError(f"ExpertLoad.every_n_steps: must be >= 1, got {every_n_steps}")
        self.every, self.filename, self.per_expert = every_n_steps, filename, per_expert
        self.steps: list[int] = []
        self.history: dict[int, list[list[float]]] = {}  # layer -> per recorded step, load of each expert
        self.last_metrics: dict[str, float] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.steps, self.history = [], {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (step - 1) % self.every:
            return
        layers = [m for m in moe_layers(pl_module.model) if m.last_stats is not None]
        if not layers:
            return
        metrics: dict[str, float] = {}
        cvs, drops, maxes = [], [], []
        for m in layers:
            s = {k: v.detach().float().cpu() for k, v in m.last_stats.items()}
            load = s["load"].tolist()
            p = f"moe/layer{m.layer_idx}/"
            if self.per_expert:
                metrics.update({f"{p}load_e{j}": v for j, v in enumerate(load)})
            for name in ("cv", "dropped", "aux_loss", "z_loss"):
                metrics[p + name] = float(s[name])
            cvs.append(float(s["cv"]))
            drops.append(float(s["dropped"]))
            maxes.append(max(load))
            self.history.setdefault(m.layer_idx, []).append(load)
        self.steps.append(step)
        n = len(layers)
        metrics.update({"moe/cv": sum(cvs) / n, "moe/dropped": sum(drops) / n, "moe/max_load": sum(maxes) / n})
        self.last_metrics = metrics
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.steps:
            return
        root = Path(trainer.default_root_dir or os.getcwd())
        root.mkdir(parents=True, exist_ok=True)
        self.write_csv(root / (Path(self.filename).stem + ".csv"))
        self.write_heatmap(root / self.filename)

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            num_experts = max(len(h[0]) for h in self.history.values())
            w.writerow(["step", "layer", *(f"e{j}" for j in range(num_experts))])
            for layer, rows in sorted(self.history.items()):
                for step, load in zip(self.steps, rows):
                    w.writerow([step, layer, *(f"{v:.5f}" for v in load)])

    def write_heatmap(self, path: Path) -> None:
        import numpy as np
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        layers = sorted(self.history)
        fig = Figure(figsize=(10, 1.2 + 1.4 * len(layers)))
        axes = fig.subplots(len(layers), 1, squeeze=False)
        vmax = max(max(max(r) for r in self.history[i]) for i in layers)
        for ax, i in zip(axes[:, 0], layers):
            load_ES = np.asarray(self.history[i]).T
            steps = self.steps[: load_ES.shape[1]]
            im = ax.imshow(load_ES, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax,
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, load_ES.shape[0] - 0.5, -0.5))
            ax.set_ylabel(f"layer {i}\nexpert")
            fig.colorbar(im, ax=ax, pad=0.01, label="load")
        axes[-1, 0].set_xlabel("training step")
        axes[0, 0].set_title("MoE expert load (fraction of routed tokens per expert)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
