"""``lm bench mixers``: how attention, Mamba, RWKV and Hyena scale with the sequence length.

(a) **Training step time vs sequence length.** One model per mixer (same dim, layers, vocab; ffn
``none`` so the step is the mixer's; RWKV with its LayerNorm), batch 1, one step = forward,
cross-entropy, backward, AdamW step. Lengths 1k ... 16k on CUDA and CPU (a length that runs out of
memory ends that mixer's sweep). ``mixers.exponent.NAME`` is the least-squares slope of
log(step time) on log(length): ~2 for attention, ~1 for linear-time mixers, a little above 1 for
Hyena's FFT (T log T). Targets: Mamba and RWKV <= 1.15, Hyena <= 1.3, attention ~2.

(b) **Decode time per token vs context length.** Batch 8, dim 128, 2 layers. Each model prefills
one random prompt through its cache (chunks of 256) up to each context in turn; Mamba's and RWKV's
constant-size caches are snapshotted at every context, the positional caches (attention's KV cache,
Hyena's input history) are rewound (``cache.pos = ctx``), which leaves exactly what a prompt of
``ctx`` tokens gives for timing purposes. After one untimed step, ``new_tokens`` steps are timed.
``mixers.decode_flatness.NAME`` = time per token at the largest context / at 512 (flat: 1.0;
target <= 1.1 for Mamba and RWKV from 512 to 8k).

(c) **Chunked scan vs naive sequential scan** (``lm.mixers.mamba.selective_scan`` against the
one-step-at-a-time recurrence ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t . h_t``) at
L = 2048, the Mamba layer shape of (a) (batch 1, E = 2 * dim channels, N = 16 states), fp32.
``mixers.scan_speedup`` times forward + backward (training, what the scan is for);
``mixers.scan_speedup_forward`` the forward alone; ``mixers.scan_max_abs_diff`` checks they agree.
Target >= 10x. Both do the same arithmetic (``lm.mixers.ssm_scan``: two-level blockwise scan,
analytic backward); the chunked form wins by running L + C vectorised steps per block instead of
T, and by a backward that recomputes a block's states instead of replaying an autograd graph of T
small steps.

Every comparison interleaves its variants (ABBA rounds, medians; ``lm.bench.common``). A PNG of
(a) and (b) (matplotlib, Agg) is written to ``$LM_BENCH_DIR/mixers.png`` (default ``runs/bench``).
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lm.bench.common import (
    clock, device_name, fmt, interleave, median, median_ratio, pyplot, resolve_device, save_figure, table,
)
from lm.models import DecoderConfig, DecoderLM
from lm.nn.cache import KVCache

SEED = 1234
KINDS = ("attention", "mamba", "rwkv", "hyena")
MIXER_CFG = {  # ffn none everywhere: the step is the mixer's (RWKV keeps its LayerNorm layout)
    "attention": dict(mixer="attention"),
    "mamba": dict(mixer="mamba", mixer_options={"d_state": 16}),
    "rwkv": dict(mixer="rwkv", norm="layernorm"),
    "hyena": dict(mixer="hyena"),
}
RECURRENT = ("mamba", "rwkv")  # constant-size caches: snapshot instead of rewind


@dataclass
class Plan:
    dim: int
    layers: int
    heads: int
    vocab: int
    train_lens: tuple[int, ...]
    train_steps: int
    decode_dim: int
    decode_batch: int
    decode_ctxs: tuple[int, ...]
    new_tokens: int
    prefill_chunk: int
    scan_len: int
    repeats: int


def plan(quick: bool, device: torch.device, repeats: int | None) -> Plan:
    if quick:
        return Plan(16, 1, 2, 64, (64, 128, 256), 1, 16, 2, (32, 64), 2, 32, 256, repeats or 1)
    if device.type == "cuda":
        return Plan(256, 2, 4, 256, (1024, 2048, 4096, 8192, 16384), 5, 256, 32,
                    (512, 1024, 2048, 4096, 8192), 32, 1024, 2048, repeats or 3)
    return Plan(32, 2, 4, 256, (1024, 2048, 4096, 8192, 16384), 1, 128, 8,
                (512, 1024, 2048, 4096, 8192), 64, 256, 2048, repeats or 3)


def build(kind: str, dim: int, layers: int, heads: int, vocab: int, max_len: int, device) -> DecoderLM:
    torch.manual_seed(SEED)
    cfg = DecoderConfig(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=heads, max_seq_len=max_len,
                        ffn="none", **MIXER_CFG[kind])
    return DecoderLM(cfg).to(device)


def fit_exponent(lens, secs) -> float:
    """Least-squares slope of log(seconds) on log(length)."""
    xs, ys = [math.log(n) for n in lens], [math.log(s) for s in secs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower() or \
        "can't allocate" in str(err).lower() or "not enough memory" in str(err).lower()


# -- (a) training step time -------------------------------------------------------------------
def train_step_time(model: DecoderLM, opt, ids_1T: torch.Tensor, steps: int, device) -> float:
    """Seconds per training step (forward, loss, backward, AdamW) after one untimed step."""
    def step():
        logits = model(ids_1T[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids_1T[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()
    t0 = clock(device)
    for _ in range(steps):
        step()
    return (clock(device) - t0) / steps


def bench_train(p: Plan, dev, out) -> tuple[dict, dict]:
    top = max(p.train_lens)
    g = torch.Generator().manual_seed(SEED)
    ids = {n: torch.randint(0, p.vocab, (1, n + 1), generator=g).to(dev) for n in p.train_lens}
    models = {k: build(k, p.dim, p.layers, p.heads, p.vocab, top + 1, dev) for k in KINDS}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    secs: dict[str, dict[int, float]] = {k: {} for k in KINDS}
    stopped: set[str] = set()  # ran out of memory: sits out the longer lengths
    for n in p.train_lens:
        def one(k):
            try:
                return train_step_time(models[k], opts[k], ids[n], p.train_steps, dev)
            except RuntimeError as err:
                if not _is_oom(err):
                    raise
                opts[k].zero_grad(set_to_none=True)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                return float("nan")
        runs = {k: (lambda k=k: one(k)) for k in KINDS if k not in stopped}
        for k, s in interleave(runs, p.repeats).items():
            if all(math.isfinite(x) for x in s):
                secs[k][n] = median(s)
            else:
                stopped.add(k)
                out(f"[lm bench mixers] {k}: out of memory at length {n}; its sweep stops at {max(secs[k] or [0])}")
    res = {}
    for k in KINDS:
        lens = sorted(secs[k])
        res[f"mixers.exponent.{k}"] = fit_exponent(lens, [secs[k][n] for n in lens]) if len(lens) >= 2 else float("nan")
        for n in lens:
            res[f"mixers.train_ms.{k}.{n}"] = 1e3 * secs[k][n]
    rows = [[str(n)] + [secs[k].get(n, float("nan")) * 1e3 for k in KINDS] for n in p.train_lens]
    out(table(f"mixers (a): training step ms (batch 1, dim {p.dim}, {p.layers} layers)", ["length", *KINDS], rows))
    return res, secs


# -- (b) decode time per token ----------------------------------------------------------------
def _prefill(model: DecoderLM, ids_BT: torch.Tensor, cache, chunk: int) -> None:
    for s in range(0, ids_BT.shape[1], chunk):
        model.hidden_states(ids_BT[:, s:s + chunk], cache=cache)


def _decode_time(model: DecoderLM, cache, steps_NB1: torch.Tensor, device, rewind_to: int | None) -> float:
    if rewind_to is not None:
        cache.pos = rewind_to
    model(steps_NB1[0], cache=cache)
    if rewind_to is not None:
        cache.pos = rewind_to
    t0 = clock(device)
    for ids_B1 in steps_NB1:
        model(ids_B1, cache=cache)
    return (clock(device) - t0) / len(steps_NB1)


@torch.inference_mode()
def bench_decode(p: Plan, dev, out) -> tuple[dict, dict]:
    B, N, ctxs = p.decode_batch, p.new_tokens, p.decode_ctxs
    top = max(ctxs)
    g = torch.Generator().manual_seed(SEED + 1)
    prompt = torch.randint(0, p.vocab, (B, top), generator=g).to(dev)
    steps = torch.randint(0, p.vocab, (N, B, 1), generator=g).to(dev)
    variants, res = {}, {}
    for k in KINDS:
        model = build(k, p.decode_dim, 2, 4, p.vocab, top + N + 2, dev).eval()
        cache = model.init_cache(B, top + N + 2)
        snaps = {}
        for ctx in ctxs:
            _prefill(model, prompt[:, cache.pos:ctx], cache, p.prefill_chunk)
            if k in RECURRENT:
                snaps[ctx] = copy.deepcopy(cache)
        res[f"mixers.decode_cache_bytes.{k}.{top}"] = float(cache.nbytes())
        for ctx in ctxs:
            if k in RECURRENT:
                variants[(k, ctx)] = lambda m=model, s=snaps[ctx]: _decode_time(m, copy.deepcopy(s), steps, dev, None)
            else:
                assert isinstance(cache.layers[0], KVCache) or k == "hyena"
                variants[(k, ctx)] = lambda m=model, c=cache, x=ctx: _decode_time(m, c, steps, dev, x)
    secs = interleave(variants, p.repeats)
    ms = {k: {ctx: 1e3 * median(secs[(k, ctx)]) for ctx in ctxs} for k in KINDS}
    for k in KINDS:
        res[f"mixers.decode_flatness.{k}"] = median_ratio(secs[(k, top)], secs[(k, min(ctxs))])
        for ctx in ctxs:
            res[f"mixers.decode_ms.{k}.{ctx}"] = ms[k][ctx]
    rows = [[str(ctx)] + [ms[k][ctx] for k in KINDS] for ctx in ctxs]
    out(table(f"mixers (b): decode ms per step (batch {B}, dim {p.decode_dim}, 2 layers)", ["context", *KINDS], rows))
    return res, ms


# -- (c) chunked vs naive scan ----------------------------------------------------------------
def naive_scan(x_BTE, dt_BTE, A_EN, B_BTN, C_BTN):
    """The recurrence one step at a time (the reference the chunked scan is tested against)."""
    h_BEN = x_BTE.new_zeros(x_BTE.shape[0], x_BTE.shape[2], A_EN.shape[1])
    ys = []
    for t in range(x_BTE.shape[1]):
        h_BEN = torch.exp(dt_BTE[:, t, :, None] * A_EN) * h_BEN \
            + (dt_BTE[:, t] * x_BTE[:, t])[..., None] * B_BTN[:, t, None, :]
        ys.append(torch.einsum("ben,bn->be", h_BEN, C_BTN[:, t]))
    return torch.stack(ys, 1), h_BEN


def bench_scan(p: Plan, dev, out) -> dict:
    from lm.mixers.mamba import selective_scan

    T, E, N = p.scan_len, 2 * p.dim, 16
    g = torch.Generator().manual_seed(SEED + 2)
    x = torch.randn(1, T, E, generator=g).to(dev)
    dt = F.softplus(torch.randn(1, T, E, generator=g) - 3).to(dev)
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1).to(dev)
    Bm, Cm = (torch.randn(1, T, N, generator=g).to(dev) for _ in range(2))
    leaves = [x, dt, A, Bm, Cm]

    def timed(fn, backward: bool) -> float:
        args = [t.detach().clone().requires_grad_(backward) for t in leaves]
        t0 = clock(dev)
        with torch.set_grad_enabled(backward):
            y, _ = fn(*args)
            if backward:
                y.sum().backward()
        return clock(dev) - t0

    with torch.no_grad():
        y_c, _ = selective_scan(*leaves)
        y_n, _ = naive_scan(*leaves)
    diff = (y_c - y_n).abs().max().item() / max(1.0, y_n.abs().max().item())
    fwd = interleave({"chunked": lambda: timed(selective_scan, False), "naive": lambda: timed(naive_scan, False)},
                     p.repeats + 1)
    both = interleave({"chunked": lambda: timed(selective_scan, True), "naive": lambda: timed(naive_scan, True)},
                      p.repeats)
    res = {"mixers.scan_speedup": median_ratio(both["naive"], both["chunked"]),
           "mixers.scan_speedup_forward": median_ratio(fwd["naive"], fwd["chunked"]),
           "mixers.scan_ms.chunked": 1e3 * median(both["chunked"]), "mixers.scan_ms.naive": 1e3 * median(both["naive"]),
           "mixers.scan_max_abs_diff": max(diff, 1e-12)}
    out(table(f"mixers (c): selective scan, L={T}, E={E}, N={N}, batch 1", ["scan", "fwd+bwd ms", "fwd ms"], [
        ["chunked (selective_scan)", 1e3 * median(both["chunked"]), 1e3 * median(fwd["chunked"])],
        ["naive sequential", 1e3 * median(both["naive"]), 1e3 * median(fwd["naive"])]]))
    return res


def plot(train_secs: dict, decode_ms: dict, res: dict, path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k in KINDS:
        lens = sorted(train_secs[k])
        if lens:
            a.loglog(lens, [1e3 * train_secs[k][n] for n in lens], "o-",
                     label=f"{k} (slope {res.get(f'mixers.exponent.{k}', float('nan')):.2f})")
        ctxs = sorted(decode_ms[k])
        b.semilogx(ctxs, [decode_ms[k][c] for c in ctxs], "o-",
                   label=f"{k} (x{res.get(f'mixers.decode_flatness.{k}', float('nan')):.2f})")
    a.set(xlabel="sequence length", ylabel="training step (ms)", title="(a) training step time")
    b.set(xlabel="context length", ylabel="decode step (ms)", title="(b) decode time per token", ylim=(0, None))
    for ax in (a, b):
        ax.legend(fontsize=8)
    return save_figure(fig, (a, b), path)


def run(quick: bool = False, device: str = "auto", repeats: int | None = None, out=print) -> dict:
    dev = resolve_device(device)
    p = plan(quick, dev, repeats)
    out(f"[lm bench mixers] device {device_name(dev)}; {', '.join(KINDS)}; train lengths {list(p.train_lens)}; "
        f"decode contexts {list(p.decode_ctxs)}; scan L={p.scan_len}; {p.repeats} interleaved rounds")
    res, train_secs = bench_train(p, dev, out)
    dres, decode_ms = bench_decode(p, dev, out)
    res.update(dres)
    res.update(bench_scan(p, dev, out))
    res["mixers.train_batch"], res["mixers.decode_batch"] = 1.0, float(p.decode_batch)
    path = plot(train_secs, decode_ms, res, Path(os.environ.get("LM_BENCH_DIR", "runs/bench")) / "mixers.png")
    top, low = max(p.decode_ctxs), min(p.decode_ctxs)
    rows = [[f"exponent {k} (target {t})", res[f"mixers.exponent.{k}"]]
            for k, t in (("attention", "~2"), ("mamba", "<= 1.15"), ("rwkv", "<= 1.15"), ("hyena", "<= 1.3"))]
    rows += [[f"decode flatness {k}, {top} / {low} (target <= 1.1)" if k in RECURRENT else
              f"decode flatness {k}, {top} / {low}", res[f"mixers.decode_flatness.{k}"]] for k in KINDS]
    rows += [[f"scan speedup fwd+bwd, L={p.scan_len} (target >= 10)", res["mixers.scan_speedup"]],
             ["scan speedup forward only", res["mixers.scan_speedup_forward"]],
             ["scan max |chunked - naive| (relative)", res["mixers.scan_max_abs_diff"]]]
    out(table("mixers: figures", ["figure", "value"], [[r[0], fmt(r[1])] for r in rows]))
    if path is not None:
        out(f"[lm bench mixers] plot: {path}")
    return res
