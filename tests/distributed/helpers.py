"""Helpers of the distributed tests: a derived tiny recipe, a per-rank loss/batch recorder, readers.

``LossRecorder`` is a Lightning callback the runs load by class path
(``tests.distributed.helpers.LossRecorder``; the subprocesses run with the repository root on
``PYTHONPATH``). Lightning's CSV logger only has rank 0's loss; the recorder writes every rank's
loss and input rows per step to ``ROOT/losses.rank<r>.jsonl``, so a test can average the ranks and
check which samples each rank saw.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "fixtures" / "tiny.yaml"
FIT_MANY = ROOT / "tests" / "distributed" / "scripts" / "fit_many.py"


class LossRecorder(L.Callback):
    """Appends ``{"step", "loss", "rows"}`` of every train batch to ``ROOT/losses.rank<r>.jsonl``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        path = Path(trainer.default_root_dir) / f"losses.rank{trainer.global_rank}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step - 1, "loss": float(loss),
                                "rows": batch["input_ids"].tolist()}) + "\n")


def write_recipe(path: Path, steps: int, every: int) -> Path:
    """tiny.yaml for ``steps`` steps, no validation or sampling, a kept checkpoint every ``every``
    steps (``epoch=0-step=N.ckpt``) plus ``last.ckpt``, and the recorder."""
    cfg = yaml.safe_load(TINY.read_text())
    tr = cfg["trainer"]
    tr.update(max_steps=steps, limit_val_batches=0, val_check_interval=None, num_sanity_val_steps=0)
    tr.pop("check_val_every_n_epoch", None)
    tr["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": every, "save_top_k": -1, "save_last": True}},
        {"class_path": "tests.distributed.helpers.LossRecorder"},
    ]
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(tmp: Path) -> dict:
    """The environment of the subprocesses: repository on PYTHONPATH, TMPDIR in the test folder
    (torchrun leaves torchelastic_* folders there), hermetic caches from tests/conftest.py."""
    tmp.mkdir(parents=True, exist_ok=True)
    e = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1", WANDB_MODE="offline",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    e.pop("LM_TRACEBACK", None)
    return e


def run(cmd: list, tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env(tmp), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def lm_fit(args: list, tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``lm fit ARGS`` as a subprocess (with ``--trainer.devices=2`` Lightning launches rank 1 itself)."""
    return run([sys.executable, "-m", "lm.cli", "fit", *args], tmp, timeout)


def fit_many(jobs: list[dict], tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Several ``lm fit`` runs in one ``torchrun --nproc_per_node=2`` launch (start-up paid once);
    a job is ``{"args": [...], "rc": expected exit status, "log": optional stderr path prefix}``."""
    jobs_file = tmp / "jobs.json"
    tmp.mkdir(parents=True, exist_ok=True)
    jobs_file.write_text(json.dumps([{**j, "args": ["fit", *map(str, j["args"])],
                                      **({"log": str(j["log"])} if j.get("log") else {})} for j in jobs]))
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                FIT_MANY, jobs_file], tmp, timeout)


def recorded(root: Path) -> dict[int, dict[int, dict]]:
    """``{rank: {step: {"loss", "rows"}}}`` from a run folder."""
    out: dict[int, dict[int, dict]] = {}
    for f in sorted(root.glob("losses.rank*.jsonl")):
        rank = int(f.name.split("rank")[1].split(".")[0])
        steps = out.setdefault(rank, {})
        for line in f.read_text().splitlines():
            r = json.loads(line)
            assert r["step"] not in steps, f"{f}: step {r['step']} recorded twice"
            steps[r["step"]] = r
    return out


def csv_losses(root: Path) -> dict[int, float]:
    """Rank 0's logged ``train/loss`` per step (Lightning's CSV logger)."""
    out = {}
    for f in sorted(root.glob("logs/version_*/metrics.csv")):
        for r in csv.DictReader(f.open()):
            if r.get("train/loss"):
                out[int(r["step"])] = float(r["train/loss"])
    return out
