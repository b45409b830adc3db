"""``lm bench decode``: KV-cache size and decode speed of MHA / GQA / MQA, and sliding-window flatness.

Model: dim 512, 8 heads of 64, 4 layers, SwiGLU, vocab 4096, fp32; MHA has 8 KV heads, GQA 2, MQA 1.
Batch 8 on CPU (64 on CUDA). Why that batch: a decode step reads every weight once whatever the
batch (~15M params, ~59 MB fp32), while it reads the KV cache once per sequence:
``B * layers * 2 * kv_heads * ctx * 64 * 4`` bytes, 537 MB for MHA at B=8, ctx 4096 (9x the
weights) against 67 MB for MQA. So at B=8 the MHA step is bound by cache traffic and MQA's ideal
gain is ~(537+59)/(67+59) = 4.7x; at B=1 it would be bounded by ~1.9x and the benchmark would mostly
time the weight reads. On a GPU the per-step kernel launches dominate a model this small, so a
larger batch is needed there for the cache read to matter.

Method: each variant prefills one random prompt of the largest context (in chunks through the cache,
via ``model.hidden_states`` so no logits are computed for the prompt); the decode at a shorter
context ``ctx`` rewinds ``cache.pos`` to ``ctx``, which leaves exactly the cache a prompt of
``ctx`` tokens gives (causal: positions < ctx never see later ones; slots >= ctx are rewritten
before they are read). One untimed step, then ``new_tokens`` timed steps ``model(ids_B1, cache=...)``.
All (variant, context) runs are interleaved, order reversed every round; figures are medians, the
speedups medians of per-round ratios. Cache bytes are ``model.init_cache(B, ctx).nbytes()``.

Sliding window (Mistral, window 256, MHA heads): the rolling cache is prefilled progressively in
window-sized chunks; a copy of it at each context is decoded from. ``decode.sliding_flatness`` is
the time per token at the largest context over that at the smallest (flat: 1.0).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from lm.bench.common import (
    clock, device_name, interleave, median, median_ratio, resolve_device, step_period, table,
)
from lm.models import DecoderConfig, DecoderLM

SEED = 1234


@dataclass
class Plan:
    model: dict
    kinds: dict[str, int]  # name -> num_kv_heads
    contexts: tuple[int, ...]
    batch: int
    new_tokens: int
    repeats: int
    window: int
    chunk: int  # prefill chunk of the full-attention caches
    extra: dict = field(default_factory=dict)


def plan(quick: bool, device: torch.device, repeats: int | None) -> Plan:
    if quick:
        return Plan(dict(vocab_size=256, dim=64, num_layers=2, num_heads=4), {"mha": 4, "gqa": 2, "mqa": 1},
                    (32, 64), 2, 4, repeats or 2, 16, 16)
    batch = 64 if device.type == "cuda" else 8
    return Plan(dict(vocab_size=4096, dim=512, num_layers=4, num_heads=8), {"mha": 8, "gqa": 2, "mqa": 1},
                (512, 1024, 2048, 4096), batch, 16, repeats or 5, 256, 512)


def build(p: Plan, device, **over) -> DecoderLM:
    torch.manual_seed(SEED)
    cfg = DecoderConfig(**{**p.model, "max_seq_len": max(p.contexts) + p.new_tokens + 1, **over})
    return DecoderLM(cfg).to(device).eval()


def prefill(model: DecoderLM, ids_BT: torch.Tensor, cache, chunk: int) -> None:
    """Feeds ``ids_BT`` through the cache ``chunk`` tokens at a time (no logits)."""
    for s in range(0, ids_BT.shape[1], chunk):
        model.hidden_states(ids_BT[:, s:s + chunk], cache=cache)


def time_decode(model: DecoderLM, cache, ids_NB1: torch.Tensor, device, rewind_to: int | None) -> float:
    """Seconds per decode step over ``len(ids_NB1)`` steps, after one untimed step (median step on
    CPU, mean on CUDA: see ``step_period``)."""
    if rewind_to is not None:
        cache.pos = rewind_to
    model(ids_NB1[0], cache=cache)
    if rewind_to is not None:
        cache.pos = rewind_to
    stamps = [clock(device)]
    for i, ids_B1 in enumerate(ids_NB1):
        model(ids_B1, cache=cache)
        stamps.append(clock(device) if i == len(ids_NB1) - 1 else time.perf_counter())
    return step_period(stamps, device)


@torch.inference_mode()
def run(quick: bool = False, device: str = "auto", repeats: int | None = None, out=print) -> dict:
    dev = resolve_device(device)
    p = plan(quick, dev, repeats)
    B, N, ctxs, top = p.batch, p.new_tokens, p.contexts, max(p.contexts)
    out(f"[lm bench decode] device {device_name(dev)}; dim={p.model['dim']} heads={p.model['num_heads']} "
        f"layers={p.model['num_layers']} fp32; batch {B}; contexts {list(ctxs)}; {N} timed tokens; "
        f"{p.repeats} interleaved rounds")
    g = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, p.model["vocab_size"], (B, top), generator=g).to(dev)
    steps = torch.randint(0, p.model["vocab_size"], (N, B, 1), generator=g).to(dev)
    res: dict[str, float] = {"decode.batch": float(B), "decode.new_tokens": float(N)}

    # -- MHA / GQA / MQA ------------------------------------------------------------------------
    models, caches = {}, {}
    for kind, kv in p.kinds.items():
        models[kind] = build(p, dev, num_kv_heads=kv)
        for ctx in ctxs:
            res[f"decode.kv_bytes.{kind}.{ctx}"] = float(models[kind].init_cache(B, ctx).nbytes())
        caches[kind] = models[kind].init_cache(B, top + N)
        t0 = clock(dev)
        prefill(models[kind], prompt, caches[kind], p.chunk)
        res[f"decode.prefill_s.{kind}"] = clock(dev) - t0
    variants = {f"{kind}.{ctx}": (lambda k=kind, c=ctx: time_decode(models[k], caches[k], steps, dev, c))
                for ctx in ctxs for kind in p.kinds}
    secs = interleave(variants, p.repeats)
    for name, s in secs.items():
        res[f"decode.tps.{name}"] = B / median(s)
    mha, gqa, mqa = p.kinds  # names in order
    res["decode.kv_bytes_mha_vs_mqa"] = res[f"decode.kv_bytes.{mha}.{top}"] / res[f"decode.kv_bytes.{mqa}.{top}"]
    res["decode.mqa_vs_mha_speedup"] = median_ratio(secs[f"{mha}.{top}"], secs[f"{mqa}.{top}"])
    res["decode.gqa_vs_mha_speedup"] = median_ratio(secs[f"{mha}.{top}"], secs[f"{gqa}.{top}"])
    res["decode.full_flatness_mha"] = median_ratio(secs[f"{mha}.{top}"], secs[f"{mha}.{min(ctxs)}"])
    del caches

    # -- sliding window: rolling cache ------------------------------------------------------------
    sw = build(p, dev, mixer="sliding_window", mixer_options={"window": p.window})
    cache = sw.init_cache(B, top + N)
    snaps = {}
    t0 = clock(dev)
    for ctx in ctxs:
        prefill(sw, prompt[:, cache.pos:ctx], cache, p.window)
        snaps[ctx] = copy.deepcopy(cache)
    res["decode.prefill_s.sliding"] = clock(dev) - t0
    res["decode.sliding.kv_bytes"] = float(cache.nbytes())
    ssecs = interleave({ctx: (lambda c=ctx: time_decode(sw, copy.deepcopy(snaps[c]), steps, dev, None))
                        for ctx in ctxs}, p.repeats)
    for ctx, s in ssecs.items():
        res[f"decode.sliding.ms_per_token.{ctx}"] = 1e3 * median(s)
    res["decode.sliding_flatness"] = median_ratio(ssecs[top], ssecs[min(ctxs)])

    rows = []
    for ctx in ctxs:
        rows.append([str(ctx)] + [res[f"decode.tps.{k}.{ctx}"] for k in p.kinds]
                    + [res[f"decode.kv_bytes.{k}.{ctx}"] / 2**20 for k in p.kinds]
                    + [res[f"decode.sliding.ms_per_token.{ctx}"]])
    out(table("decode: tokens/s (batch x steps / s), KV cache MiB, sliding-window ms/step",
              ["context", *(f"{k} tok/s" for k in p.kinds), *(f"{k} MiB" for k in p.kinds), "sliding ms"], rows))
    out(table("decode: figures", ["figure", "value"], [
        [f"KV bytes {mha}/{mqa} (= num_heads/1)", res["decode.kv_bytes_mha_vs_mqa"]],
        [f"{mqa} vs {mha} decode speedup at {top} (target >= 1.5)", res["decode.mqa_vs_mha_speedup"]],
        [f"{gqa} vs {mha} decode speedup at {top}", res["decode.gqa_vs_mha_speedup"]],
        [f"full-cache {mha} time/token {top} over {min(ctxs)}", res["decode.full_flatness_mha"]],
        [f"sliding-window time/token {top} over {min(ctxs)} (target <= 1.2)", res["decode.sliding_flatness"]],
        ["prefill seconds mha/gqa/mqa/sliding", " / ".join(
            f"{res[f'decode.prefill_s.{k}']:.1f}" for k in (*p.kinds, "sliding"))]]))
    return res
