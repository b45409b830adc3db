"""``lm bench scaling --quick``: real 1- and 2-process torchrun launches of DDP, FSDP2 and ZeRO-2 on
the tiny model; every figure exists, is finite and positive. No timing assertions (shared machines):
the 2v1 ratios are only checked to be in a sane range (a broken launch shows as 0 or an error)."""
import json
import math

import pytest

from lm.cli import main as cli_main

KEYS = [f"scaling.{s}{k}" for s in ("ddp", "fsdp2", "zero2")
        for k in ("_2v1", ".tokens_per_s_1", ".tokens_per_s_2", ".comm_ms", ".comm_share")]


@pytest.mark.slow
def test_quick_scaling_writes_flat_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # torchrun leaves torchelastic_* folders in TMPDIR
    out = tmp_path / "scaling.json"
    assert cli_main(["bench", "scaling", "--quick", "--threads", "2", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    missing = [k for k in KEYS if k not in d]
    assert not missing, missing
    bad = {k: v for k, v in d.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
    assert not bad, bad
    for s in ("ddp", "fsdp2", "zero2"):
        assert 0.05 < d[f"scaling.{s}_2v1"] < 4, d  # 2 processes of the same work: between "broken" and "ideal x2"
    assert d["scaling.threads_per_process"] == 1
    assert "scaling: tokens/s" in capsys.readouterr().out
