"""``lm bench mixers --quick``: runs in-process, writes the issue's keys (finite, positive) and the
PNG plot. No timing assertions (shared, noisy machines); the scan's agreement is checked."""
import json
import math

from lm.bench import main as bench_main

KINDS = ("attention", "mamba", "rwkv", "hyena")
KEYS = [*(f"mixers.exponent.{k}" for k in KINDS), "mixers.decode_flatness.mamba", "mixers.decode_flatness.rwkv",
        "mixers.scan_speedup", "mixers.scan_speedup_forward", "mixers.scan_max_abs_diff"]


def test_bench_mixers_quick(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LM_BENCH_DIR", str(tmp_path / "bench"))
    path = tmp_path / "mixers.json"
    assert bench_main(["mixers", "--quick", "--device", "cpu", "--threads", "1", "--json", str(path)]) == 0
    d = json.loads(path.read_text())
    missing = [k for k in KEYS if k not in d]
    assert not missing, f"missing keys {missing}"
    assert all(k.startswith("mixers.") for k in d)
    for k in KEYS:
        assert isinstance(d[k], float) and math.isfinite(d[k]), k
    assert d["mixers.scan_max_abs_diff"] < 1e-5  # the chunked scan equals the sequential recurrence
    assert (tmp_path / "bench" / "mixers.png").stat().st_size > 0
    assert "scan speedup" in capsys.readouterr().out
