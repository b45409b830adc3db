"""``lm bench train``: framework overhead of an ``lm fit`` step, and MFU in fp32 and bf16.

``train.framework_vs_plain`` is tokens/s of a real ``lightning.Trainer`` fitting the framework's
``LanguageModel`` (Throughput callback on and CSV logger as ``lm fit`` adds them, progress bar and
checkpointing off) over tokens/s of a minimal PyTorch loop on the same ``DecoderConfig``, the same
synthetic batches (random ids, fixed seed, an in-memory list of ``{"input_ids", "labels"}``), the
same AdamW + schedule (``build_optimizer``), fp32, and gradient clipping at 1.0 in both. Each run
times steps ``warmup .. warmup+steps`` only, as the period between consecutive step starts (a
callback's ``on_train_batch_start`` for the Trainer), so data fetch, logging and callbacks count;
a run's step time is the median period on CPU (other jobs' bursts on a shared machine drop out)
and the window's mean on CUDA (synchronised at its ends only). The two runs alternate (plain, fw,
fw, plain, ...) and the median of the per-pair ratios is kept; ``train.framework_overhead_ms`` is
the median per-pair difference of step times.

``train.mfu_{fp32,bf16}`` = ``model.flops_per_token(seq_len)`` x tokens/s of the plain loop (fp32,
or bf16 autocast) / the matmul peak measured in this run for that dtype (``measure_matmul_peak``,
the best of a measurement before and one after the runs). Where the measured bf16 peak is under a
quarter of the fp32 one (CPUs without AMX/AVX512-bf16, where bf16 matmul is emulated), the bf16 run
uses a reduced batch and fewer steps; ``train.bf16_vs_fp32`` compares both dtypes at that shape.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm.bench.common import (
    clock, device_name, fmt, interleave, median, median_ratio, resolve_device, step_period, table,
)
from lm.models import DecoderConfig, DecoderLM
from lm.training.optim import OptimConfig, build_optimizer

# recipes/quickstart.yaml: model, optimizer and trainer settings the step is measured at
QUICKSTART = dict(vocab_size=4096, dim=256, num_layers=4, num_heads=8, num_kv_heads=2, max_seq_len=256,
                  tie_embeddings=True)
QUICKSTART_OPTIM = dict(lr=2.0e-3, warmup_steps=30, weight_decay=0.1)
TINY = dict(vocab_size=256, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32, tie_embeddings=True)
CLIP = 1.0
LOG_EVERY = 10  # the quickstart recipe's trainer.log_every_n_steps
SEED = 1234


@dataclass
class Plan:
    config: dict
    batch: int
    seq_len: int
    warmup: int
    steps: int
    repeats: int
    peak_n: int  # matmul size of the peak measurement
    peak_s: float


def plan(quick: bool, device: torch.device, repeats: int | None) -> Plan:
    if quick:
        return Plan(TINY, 4, 32, 1, 2, repeats or 1, 128, 0.05)
    if device.type == "cuda":  # steps of a few ms: more of them for a stable period
        return Plan(QUICKSTART, 16, 256, 10, 50, repeats or 3, 4096, 1.0)
    return Plan(QUICKSTART, 16, 256, 2, 6, repeats or 3, 1024, 0.5)


def make_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int = SEED) -> list[dict]:
    """Random token streams; labels are the next token, as the packed text loader gives."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, batch, seq_len + 1), generator=g)
    return [{"input_ids": x[:, :-1].clone(), "labels": x[:, 1:].clone()} for x in ids]


# -- the plain loop ----------------------------------------------------------------------------
def plain_run(cfg: DecoderConfig, optim: OptimConfig, batches: list[dict], warmup: int, steps: int,
              device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Minimal PyTorch training loop; returns tokens/s over steps ``warmup..warmup+steps``."""
    torch.manual_seed(SEED)
    model = DecoderLM(cfg).to(device).train()
    opt, sched = build_optimizer(model, optim, warmup + steps + 1)
    amp = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    params = list(model.parameters())
    stamps = []
    for i, batch in enumerate(batches[: warmup + steps]):
        if i >= warmup:
            stamps.append(clock(device) if i == warmup else time.perf_counter())
        ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with amp:
            logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        sched.step()
    stamps.append(clock(device))
    period = step_period(stamps, device)
    return {"tps": batches[0]["input_ids"].numel() / period, "step_s": period, "loss": float(loss.detach())}


# -- the framework: a real Trainer fitting LanguageModel ----------------------------------------
class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _step_clock(warmup: int, steps: int, device: torch.device):
    import lightning as L

    class StepClock(L.Callback):
        """Timestamps the start of steps ``warmup .. warmup + steps`` (synchronised at both ends);
        keeps the last timed step's loss."""

        def __init__(self):
            self.stamps: list[float] = []
            self.loss = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if warmup <= batch_idx <= warmup + steps:
                ends = batch_idx in (warmup, warmup + steps)
                self.stamps.append(clock(device) if ends else time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == warmup + steps - 1:
                self.loss = outputs["loss"].detach()

    return StepClock()


def framework_run(cfg: DecoderConfig, optim: OptimConfig, batches: list[dict], warmup: int, steps: int,
                  device: torch.device, peak_flops: float | None) -> dict:
    """``lm fit``'s step: Trainer + LanguageModel + Throughput + CSVLogger, fp32, clip 1.0."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from lm.callbacks import Throughput
    from lm.training.module import LanguageModel

    torch.manual_seed(SEED)
    module = LanguageModel(config=cfg, optim=optim)
    timer = _step_clock(warmup, steps, device)
    with tempfile.TemporaryDirectory(prefix="lm-bench-") as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=[device.index or 0] if device.type == "cuda" else 1,
            precision="32-true", max_steps=warmup + steps + 1, gradient_clip_val=CLIP,
            logger=CSVLogger(save_dir=root, name="logs"), log_every_n_steps=LOG_EVERY,
            callbacks=[Throughput(peak_flops=peak_flops), timer], default_root_dir=root,
            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False)
        loader = torch.utils.data.DataLoader(_Batches(batches), batch_size=None, shuffle=False)
        trainer.fit(module, train_dataloaders=loader)
    period = step_period(timer.stamps, device)
    return {"tps": batches[0]["input_ids"].numel() / period, "step_s": period, "loss": float(timer.loss)}


@contextlib.contextmanager
def _quiet_lightning():
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, lvl in old.items():
            logging.getLogger(n).setLevel(lvl)


def _peak(dtype, p: Plan, device) -> float:
    from lm.callbacks.throughput import measure_matmul_peak

    return measure_matmul_peak(dtype, n=p.peak_n, seconds=p.peak_s, device=device)


def run(quick: bool = False, device: str = "auto", repeats: int | None = None, out=print) -> dict:
    dev = resolve_device(device)
    p = plan(quick, dev, repeats)
    cfg = DecoderConfig(**p.config)
    optim = OptimConfig(**QUICKSTART_OPTIM)
    fpt = DecoderLM(cfg).flops_per_token(p.seq_len)
    out(f"[lm bench train] device {device_name(dev)}; model dim={cfg.dim} layers={cfg.num_layers} "
        f"heads={cfg.num_heads}/{cfg.kv_heads} vocab={cfg.vocab_size}; batch {p.batch}x{p.seq_len}; "
        f"{p.warmup} warmup + {p.steps} timed steps, {p.repeats} interleaved pair(s)")

    peak32 = _peak(torch.float32, p, dev)
    peak16 = _peak(torch.bfloat16, p, dev)

    # -- framework vs plain, fp32, interleaved pairs --------------------------------------------
    batches = make_batches(p.warmup + p.steps + 1, p.batch, p.seq_len, cfg.vocab_size)
    with _quiet_lightning():
        runs = interleave({
            "plain": lambda: plain_run(cfg, optim, batches, p.warmup, p.steps, dev),
            "framework": lambda: framework_run(cfg, optim, batches, p.warmup, p.steps, dev, peak32),
        }, p.repeats)
    plain_tps = [r["tps"] for r in runs["plain"]]
    overhead_ms = 1e3 * median(f["step_s"] - q["step_s"] for f, q in zip(runs["framework"], runs["plain"]))
    fw_tps = [r["tps"] for r in runs["framework"]]
    loss_gap = abs(runs["plain"][-1]["loss"] - runs["framework"][-1]["loss"])

    # -- bf16 autocast (plain loop) -------------------------------------------------------------
    slow_bf16 = peak16 < peak32 / 4
    if quick:
        b_batch, b_seq, b_warm, b_steps, b_rep = p.batch, p.seq_len, 1, 1, 1
    elif slow_bf16:  # no bf16 units (AVX2-only CPUs: ~1/6 of fp32 speed): a reduced batch, seconds
        b_batch, b_seq, b_warm, b_steps, b_rep = 4, p.seq_len, 1, 3, 1
    else:
        b_batch, b_seq, b_warm, b_steps, b_rep = p.batch, p.seq_len, p.warmup, p.steps, p.repeats
    b_batches = make_batches(b_warm + b_steps, b_batch, b_seq, cfg.vocab_size, seed=SEED + 1)
    bruns = interleave({
        "fp32": lambda: plain_run(cfg, optim, b_batches, b_warm, b_steps, dev, torch.float32),
        "bf16": lambda: plain_run(cfg, optim, b_batches, b_warm, b_steps, dev, torch.bfloat16),
    }, b_rep)
    bf16_tps = median(r["tps"] for r in bruns["bf16"])
    fp32_small_tps = median(r["tps"] for r in bruns["fp32"])
    fpt_b = DecoderLM(cfg).flops_per_token(b_seq)

    peak32 = max(peak32, _peak(torch.float32, p, dev))
    peak16 = max(peak16, _peak(torch.bfloat16, p, dev))

    res = {
        "train.framework_vs_plain": median_ratio(fw_tps, plain_tps),
        "train.tokens_per_s_plain": median(plain_tps),
        "train.tokens_per_s_framework": median(fw_tps),
        "train.tokens_per_s_fp32": median(plain_tps),
        "train.tokens_per_s_bf16": bf16_tps,
        "train.bf16_vs_fp32": median_ratio([r["tps"] for r in bruns["bf16"]], [r["tps"] for r in bruns["fp32"]]),
        "train.framework_overhead_ms": overhead_ms,
        "train.flops_per_token": fpt,
        "train.peak_flops_fp32": peak32,
        "train.peak_flops_bf16": peak16,
        "train.mfu_fp32": fpt * median(plain_tps) / peak32,
        "train.mfu_bf16": fpt_b * bf16_tps / peak16,
        "train.batch": float(p.batch),
        "train.seq_len": float(p.seq_len),
        "train.bf16_batch": float(b_batch),
        "train.bf16_seq_len": float(b_seq),
    }
    rows = [["plain fp32", f"{p.batch}x{p.seq_len}", median(plain_tps), " ".join(fmt(x) for x in plain_tps)],
            ["framework fp32", f"{p.batch}x{p.seq_len}", median(fw_tps), " ".join(fmt(x) for x in fw_tps)],
            ["plain fp32", f"{b_batch}x{b_seq}", fp32_small_tps, " ".join(fmt(r["tps"]) for r in bruns["fp32"])],
            ["plain bf16 autocast", f"{b_batch}x{b_seq}", bf16_tps, " ".join(fmt(r["tps"]) for r in bruns["bf16"])]]
    out(table("train: tokens/s (median; per-run values)", ["run", "batch", "tokens/s", "runs"], rows))
    out(table("train: figures", ["figure", "value"], [
        ["framework_vs_plain (median of pair ratios; target >= 0.95)", res["train.framework_vs_plain"]],
        ["framework step - plain step, ms (median of pairs)", overhead_ms],
        ["peak matmul fp32 FLOP/s", peak32], ["peak matmul bf16 FLOP/s", peak16],
        ["MFU fp32 (plain loop)", res["train.mfu_fp32"]], ["MFU bf16 (plain loop)", res["train.mfu_bf16"]],
        ["bf16 / fp32 tokens/s (same shape)", res["train.bf16_vs_fp32"]],
        ["last-step loss |plain - framework|", loss_gap]]))
    if loss_gap > 1e-3 * max(1.0, abs(runs["plain"][-1]["loss"])):
        out(f"[lm bench train] warning: plain and framework losses differ by {loss_gap:.3g}: "
            "the two loops may not do the same work")
    return res
