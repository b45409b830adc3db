"""Shared helpers of the benchmarks: device choice, synchronised clocks, interleaved repeats, tables.

Every benchmark reports ratios of variants measured side by side: the machines are shared, so an
absolute figure drifts with the load while a ratio of interleaved runs (A B B A A B ..., medians)
mostly does not.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Iterable, Sequence

import torch


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; anything else is passed to ``torch.device``."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"bench --device: {name!r} requested but CUDA is not available")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """``perf_counter`` after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def step_period(stamps: list[float], device: torch.device) -> float:
    """Seconds per step from step-start stamps (the last one: the end). CPU: the median period,
    robust to the other jobs' bursts on a shared machine. CUDA: the window's mean, as only its ends
    are synchronised (a sync per step would stop the host from running ahead of the device)."""
    if device.type == "cuda":
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return median(b - a for a, b in zip(stamps, stamps[1:]))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def interleave(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, list]:
    """Runs every variant ``repeats`` times, alternating the order each round (ABC, CBA, ABC, ...)
    so a drift of the machine's load hits all variants alike. Returns name -> list of results."""
    names = list(variants)
    out: dict[str, list] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(variants[n]())
    return out


def median(xs: Iterable[float]) -> float:
    return float(statistics.median(list(xs)))


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios ``num[i] / den[i]`` (pairs measured next to each other)."""
    return median(a / b for a, b in zip(num, den))


def fmt(x: float) -> str:
    if isinstance(x, str):
        return x
    if x == 0 or not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a >= 1e5 or a < 1e-3:
        return f"{x:.3e}"
    return f"{x:.4g}" if a < 100 else f"{x:,.0f}"


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in headers]] + [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join([f"== {title}", body[0], line, *body[1:]])


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None where matplotlib is missing (the
    figures do not depend on the plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, axes, path):
    """Grid on every axis, tight layout, write ``path`` (parents made), close; returns ``path``."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
