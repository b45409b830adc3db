"""recipes/moe: shortened runs of every recipe (a few steps, in-process, through the real CLI),
equal active parameters across the comparison, the ablation pairs differ only where they should,
the documented overrides parse, and bad MoE options fail at build naming the key."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml

import lm.nn.moe
from lm.bench.moe import param_counts
from lm.models import DecoderConfig, DecoderLM

ROOT = Path(__file__).resolve().parents[2]
MOE = ROOT / "recipes" / "moe"
NAMES = ["dense_baseline", "switch_top1", "mixtral_top2", "balance_alpha0", "balance_alpha1e-2"]
SHORT = ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
         "--data.init_args.max_bytes=200000", "--data.init_args.num_proc=1", "--data.init_args.val_batches=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def recipe(name: str) -> dict:
    return yaml.safe_load((MOE / f"{name}.yaml").read_text())


def model_config(name: str) -> DecoderConfig:
    return DecoderConfig(**recipe(name)["model"]["init_args"]["config"])


def metrics(root: Path) -> list[dict]:
    return [r for f in sorted(root.glob("logs/version_*/metrics.csv")) for r in csv.DictReader(f.open())]


def test_recipes_present():
    assert {p.stem for p in MOE.glob("*.yaml")} >= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_shortened_recipe_runs(name, tmp_path, monkeypatch):
    from lm.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["fit", "-c", f"recipes/moe/{name}.yaml", f"--trainer.default_root_dir={tmp_path}", *SHORT]) == 0
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    rows = metrics(tmp_path)
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss") for r in rows)
    if name == "dense_baseline":
        return
    keys = set(rows[0])
    assert {"moe/cv", "moe/dropped", "train/moe_z_loss"} <= keys
    assert ("train/moe_aux_loss" in keys) == (name != "balance_alpha0")
    layers = {int(m.group(1)) for k in keys if (m := re.match(r"moe/layer(\d+)/cv", k))}
    cfg = model_config(name)
    assert layers == {i for i in range(cfg.num_layers) if cfg.layer(i).ffn == "moe"}
    assert (tmp_path / "expert_load.png").stat().st_size > 2000 and (tmp_path / "expert_load.csv").exists()


def test_comparison_has_equal_active_parameters():
    dense, switch, mixtral = (param_counts(DecoderLM(model_config(n))) for n in NAMES[:3])
    routers = {n: sum(8 * 128 for i in range(4) if model_config(n).layer(i).ffn == "moe") for n in NAMES[1:3]}
    assert switch[1] == dense[1] + routers["switch_top1"]
    assert mixtral[1] == dense[1] + routers["mixtral_top2"]
    assert switch[0] > 2 * dense[0] and mixtral[0] > 2 * dense[0]  # many more parameters in total
    for n in NAMES:
        assert recipe(n)["data"] == recipe("dense_baseline")["data"]
        assert recipe(n)["seed_everything"] == recipe("dense_baseline")["seed_everything"]
        assert recipe(n)["trainer"]["max_steps"] == recipe("dense_baseline")["trainer"]["max_steps"]
        assert recipe(n)["model"]["init_args"]["optim"] == recipe("dense_baseline")["model"]["init_args"]["optim"]


def test_balance_ablation_differs_only_in_alpha():
    a0, a1 = recipe("balance_alpha0"), recipe("balance_alpha1e-2")
    o0 = a0["model"]["init_args"]["config"].pop("ffn_options")
    o1 = a1["model"]["init_args"]["config"].pop("ffn_options")
    assert (o0.pop("balance_alpha"), o1.pop("balance_alpha")) == (0.0, 1.0e-2)
    assert o0 == o1 and a0 == a1
    assert recipe("balance_alpha1e-2")["model"] == recipe("switch_top1")["model"]


def _header_overrides(name: str) -> list[str]:
    text = (MOE / f"{name}.yaml").read_text()
    return re.findall(r"(--model\.init_args\.config\.ffn_options\.\w+=\S+)", text)


@pytest.mark.parametrize("name", ["switch_top1", "mixtral_top2"])
def test_documented_capacity_overrides_parse(name, monkeypatch):
    from lm.training.recipe import build_recipe

    monkeypatch.chdir(ROOT)
    overrides = _header_overrides(name)
    assert overrides
    for o in overrides:
        cli = build_recipe(f"recipes/moe/{name}.yaml", [o, "--trainer.logger=false"])
        value = float(o.split("=")[1])
        moes = [b.ffn for b in cli.model.model.blocks if isinstance(b.ffn, lm.nn.moe.MoE)]
        assert moes and all(m.capacity_factor == value for m in moes)


def test_bad_moe_option_in_a_recipe_names_the_key(monkeypatch, capsys):
    from lm.cli import main

    monkeypatch.chdir(ROOT)
    rc = main(["fit", "-c", "recipes/moe/mixtral_top2.yaml", "--model.init_args.config.ffn_options.top_k=9",
               "--trainer.logger=false"])
    assert rc == 2
    assert "model.config.ffn_options.top_k" in capsys.readouterr().err
