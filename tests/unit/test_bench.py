"""``lm bench train|decode --quick``: both run in-process in seconds and write one flat JSON object
whose figures exist and are finite and positive. No timing assertions (shared, noisy machines)."""
import json
import math

import pytest

from lm.bench import BENCHMARKS
from lm.bench import main as bench_main
from lm.bench.common import interleave, median_ratio, table
from lm.cli import main as cli_main

TRAIN_KEYS = [
    "train.framework_vs_plain", "train.tokens_per_s_plain", "train.tokens_per_s_framework",
    "train.tokens_per_s_fp32", "train.framework_overhead_ms", "train.tokens_per_s_bf16", "train.bf16_vs_fp32", "train.flops_per_token",
    "train.peak_flops_fp32", "train.peak_flops_bf16", "train.mfu_fp32", "train.mfu_bf16", "train.wall_s",
]
QUICK_CONTEXTS = (32, 64)
DECODE_KEYS = [
    "decode.kv_bytes_mha_vs_mqa", "decode.mqa_vs_mha_speedup", "decode.gqa_vs_mha_speedup",
    "decode.sliding_flatness", "decode.full_flatness_mha", "decode.sliding.kv_bytes", "decode.wall_s",
    *(f"decode.tps.{k}.{c}" for k in ("mha", "gqa", "mqa") for c in QUICK_CONTEXTS),
    *(f"decode.kv_bytes.{k}.{c}" for k in ("mha", "gqa", "mqa") for c in QUICK_CONTEXTS),
    *(f"decode.sliding.ms_per_token.{c}" for c in QUICK_CONTEXTS),
]


SIGNED = {"train.framework_overhead_ms"}  # a difference of two step times: may be negative


def check_figures(d: dict, keys: list[str]) -> None:
    missing = [k for k in keys if k not in d]
    assert not missing, f"missing keys {missing}"
    bad = {k: v for k, v in d.items()
           if not (isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or k in SIGNED))}
    assert not bad, f"not finite/positive: {bad}"


@pytest.fixture(autouse=True)
def lm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_CACHE", str(tmp_path / "cache"))


def test_registry_names():
    assert {"train", "decode"} <= set(BENCHMARKS)


def test_bench_train_quick(tmp_path, capsys):
    path = tmp_path / "train.json"
    assert bench_main(["train", "--quick", "--device", "cpu", "--threads", "1", "--json", str(path)]) == 0
    d = json.loads(path.read_text())
    check_figures(d, TRAIN_KEYS)
    assert all(k.startswith("train.") for k in d)
    assert d["train.threads"] == 1.0
    assert "framework_vs_plain" in capsys.readouterr().out  # the readable table


def test_bench_decode_quick_through_cli(tmp_path):
    path = tmp_path / "out" / "decode.json"
    assert cli_main(["bench", "decode", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    d = json.loads(path.read_text())
    check_figures(d, DECODE_KEYS)
    # cache bytes are exact, not timed: MHA (4 kv heads in --quick) over MQA (1) is 4, GQA halves MHA
    assert d["decode.kv_bytes_mha_vs_mqa"] == 4.0
    for c in QUICK_CONTEXTS:
        assert d[f"decode.kv_bytes.mha.{c}"] == 2 * d[f"decode.kv_bytes.gqa.{c}"] == 4 * d[f"decode.kv_bytes.mqa.{c}"]
    assert d["decode.kv_bytes.mha.64"] == 2 * d["decode.kv_bytes.mha.32"]


def test_unknown_benchmark_is_a_user_error(capsys):
    assert cli_main(["bench", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_interleave_alternates_order():
    calls = []
    res = interleave({"a": lambda: calls.append("a") or 1.0, "b": lambda: calls.append("b") or 2.0}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert res == {"a": [1.0] * 3, "b": [2.0] * 3}
    assert median_ratio([2, 4, 9], [1, 1, 3]) == 3
    assert "== t" in table("t", ["x", "y"], [["r", 1.5]])
