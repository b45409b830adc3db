"""``lm bench moe --quick``: returns the documented figures, finite and positive, with equal
active parameters in each dense/MoE pair; through the registry it also runs the 2-process
local-vs-expert-parallel comparison (a torchrun child, ~30 s on 2 busy cores). No timing
assertions (shared, noisy machines)."""
import json
import math

import pytest

import lm.nn.moe  # noqa: F401  (registers ffn "moe" until lm.models.block imports it)
from lm.bench import BENCHMARKS
from lm.bench import main as bench_main
from lm.bench.moe import configs, param_counts, run
from lm.models import DecoderLM

KEYS = ["moe.top1_vs_dense_active", "moe.top2_vs_dense_active", "moe.top1_vs_dense_active_fwd",
        "moe.top2_vs_dense_active_fwd",
        *(f"moe.{k}.{n}" for k in ("tokens_per_s", "tokens_per_s_fwd", "params", "active_params")
          for n in ("dense1", "top1", "dense2", "top2"))]
EP_KEYS = ["moe.ep2_vs_local", "moe.ep2.tokens_per_s.local", "moe.ep2.tokens_per_s.ep2"]


@pytest.fixture(autouse=True)
def lm_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_CACHE", str(tmp_path / "cache"))


def check(d: dict, keys=KEYS) -> None:
    missing = [k for k in keys if k not in d]
    assert not missing, missing
    bad = {k: v for k, v in d.items() if not (isinstance(v, float) and math.isfinite(v) and v > 0)}
    assert not bad, bad


def test_bench_moe_quick_in_process():
    lines = []
    d = run(quick=True, device="cpu", out=lines.append, ep=False)
    check(d)
    assert not any(k in d for k in EP_KEYS)
    assert any("top2 / dense" in ln for ln in lines)
    # the MoE models have ~8x the FFN parameters but the active count of their dense twin (+ router)
    assert d["moe.params.top2"] > 2 * d["moe.params.dense2"]
    assert abs(d["moe.active_params.top1"] - d["moe.active_params.dense1"]) <= 2 * 8 * 32
    assert abs(d["moe.active_params.top2"] - d["moe.active_params.dense2"]) <= 2 * 8 * 32


def test_param_counts_exclude_inactive_experts():
    cfgs = configs(dict(vocab_size=64, dim=16, num_layers=1, num_heads=2, max_seq_len=8), hidden=16)
    total, active = param_counts(DecoderLM(cfgs["top2"]))
    expert = 3 * 16 * 16
    assert total - active == 6 * expert


@pytest.mark.skipif("moe" not in BENCHMARKS, reason='register "moe": _lazy("lm.bench.moe") in lm/bench/__init__.py')
@pytest.mark.slow
def test_bench_moe_through_the_registry(tmp_path):
    path = tmp_path / "moe.json"
    assert bench_main(["moe", "--quick", "--device", "cpu", "--json", str(path)]) == 0
    d = json.loads(path.read_text())
    check({k: float(v) for k, v in d.items()}, KEYS + EP_KEYS)
    assert "moe.wall_s" in d
