"""``lm launch`` on a real SLURM cluster: 2 srun tasks on 1 node (DDP over gloo), requeue, pre-timeout.

* The quickstart recipe (shortened by overrides) runs as a 2-task job and leaves its checkpoint.
* ``scontrol requeue`` of a running job: SLURM sends SIGTERM (SIGKILL after KillWait=5 s); the
  tasks write the preemption checkpoint at the next step boundary; the requeued run resumes from it.
  The periodic checkpoint is set beyond the run's length, so only that checkpoint can make the
  steps continue: a lost or repeated step shows in the loss recorder (every step of every rank) and
  in the CSV logs of the two runs. W&B (offline) logs both runs under the id kept in the run folder.
* The pre-timeout signal (``--signal=B:USR1@90`` in the template; here sent at once with ``scancel
  --signal=USR1 --batch``): the batch shell forwards it to the tasks, they checkpoint and exit, and
  the job requeues itself.
A requeued job waits in PENDING (BeginTime) ~120 s; the tests start it with ``StartTime=now``.
"""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.distributed.helpers import recorded, write_recipe
from tests.slurm.conftest import job_info, launch, start_now_once_pending, wait_done, wait_for

pytestmark = pytest.mark.slow

STEPS = 60  # of the tiny recipe: a few seconds of training, so a signal lands mid-run
QUICKSTART_SHORT = ["--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=1",
                    "--data.batch_size=2", "--data.val_batches=1", "--data.max_bytes=600000"]


def csv_steps(run: Path) -> list[int]:
    """Logged train steps of all CSV versions (one per run of the job), in order."""
    steps = []
    for f in sorted(run.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        steps += [int(r["step"]) for r in csv.DictReader(f.open()) if r.get("train/loss")]
    return steps


def tiny_recipe(tmp: Path, run: Path, wandb: bool = False) -> Path:
    path = write_recipe(tmp / "recipe.yaml", STEPS, every=10 * STEPS)  # no periodic checkpoint mid-run
    if wandb:
        cfg = yaml.safe_load(path.read_text())
        cfg["trainer"]["logger"] = [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run), "name": "logs"}},
            {"class_path": "lightning.pytorch.loggers.WandbLogger",
             "init_args": {"save_dir": str(run), "offline": True, "project": "lm-slurm-test"}},
        ]
        path.write_text(yaml.safe_dump(cfg))
    return path


def signal_mid_run(job_id: str, run: Path, send: list[str]) -> None:
    losses = run / "losses.rank0.jsonl"

    def trained_5_steps() -> bool:
        state = job_info(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING"), f"job {job_id} is {state} before the signal:\n" + \
            (run / f"slurm-{job_id}.out").read_text()[-3000:]
        return losses.exists() and len(losses.read_text().splitlines()) >= 5

    wait_for(trained_5_steps, 240, f"job {job_id} to train 5 steps")
    subprocess.run([*send, job_id], check=True, capture_output=True)


def assert_continuous(run: Path, log: str, sig: str) -> None:
    per_rank = recorded(run)  # asserts that no rank records a step twice
    assert sorted(per_rank) == [0, 1]
    for rank, steps in per_rank.items():
        assert sorted(steps) == list(range(STEPS)), f"rank {rank} trained steps {sorted(steps)}"
    logged = csv_steps(run)
    assert logged == list(range(STEPS)), f"logged steps {logged}"
    assert f"lm: preempted ({sig}): checkpoint of step" in log and "hpc_ckpt_1.ckpt" in log
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == STEPS


def test_quickstart_two_tasks_completes(slurm, tmp_path):
    run = tmp_path / "run"
    job = launch(["recipes/quickstart.yaml", "--nodes", "1", "--devices-per-node", "2", "--cluster", "local",
                  "--time", "00:10:00", "--run-dir", run, *QUICKSTART_SHORT], tmp_path)
    wait_done(job, run / f"slurm-{job}.out", timeout=420)
    log = (run / f"slurm-{job}.out").read_text()
    assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log, log[-3000:]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert (run / "job.sbatch").read_text().count("#SBATCH --ntasks-per-node=2") == 1


def test_scontrol_requeue_resumes_without_lost_or_repeated_steps(slurm, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(tmp_path, run, wandb=True)
    job = launch([recipe, "--devices-per-node", "2", "--time", "00:10:00", "--run-dir", run], tmp_path)
    signal_mid_run(job, run, ["scontrol", "requeue"])
    start_now_once_pending(job)
    info = wait_done(job, run / f"slurm-{job}.out")
    log = (run / f"slurm-{job}.out").read_text()
    assert info["Restarts"] == "1"
    assert_continuous(run, log, "SIGTERM")
    run_id = (run / "wandb_run_id").read_text().strip()
    wandb_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in wandb_runs), wandb_runs


def test_pre_timeout_signal_checkpoints_and_requeues_itself(slurm, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(tmp_path, run)
    job = launch([recipe, "--devices-per-node", "2", "--time", "00:10:00", "--run-dir", run], tmp_path)
    assert "#SBATCH --signal=B:USR1@90" in (run / "job.sbatch").read_text()
    signal_mid_run(job, run, ["scancel", "--signal=USR1", "--batch"])
    start_now_once_pending(job)
    info = wait_done(job, run / f"slurm-{job}.out")
    log = (run / f"slurm-{job}.out").read_text()
    assert info["Restarts"] == "1" and f"lm: requeueing job {job}" in log and "requeue requested" in log
    assert_continuous(run, log, "SIGUSR1")
    assert job_info(job)["JobState"] == "COMPLETED" and not (run / "requeue.request").exists()
