"""Throughput and model FLOPs utilisation (MFU, PaLM appendix B) as a Lightning callback."""
from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 0.5,
                        device: str | torch.device = "cpu") -> float:
    """Achieved FLOP/s of a square matmul on this device: the peak MFU is measured against.

    It runs in ``nn.Linear``'s layout, ``x @ W.T`` (``F.linear``): on CPUs without AMX, oneDNN's
    bf16 kernel for that layout is ~20x faster than for ``a @ b`` with both row-major, so a plain
    ``a @ b`` under-reports the peak a model's linears reach (and gives MFU > 1).
    """
    a = torch.randn(n, n, dtype=dtype, device=device)
    w = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        F.linear(a, w)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        F.linear(a, w)
        iters += 1
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def cached_peak(dtype: torch.dtype, device: torch.device) -> float:
    """Measures the peak once per (device kind, dtype) and keeps it in the lm cache folder."""
    root = Path(os.environ.get("LM_CACHE", Path.home() / ".cache" / "lm"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{os.cpu_count()}"
    key = f"{name}-{str(dtype).split('.')[-1]}-linear"
    path = root / "peak_flops.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    if key not in table:
        table[key] = measure_matmul_peak(dtype, device=device)
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)
    return table[key]


class Throughput(L.Callback):
    """Logs ``perf/tokens_per_s`` (all ranks) and ``perf/mfu`` over a moving window of steps.

    ``peak_flops`` is per device; ``None`` measures a matmul once in the run's precision.
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None, log_every_n_steps: int = 1):
        self.window, self.peak_flops, self.every = window, peak_flops, log_every_n_steps
        self._times: deque = deque(maxlen=window + 1)
        self._tokens: deque = deque(maxlen=window + 1)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.peak_flops is None and stage == "fit":
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            self.peak_flops = cached_peak(dtype, pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._times.append(time.perf_counter())
        self._tokens.append(batch["input_ids"].numel() * trainer.world_size)
        if len(self._times) < 2 or trainer.global_step % self.every:
            return
        dt = self._times[-1] - self._times[0]
        tokens = sum(list(self._tokens)[1:])
        tps = tokens / dt
        seq_len = batch["input_ids"].shape[1]
        flops = pl_module.model.flops_per_token(seq_len) * tps
        metrics = {"perf/tokens_per_s": tps}
        if self.peak_flops:
            metrics["perf/mfu"] = flops / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
