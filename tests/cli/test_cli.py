"""End to end through the real CLI in subprocesses: fit -> generate -> export; W&B offline."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.cli.conftest import TINY


def read_metrics(root: Path) -> list[dict]:
    rows = []
    for f in sorted(root.glob("logs/version_*/metrics.csv")):
        rows += list(csv.DictReader(f.open()))
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_lm):
    root = tmp_path_factory.mktemp("run")
    proc = run_lm("fit", "-c", TINY, f"--trainer.default_root_dir={root}")
    return root, proc


def test_fit_writes_run_folder(trained):
    root, proc = trained
    assert (root / "checkpoints" / "last.ckpt").exists()
    rows = read_metrics(root)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert any(r.get("val/loss") for r in rows) and any(r.get("perf/tokens_per_s") for r in rows)
    assert "[lm] val/loss" in proc.stdout and "val/ppl" in proc.stdout and "[lm] sample: 'def " in proc.stdout
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)  # no pickled objects
    assert ckpt["global_step"] == 6 and ckpt["lm"]["tokenizer"] and ckpt["lm"]["config"]["dim"] == 32


def test_generate_and_export(trained, run_lm, tmp_path):
    root, _ = trained
    ckpt = root / "checkpoints" / "last.ckpt"
    out = run_lm("generate", ckpt, "--prompt", "import os", "--max-new-tokens", "6", "--seed", "0").stdout
    assert out.startswith("import os") and len(out) > len("import os")
    again = run_lm("generate", ckpt, "--prompt", "import os", "--max-new-tokens", "6", "--seed", "0").stdout
    assert again == out  # seeded sampling is reproducible
    run_lm("export", ckpt, "--to", "hf", "--out", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "tokenizer.json").exists()
    import lm

    model = lm.load_model(root)  # a run folder works too
    assert not model.training and model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 320)


def test_print_config_and_override(run_lm):
    out = run_lm("fit", "-c", TINY, "--model.config.num_kv_heads=1", "--print_config").stdout
    assert "num_kv_heads: 1" in out and "class_path: lm.training.module.LanguageModel" in out


def test_wandb_offline(run_lm, tmp_path, lm_env):
    pytest.importorskip("wandb")
    run_lm("fit", "-c", TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
           "--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.offline=true",
           f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.project=lm-test")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
