"""Every recipe of recipes/mixers/ runs a shortened version end to end (``build_recipe`` + the
recipe's own Trainer, in-process, 2 steps) and logs its metrics; headers carry the measured result."""
from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
import torch

from shortened import SHORT, SHORT_SYNTHETIC  # tests/recipes/shortened.py

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / "recipes" / "mixers" / "*.yaml"))
                 if not p.endswith(".gpu.yaml"))
SYNTHETIC = ["associative_recall_hyena", "associative_recall_rwkv", "induction_heads_mamba",
             "induction_heads_attention_abs", "selective_copying_mamba", "selective_copying_hyena",
             "selective_copying_attention"]
TEXT = ["mamba_lm", "rwkv_lm", "hybrid_lm", "dense_lm"]
SHORT_TEXT = ["--data.init_args.max_bytes=150000", "--data.init_args.vocab_size=320",
              "--model.init_args.config.vocab_size=320", "--data.init_args.seq_len=32",
              "--data.init_args.batch_size=4", "--data.init_args.val_batches=1", "--data.init_args.num_proc=1"]


def test_every_mixer_recipe_is_covered():
    names = {Path(r).stem for r in RECIPES}
    assert names == set(SYNTHETIC) | set(TEXT), names
    for name in names:  # each CPU recipe has its multi-GPU-node size beside it
        assert (ROOT / "recipes" / "mixers" / f"{name}.gpu.yaml").exists(), name


@pytest.mark.parametrize("recipe", RECIPES)
def test_header_names_the_paper_table_and_the_measurement(recipe):
    header = "\n".join(ln for ln in (ROOT / recipe).read_text().splitlines() if ln.startswith("#"))
    assert "Table" in header and "Expected CPU result" in header and "Run:" in header, recipe
    assert "EXPECTED_" not in header, f"{recipe}: measured result not filled in"
    assert re.search(r"\d+(\.\d+)? (s|min)\b", header), f"{recipe}: run time missing"


@pytest.mark.parametrize("name", SYNTHETIC + TEXT)
def test_recipe_runs_shortened(name, tmp_path, monkeypatch):
    from lm.training.recipe import build_recipe

    monkeypatch.chdir(ROOT)
    extra = SHORT_SYNTHETIC if name in SYNTHETIC else SHORT_TEXT
    cli = build_recipe(f"recipes/mixers/{name}.yaml", [*SHORT, *extra, f"--trainer.default_root_dir={tmp_path}"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    if name in SYNTHETIC:
        names = cli.datamodule.val_names
        assert len(names) >= 2 or name.startswith("selective_copying")  # length generalisation sets
        for n in names:
            acc = metrics[f"val/acc_{n}"]
            assert torch.isfinite(acc) and 0.0 <= float(acc) <= 1.0
    else:
        assert torch.isfinite(metrics["val/loss"])
