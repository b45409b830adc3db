"""``lm bench NAME [NAME ...] [--json FILE] [--quick] [--device auto|cpu|cuda] [--repeats R] [--threads N]``.

Each benchmark is a function ``run(quick, device, repeats, out) -> {flat key: number}`` in its own
module, registered by name in ``BENCHMARKS`` (imported only when asked for, so ``lm bench decode``
does not pay for Lightning). It prints readable tables through ``out``; ``--json FILE`` writes one
flat JSON object with every figure of every benchmark run (keys ``NAME.figure``).

``--threads N`` sets torch's intra-op threads for the run (default: torch's own choice, all cores).
On a CPU shared with other jobs, 2 OpenMP threads on 2 busy cores wait at every parallel region for
a descheduled sibling and steps slow down 10-20x; ``--threads 1`` then gives stable ratios.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import time
from pathlib import Path
from typing import Callable

Benchmark = Callable[..., dict]


def _lazy(module: str) -> Benchmark:
    def run(**kw) -> dict:
        return importlib.import_module(module).run(**kw)

    run.__doc__ = f"{module}.run"
    return run


BENCHMARKS: dict[str, Benchmark] = {
    "train": _lazy("lm.bench.train"),
    "decode": _lazy("lm.bench.decode"),
    "moe": _lazy("lm.bench.moe"),
    "mixers": _lazy("lm.bench.mixers"),
    "attention": _lazy("lm.bench.attention"),
    "scaling": _lazy("lm.bench.scaling"),
}


@contextlib.contextmanager
def _threads(n: int | None):
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def run_benchmarks(names: list[str], quick: bool = False, device: str = "auto", repeats: int | None = None,
                   threads: int | None = None, out: Callable[[str], None] = print) -> dict[str, float]:
    """Runs the named benchmarks in order; returns their merged flat results."""
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"bench NAME: unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    results: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        with _threads(threads) as n:
            figures = BENCHMARKS[name](quick=quick, device=device, repeats=repeats, out=out)
        figures[f"{name}.threads"] = float(n)
        figures[f"{name}.wall_s"] = time.perf_counter() - t0
        out(f"[lm bench] {name}: {figures[f'{name}.wall_s']:.1f} s")
        results.update(figures)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lm bench", description="Benchmarks (ratios measured side by side).")
    p.add_argument("names", nargs="+", metavar="NAME", help=f"one or more of {', '.join(BENCHMARKS)}")
    p.add_argument("--json", metavar="FILE", help="write all figures as one flat JSON object")
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds (tests, smoke checks)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default per benchmark)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    for key in ("repeats", "threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ValueError(f"bench --{key}: must be >= 1, got {getattr(args, key)}")
    results = run_benchmarks(args.names, quick=args.quick, device=args.device, repeats=args.repeats,
                             threads=args.threads)
    bad = [k for k, v in results.items() if not math.isfinite(v)]
    if bad:
        print(f"[lm bench] warning: non-finite figures {bad}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")
        print(f"[lm bench] wrote {len(results)} figures to {path}")
    return 0
