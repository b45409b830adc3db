"""``lm bench attention``: forward+backward time and peak memory of one attention mixer vs sequence
length (full, sliding window, Longformer, BigBird, Performer), fitted log-log exponents, and the
FAVOR+ approximation error vs the number of random features.

Each variant is the registered mixer (projections, RoPE) on ``x [1, T, dim]``: ``full`` is the
``attention`` mixer (causal SDPA: flash kernel, O(T) memory, O(T^2) time); the sparse ones run
their block-sparse PyTorch path on CPU (FlexAttention on CUDA); ``performer`` is FAVOR+. Times are
medians of interleaved repeats; ``exponent.X`` is the least-squares slope of log time vs log T over
the longest three lengths measured (``mem_exponent.X`` the same for peak memory). Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak of live bytes of every tensor an op
creates during forward+backward (``PeakTensorMemory``, a dispatch mode: inputs and weights not
counted). ``peak_mem_ratio.X`` = X's peak at the longest length over full attention's there (or
at the longest length full attention was measured). A variant stops growing once one
forward+backward exceeds ``--quick``-dependent seconds. The plot goes to
``$LM_BENCH_DIR/attention.png`` (default ``runs/bench``; skipped with a message without matplotlib).

Legend: T sequence length, F random features, D head dim.
"""
from __future__ import annotations

import math
import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lm.bench.common import clock, device_name, interleave, median, pyplot, resolve_device, save_figure, table
from lm.models import DecoderConfig
from lm.registry import MIXERS

VARIANTS = ("full", "sliding", "longformer", "bigbird", "performer")


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of live tensors created by ops inside the context (forward and backward).

    Every op output's storage is counted once while any tensor viewing it is alive (a weakref per
    tensor; PyTorch keeps a tensor's Python object alive as long as autograd holds the tensor).
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage ptr -> [bytes, tensors alive]
        self.current = self.peak = 0

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[ptr]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr == 0:
                    continue
                if ptr in self.live:
                    self.live[ptr][1] += 1
                else:
                    self.live[ptr] = [storage.nbytes(), 1]
                    self.current += storage.nbytes()
                weakref.finalize(t, self._release, ptr)
        self.peak = max(self.peak, self.current)
        return out


def variant_options(quick: bool) -> dict[str, tuple[str, dict]]:
    """Mixer name and options of each variant (window 256 / blocks of 64 at full size)."""
    w, b = (16, 8) if quick else (256, 64)
    return {
        "full": ("attention", {}),
        "sliding": ("sliding_window_blocksparse", {"window": w, "block_size": b}),
        "longformer": ("longformer", {"window": w, "block_size": b, "global_tokens": [0]}),
        "bigbird": ("bigbird", {"block_size": b, "window_blocks": 3, "num_random_blocks": 2}),
        "performer": ("performer", {"num_features": 32 if quick else 256, "chunk_size": 2 * b}),
    }


def build(name: str, opts: dict, dim: int, heads: int, max_len: int, device) -> torch.nn.Module:
    cfg = DecoderConfig(vocab_size=256, dim=dim, num_layers=1, num_heads=heads, max_seq_len=max_len,
                        mixer=name, mixer_options=opts)
    torch.manual_seed(0)
    return MIXERS.build(name, cfg, 0, options=opts, key="bench.attention").to(device).train()


def fwd_bwd(mixer, x_BTD) -> None:
    x = x_BTD.detach().requires_grad_(True)
    mixer(x).float().square().mean().backward()


def timed(mixer, x_BTD, device) -> float:
    t0 = clock(device)
    fwd_bwd(mixer, x_BTD)
    return clock(device) - t0


def peak_bytes(mixer, x_BTD, device) -> float:
    mixer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fwd_bwd(mixer, x_BTD)
        return float(torch.cuda.max_memory_allocated(device) - base)
    with PeakTensorMemory() as pm:
        fwd_bwd(mixer, x_BTD)
    return float(pm.peak)


def fit_exponent(lengths: list[int], values: list[float]) -> float:
    """Slope of log(value) vs log(length) over the longest three points (least squares)."""
    xs, ys = [math.log(t) for t in lengths[-3:]], [math.log(v) for v in values[-3:]]
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def favor_errors(features: list[int], T: int, D: int, seeds: int = 3) -> dict[int, float]:
    """Mean |FAVOR+ - causal softmax attention| of the outputs, per number of features."""
    from lm.mixers.linear_attention import causal_linear_attention, favor_features, orthogonal_gaussian

    errs = {}
    for Fn in features:
        e = 0.0
        for s in range(seeds):
            g = torch.Generator().manual_seed(1000 + s)
            q, k = (torch.randn(1, 4, T, D, generator=g) * 0.5 for _ in range(2))
            v = torch.randn(1, 4, T, D, generator=g)
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            w = orthogonal_gaussian(Fn, D, torch.Generator().manual_seed(s))
            pq, pk = favor_features(q[:, :, None], w, True), favor_features(k, w, False)
            e += (causal_linear_attention(pq, pk, v)[0][:, :, 0] - ref).abs().mean().item() / seeds
        errs[Fn] = e
    return errs


def plot(lengths: dict, times: dict, mems: dict, errs: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    for v in VARIANTS:
        a.loglog(lengths[v], times[v], "o-", label=v)
        b.loglog(lengths[v], [m / 2 ** 20 for m in mems[v]], "o-", label=v)
    a.set(xlabel="sequence length", ylabel="forward+backward s", title="time")
    b.set(xlabel="sequence length", ylabel="peak MiB", title="peak memory")
    c.loglog(list(errs), list(errs.values()), "o-")
    c.set(xlabel="random features F", ylabel="mean |FAVOR+ - softmax|", title="FAVOR+ error")
    a.legend()
    return save_figure(fig, (a, b, c), path)


def run(quick: bool = False, device: str = "auto", repeats: int | None = None, out=print) -> dict:
    dev = resolve_device(device)
    lengths_all = [64, 128, 256] if quick else [1024, 2048, 4096, 8192, 16384]
    repeats = repeats or (1 if quick else 3)
    budget_s = 5.0 if quick else 60.0
    dim, heads = (32, 2) if quick else (256, 4)
    out(f"[lm bench attention] device {device_name(dev)}; one mixer, dim={dim} heads={heads}, batch 1; "
        f"lengths {lengths_all}; {repeats} interleaved repeat(s)")
    opts = variant_options(quick)
    mixers = {v: build(*opts[v], dim, heads, lengths_all[-1], dev) for v in VARIANTS}
    lengths = {v: [] for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    mems = {v: [] for v in VARIANTS}
    active = list(VARIANTS)
    for T in lengths_all:
        x = torch.randn(1, T, dim, device=dev)
        for v in active:
            fwd_bwd(mixers[v], x)  # warm-up (kernels, cached layouts / block masks)
        runs = interleave({v: (lambda v=v: timed(mixers[v], x, dev)) for v in active}, repeats)
        for v in list(active):
            lengths[v].append(T)
            times[v].append(median(runs[v]))
            mems[v].append(peak_bytes(mixers[v], x, dev))
            if times[v][-1] > budget_s:  # the next length would take ~2-4x longer
                active.remove(v)
        if not active:
            break
    res = {}
    for v in VARIANTS:
        res[f"attention.exponent.{v}"] = fit_exponent(lengths[v], times[v])
        res[f"attention.mem_exponent.{v}"] = fit_exponent(lengths[v], mems[v])
        for T, t, m in zip(lengths[v], times[v], mems[v]):
            res[f"attention.time_s.{v}.{T}"] = t
            res[f"attention.peak_mib.{v}.{T}"] = m / 2 ** 20
    for v in VARIANTS[1:]:
        T = min(lengths[v][-1], lengths["full"][-1])
        res[f"attention.peak_mem_ratio.{v}"] = mems[v][lengths[v].index(T)] / mems["full"][lengths["full"].index(T)]
    if quick:
        errs = favor_errors([16, 64, 256], T=64, D=16)
    else:
        errs = favor_errors([16, 64, 256, 1024, 4096], T=256, D=64)
    for Fn, e in errs.items():
        res[f"attention.favor_error.{Fn}"] = e

    cols = lengths_all[: max(map(len, lengths.values()))]

    def cells(v, values, f):
        return [f(x) for x in values] + ["-"] * (len(cols) - len(values))

    rows = [[v, *cells(v, times[v], lambda t: f"{t:.3g}"), res[f"attention.exponent.{v}"]] for v in VARIANTS]
    out(table("attention: forward+backward seconds (median)", ["variant", *map(str, cols), "exponent"], rows))
    rows = [[v, *cells(v, mems[v], lambda m: f"{m / 2 ** 20:.1f}"), res[f"attention.mem_exponent.{v}"],
             res.get(f"attention.peak_mem_ratio.{v}", 1.0)] for v in VARIANTS]
    out(table("attention: peak MiB", ["variant", *map(str, cols), "exponent", "vs full"], rows))
    out(table("attention: FAVOR+ mean |error| vs softmax", ["features", "error"], [[str(k), e] for k, e in errs.items()]))
    path = plot(lengths, times, mems, errs, Path(os.environ.get("LM_BENCH_DIR", "runs/bench")) / "attention.png")
    out(f"[lm bench attention] plot: {path}" if path else "[lm bench attention] matplotlib not installed: no plot")
    return res
