"""``lm bench moe``: tokens/s of top-1 and top-2 MoE (8 experts) against the dense model of equal
*active* parameters, single process.

Four decoders share everything but the FFN: ``dense1`` (SwiGLU of hidden F), ``top1`` (8 SwiGLU
experts of hidden F, top-1), ``dense2`` (SwiGLU of hidden 2F) and ``top2`` (8 experts of hidden F,
top-2): each token meets the same FFN weights count in a dense model and its MoE twin. The MoE
layers run without a capacity limit (no dropped tokens, so no work is skipped) and with their
aux and z losses in the loss. A run times training steps (forward, backward, AdamW) of a plain
PyTorch loop on fixed random batches; the step time is the median period of the timed steps. The
four runs alternate (ABCD, DCBA, ...) ``repeats`` times and each figure is the median of the
per-round ratios, so the machine's load drifts out:

- ``moe.top1_vs_dense_active``, ``moe.top2_vs_dense_active``: training tokens/s of the MoE over
  its dense twin (1.0: routing and dispatch are free; target >= 0.6 for top-2);
- ``moe.top{1,2}_vs_dense_active_fwd``: the same for a forward pass alone (no_grad, eval);
- ``moe.tokens_per_s.{dense1,top1,dense2,top2}``, ``moe.params.*`` (total) and
  ``moe.active_params.*`` (per token), non-embedding;
- ``moe.ep2_vs_local``: on 2 processes (a ``torchrun`` child, gloo on CPU), training tokens/s of
  the top-2 model with its experts split over the 2 ranks (``lm.parallel.moe``, DeepSpeed's MoE
  layer and all-to-all) over the same model with all experts on each rank, both under the same
  ZeRO-1 DeepSpeed engine and per-rank batch; ``moe.ep2.tokens_per_s.{local,ep2}`` (global).
  On 2 CPU cores the experts' compute does not shrink (each rank still runs all its tokens'
  expert work, now for other ranks' tokens too), so this measures the all-to-all overhead.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lm.bench.common import clock, device_name, fmt, interleave, median, median_ratio, resolve_device, table
from lm.models import DecoderConfig, DecoderLM
from lm.nn.moe import MoE
from lm.training.optim import OptimConfig, build_optimizer

FULL = dict(vocab_size=4096, dim=256, num_layers=4, num_heads=8, num_kv_heads=2, max_seq_len=256, tie_embeddings=True)
TINY = dict(vocab_size=128, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=32, tie_embeddings=True)
SEED = 1234
VARIANTS = ("dense1", "top1", "dense2", "top2")


def configs(base: dict, hidden: int, num_experts: int = 8) -> dict[str, DecoderConfig]:
    moe = dict(num_experts=num_experts, hidden=hidden, capacity_factor=None)
    return {
        "dense1": DecoderConfig(**base, ffn="swiglu", ffn_options={"hidden": hidden}),
        "top1": DecoderConfig(**base, ffn="moe", ffn_options={**moe, "top_k": 1}),
        "dense2": DecoderConfig(**base, ffn="swiglu", ffn_options={"hidden": 2 * hidden}),
        "top2": DecoderConfig(**base, ffn="moe", ffn_options={**moe, "top_k": 2}),
    }


def param_counts(model: DecoderLM) -> tuple[int, int]:
    """(total, active per token) non-embedding parameters."""
    total = active = 0
    for name, p in model.named_parameters():
        if name.startswith("embed.") or name.startswith("head."):
            continue
        total += p.numel()
        active += p.numel()
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p.numel() for p in m.experts[0].parameters())
            active -= (m.num_experts - m.top_k) * per_expert
    return total, active


def _batches(n: int, batch: int, seq_len: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=g) for _ in range(n)]


def train_run(cfg: DecoderConfig, batches, warmup: int, steps: int, device: torch.device) -> float:
    """Training tokens/s of a plain loop (LM loss + the MoE aux losses) over the timed steps."""
    torch.manual_seed(SEED)
    model = DecoderLM(cfg).to(device).train()
    opt, _ = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0), warmup + steps + 1)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    stamps = []
    for i, ids in enumerate(batches[: warmup + steps]):
        if i >= warmup:
            stamps.append(clock(device) if i == warmup else time.perf_counter())
        ids = ids.to(device)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        for m in moes:
            loss = loss + sum(m.pop_aux_losses().values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    stamps.append(clock(device))
    return batches[0][:, :-1].numel() / _period(stamps, device)


def forward_run(cfg: DecoderConfig, batches, warmup: int, steps: int, device: torch.device) -> float:
    torch.manual_seed(SEED)
    model = DecoderLM(cfg).to(device).eval()
    stamps = []
    with torch.no_grad():
        for i, ids in enumerate(batches[: warmup + steps]):
            if i >= warmup:
                stamps.append(clock(device) if i == warmup else time.perf_counter())
            model(ids[:, :-1].to(device))
    stamps.append(clock(device))
    return batches[0][:, :-1].numel() / _period(stamps, device)


def _period(stamps: list[float], device: torch.device) -> float:
    if device.type == "cuda":
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return median(b - a for a, b in zip(stamps, stamps[1:]))


def _sizes(quick: bool, dev: torch.device, repeats: int | None):
    if quick:
        return TINY, 32, 2, 32, 1, 2, repeats or 1
    if dev.type == "cuda":
        return FULL, 512, 16, 256, 5, 20, repeats or 3
    return FULL, 512, 4, 256, 1, 4, repeats or 5


class _LossModel(torch.nn.Module):
    """LM loss + the MoE aux losses, as one module (what the DeepSpeed engine wraps)."""

    def __init__(self, model: DecoderLM):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        for m in self.model.modules():
            if hasattr(m, "pop_aux_losses"):
                loss = loss + sum(m.pop_aux_losses().values())
        return loss


def _ep_train_run(cfg: DecoderConfig, ep: int, batches, warmup: int, steps: int) -> float:
    """Global training tokens/s of ``cfg`` under a ZeRO-1 DeepSpeed engine, experts split over
    ``ep`` ranks (1: all experts on every rank). Runs on every rank of the process group."""
    import deepspeed
    import torch.distributed as dist

    from lm.parallel.moe import apply_expert_parallel, split_moe_param_groups

    torch.manual_seed(SEED)
    model = DecoderLM(cfg)
    if ep > 1:
        apply_expert_parallel(model, ep)
    opt, _ = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=0), warmup + steps + 1)
    split_moe_param_groups(opt)
    engine, *_ = deepspeed.initialize(model=_LossModel(model), optimizer=opt, dist_init_required=False, config={
        "train_micro_batch_size_per_gpu": batches[0].shape[0], "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0, "steps_per_print": 10**9})
    stamps = []
    rank = dist.get_rank()
    for i, ids in enumerate(batches[: warmup + steps]):
        if i == warmup:
            dist.barrier()
        if i >= warmup:
            stamps.append(time.perf_counter())
        loss = engine(ids.roll(rank, 0))  # each rank its own rows
        engine.backward(loss)
        engine.step()
    dist.barrier()
    stamps.append(time.perf_counter())
    period = torch.tensor(_period(stamps, torch.device("cpu")))
    dist.all_reduce(period, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank's does
    return dist.get_world_size() * batches[0][:, :-1].numel() / float(period)


def _ep_worker(out_path: str, quick: bool, repeats: int | None) -> None:
    """The ``torchrun`` child of ``ep_compare``: local vs ep=2, interleaved; rank 0 writes JSON."""
    import deepspeed
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    deepspeed.init_distributed("gloo")
    base, hidden, batch, seq, warmup, steps, reps = _sizes(quick, torch.device("cpu"), repeats)
    cfg = configs(base, hidden)["top2"]
    batches = _batches(warmup + steps, batch, seq, base["vocab_size"])
    res = interleave({"local": lambda: _ep_train_run(cfg, 1, batches, warmup, steps),
                      "ep2": lambda: _ep_train_run(cfg, 2, batches, warmup, steps)}, reps)
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(res))


def ep_compare(quick: bool, repeats: int | None, threads: int | None = None) -> dict[str, list[float]]:
    """Runs ``_ep_worker`` on 2 processes (``torchrun --standalone``); ``{"local": [...], "ep2": [...]}``."""
    with tempfile.TemporaryDirectory(prefix="lm_bench_moe_") as tmp:
        out = Path(tmp) / "ep.json"
        env = dict(os.environ, TMPDIR=tmp, DS_ACCELERATOR="cpu",
                   OMP_NUM_THREADS=str(threads or os.environ.get("OMP_NUM_THREADS") or 1))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "lm.bench.moe", "--ep-worker", str(out), *(["--quick"] if quick else []),
               *([f"--repeats={repeats}"] if repeats else [])]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"lm bench moe: the 2-process run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def run(quick: bool = False, device: str = "auto", repeats: int | None = None, out=print, ep: bool = True) -> dict:
    dev = resolve_device(device)
    base, hidden, batch, seq, warmup, steps, reps = _sizes(quick, dev, repeats)
    cfgs = configs(base, hidden)
    counts = {n: param_counts(DecoderLM(c)) for n, c in cfgs.items()}
    out(f"[lm bench moe] device {device_name(dev)}; dim={base['dim']} layers={base['num_layers']} "
        f"8 experts of hidden {hidden} (dense twins: {hidden} / {2 * hidden}); batch {batch}x{seq}; "
        f"{warmup} warmup + {steps} timed steps; {reps} interleaved round(s)")
    batches = _batches(warmup + steps, batch, seq, base["vocab_size"])
    train = interleave({n: (lambda c=c: train_run(c, batches, warmup, steps, dev)) for n, c in cfgs.items()}, reps)
    fwd = interleave({n: (lambda c=c: forward_run(c, batches, warmup, steps, dev)) for n, c in cfgs.items()}, reps)
    res: dict[str, float] = {
        "moe.top1_vs_dense_active": median_ratio(train["top1"], train["dense1"]),
        "moe.top2_vs_dense_active": median_ratio(train["top2"], train["dense2"]),
        "moe.top1_vs_dense_active_fwd": median_ratio(fwd["top1"], fwd["dense1"]),
        "moe.top2_vs_dense_active_fwd": median_ratio(fwd["top2"], fwd["dense2"]),
    }
    for n in VARIANTS:
        res[f"moe.tokens_per_s.{n}"] = median(train[n])
        res[f"moe.tokens_per_s_fwd.{n}"] = median(fwd[n])
        res[f"moe.params.{n}"], res[f"moe.active_params.{n}"] = map(float, counts[n])
    out(table("moe: training tokens/s (median; per-round values)", ["model", "params", "active", "tokens/s", "rounds"],
              [[n, counts[n][0], counts[n][1], median(train[n]), " ".join(fmt(x) for x in train[n])] for n in VARIANTS]))
    out(table("moe: figures (median of per-round ratios)", ["figure", "value"], [
        ["top1 / dense (equal active), training", res["moe.top1_vs_dense_active"]],
        ["top2 / dense (equal active), training (target >= 0.6)", res["moe.top2_vs_dense_active"]],
        ["top1 / dense (equal active), forward", res["moe.top1_vs_dense_active_fwd"]],
        ["top2 / dense (equal active), forward", res["moe.top2_vs_dense_active_fwd"]]]))
    if ep:  # 2 processes on CPU whatever --device says: the gloo path of lm.parallel.moe
        epr = ep_compare(quick, repeats)
        res["moe.ep2_vs_local"] = median_ratio(epr["ep2"], epr["local"])
        for n in ("local", "ep2"):
            res[f"moe.ep2.tokens_per_s.{n}"] = median(epr[n])
        out(table("moe: 2 processes (CPU, gloo), top-2, tokens/s (global)", ["experts", "tokens/s", "rounds"], [
            [n, median(epr[n]), " ".join(fmt(x) for x in epr[n])] for n in ("local", "ep2")]))
        out(table("moe: expert parallel", ["figure", "value"], [["ep=2 / all experts local", res["moe.ep2_vs_local"]]]))
    return res


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="internal: the 2-process worker of `lm bench moe`")
    p.add_argument("--ep-worker", required=True)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args()
    from lm.parallel.worker import exit_worker, start_worker

    start_worker()
    _ep_worker(a.ep_worker, a.quick, a.repeats)
    exit_worker(0)
