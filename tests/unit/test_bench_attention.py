"""``lm bench attention --quick``: runs in seconds, writes the documented JSON keys (finite), the
plot, and its peak-memory probe measures what it claims. No timing assertions (shared machines)."""
import json
import math

import pytest
import torch

from lm.bench import main as bench_main
from lm.bench.attention import PeakTensorMemory, fit_exponent

KEYS = [
    *(f"attention.exponent.{v}" for v in ("full", "sliding", "longformer", "bigbird", "performer")),
    *(f"attention.peak_mem_ratio.{v}" for v in ("sliding", "longformer", "bigbird", "performer")),
    "attention.favor_error.16", "attention.favor_error.256", "attention.wall_s",
]


@pytest.fixture(autouse=True)
def bench_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_BENCH_DIR", str(tmp_path / "plots"))
    monkeypatch.setenv("LM_CACHE", str(tmp_path / "cache"))


def test_bench_attention_quick(tmp_path, capsys):
    path = tmp_path / "attention.json"
    assert bench_main(["attention", "--quick", "--device", "cpu", "--threads", "1", "--json", str(path)]) == 0
    d = json.loads(path.read_text())
    missing = [k for k in KEYS if k not in d]
    assert not missing, missing
    assert all(k.startswith("attention.") for k in d)
    assert all(math.isfinite(v) for v in d.values()), {k: v for k, v in d.items() if not math.isfinite(v)}
    assert all(d[k] > 0 for k in d if "peak_mem_ratio" in k or "peak_mib" in k or "time_s" in k)
    assert d["attention.favor_error.256"] < d["attention.favor_error.16"]
    text = capsys.readouterr().out
    assert "peak MiB" in text and "FAVOR+" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "plots" / "attention.png").stat().st_size > 10_000


def test_peak_tensor_memory_sees_a_quadratic_score_matrix():
    def peak(T):
        q = torch.randn(1, 2, T, 8, requires_grad=True)
        with PeakTensorMemory() as pm:
            ((q @ q.transpose(-1, -2)).softmax(-1) @ q).sum().backward()
        return pm.peak

    small, big = peak(128), peak(256)
    assert big / small > 3.5  # [T, T] scores dominate
    assert small >= 2 * 128 * 128 * 4  # at least the scores and the softmax of one head pair


def test_fit_exponent():
    assert abs(fit_exponent([1, 2, 4, 8], [3, 12, 48, 192]) - 2.0) < 1e-9
    assert abs(fit_exponent([1024, 2048, 4096], [1.0, 2.0, 4.0]) - 1.0) < 1e-9
