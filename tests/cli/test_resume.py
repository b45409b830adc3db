"""Resume exactness, NaN stop and bad input through the real CLI.

A run killed with SIGKILL and resumed from ``last.ckpt`` logs the same losses at every later step
as an uninterrupted run with the same seed.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli.conftest import ROOT, TINY

STEPS = 40


def recipe_with_periodic_ckpt(tmp: Path, **trainer) -> Path:
    cfg = yaml.safe_load(Path(TINY).read_text())
    cfg["trainer"].update(max_steps=STEPS, val_check_interval=20, **trainer)
    cfg["trainer"]["callbacks"] = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                    "init_args": {"every_n_train_steps": 1, "save_last": True}}]
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(root: Path) -> dict[int, float]:
    out = {}
    for f in sorted(root.glob("logs/version_*/metrics.csv")):
        for r in csv.DictReader(f.open()):
            if r.get("train/loss"):
                step = int(r["step"])
                assert step not in out, f"step {step} logged twice"
                out[step] = float(r["train/loss"])
    return out


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, run_lm, lm_env):
    recipe = recipe_with_periodic_ckpt(tmp_path)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_lm("fit", "-c", recipe, f"--trainer.default_root_dir={ref}")

    proc = subprocess.Popen([sys.executable, "-m", "lm.cli", "fit", "-c", str(recipe),
                             f"--trainer.default_root_dir={cut}"], cwd=ROOT, env=lm_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = cut / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["global_step"] >= 5:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["global_step"]  # atomic writes: always loadable
    assert 0 < killed_at < STEPS

    run_lm("fit", "-c", recipe, f"--trainer.default_root_dir={cut}", "--ckpt_path=last")
    ref_losses, cut_losses = losses(ref), losses(cut)
    assert sorted(ref_losses) == list(range(STEPS)), "reference logs every step once"
    # after the resume point the two runs log the same losses at the same steps
    later = [s for s in ref_losses if s >= killed_at]
    assert later and all(s in cut_losses for s in later)
    torch.testing.assert_close(torch.tensor([cut_losses[s] for s in later]),
                               torch.tensor([ref_losses[s] for s in later]), rtol=0, atol=1e-6)
    assert torch.load(last, weights_only=True)["global_step"] == STEPS


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, run_lm):
    recipe = recipe_with_periodic_ckpt(tmp_path, gradient_clip_val=None)
    proc = run_lm("fit", "-c", recipe, f"--trainer.default_root_dir={tmp_path}", "--model.optim.lr=1e30",
                  "--model.optim.warmup_steps=0", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("lm: error: non-finite training loss") and "at step" in line
    step = int(line.split("at step ")[1].split(";")[0])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == step  # the checkpoint of the last finished step is intact


BAD = [
    (["--model.config.dimm=3"], "model.config.dimm: unknown key"),
    (["--model.config.dim=abc"], "model.config.dim"),
    (["--model.config.dim=30"], "model.config.dim: 30 is not divisible by num_heads=4"),
    (["--model.config.num_kv_heads=3"], "model.config.num_kv_heads"),
    (["--model.config.mixer=nope"], "unknown mixer 'nope'"),
    (["--model.config.mixer_options={windw: 3}"], "windw: unknown option"),
    (["--data.sources=[/does/not/exist]"], "data.sources: '/does/not/exist' does not exist"),
    (["--trainer.nope=1"], "trainer.nope: unknown key"),
]


@pytest.mark.parametrize("extra,expected", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_one_line_error(extra, expected, tmp_path, capsys, monkeypatch, lm_env):
    from lm.cli import main

    for k in ("LM_CACHE", "HF_HOME"):
        monkeypatch.setenv(k, lm_env[k])
    monkeypatch.delenv("LM_TRACEBACK", raising=False)
    rc = main(["fit", "-c", TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("lm: error: ") and expected in err[-1], err[-3:]


def test_empty_data_folder(tmp_path, capsys, monkeypatch, lm_env):
    from lm.cli import main

    monkeypatch.setenv("LM_CACHE", lm_env["LM_CACHE"])
    (tmp_path / "empty").mkdir()
    rc = main(["fit", "-c", TINY, f"--data.sources=[{tmp_path / 'empty'}]", "--trainer.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "data.sources" in err and "empty" in err


def test_checkpoint_of_other_architecture(tmp_path, run_lm):
    run_lm("fit", "-c", TINY, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1")
    proc = run_lm("fit", "-c", TINY, f"--trainer.default_root_dir={tmp_path}", "--model.config.num_layers=3",
                  "--model.config.dim=64", "--ckpt_path=last", check=False)
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "does not match the model architecture" in line
    assert "missing: model.blocks.2" in line and "shape mismatch: model." in line
