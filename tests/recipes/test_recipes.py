"""Every recipe parses and builds; GPU sizes build on the meta device. Headers state what they reproduce."""
from __future__ import annotations

import glob
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(Path(p).relative_to(ROOT)) for p in glob.glob(str(ROOT / "recipes" / "**" / "*.yaml"), recursive=True))
GPU_ON_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
              "--trainer.precision=32-true"]


def test_recipes_found():
    assert "recipes/quickstart.yaml" in RECIPES
    for name in ("mha", "gqa", "mqa", "sliding_window"):
        assert f"recipes/attention/{name}.yaml" in RECIPES
        assert f"recipes/attention/{name}.gpu.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds(recipe, tmp_path, monkeypatch):
    from lm.training.recipe import build_recipe

    monkeypatch.chdir(ROOT)
    gpu = recipe.endswith(".gpu.yaml")
    cli = build_recipe(recipe, [*(GPU_ON_CPU if gpu else []), "--trainer.logger=false",
                                f"--trainer.default_root_dir={tmp_path}"], meta=gpu)
    params = list(cli.model.parameters())
    assert params and all(p.device.type == ("meta" if gpu else "cpu") for p in params)
    assert cli.model.config.vocab_size >= cli.datamodule._vocab_size


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.endswith(".gpu.yaml")])
def test_recipe_header(recipe):
    header = [ln for ln in (ROOT / recipe).read_text().splitlines() if ln.startswith("#")]
    text = "\n".join(header)
    assert "Reproduces" in text and "Expected CPU result" in text and "Run:" in text, recipe
    assert "EXPECTED_" not in text, f"{recipe}: expected result not filled in"
