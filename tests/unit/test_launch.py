"""``lm launch``: the rendered sbatch script, the torchrun command, bad input, resume selection, and
the preemption callback in a real (single-process) ``lm fit``.

Rendering goes through ``lm.cli.main`` with ``--dry-run`` (the recipe really is parsed and built on
the meta device); the script must pass ``bash -n``. Every bad input fails with one ``lm: error:``
line and leaves no run folder. Submission on a real cluster is tests/slurm.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lm.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "fixtures" / "tiny.yaml")
QUICKSTART = str(ROOT / "recipes" / "quickstart.yaml")
GPU_PROFILE = ROOT / "launch" / "example-gpu.yaml"


def launch(capsys, *args) -> tuple[int, str, str]:
    rc = main(["launch", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_render_cpu_job_two_tasks(capsys, tmp_path):
    run = tmp_path / "run"
    rc, script, _ = launch(capsys, TINY, "--nodes", "2", "--devices-per-node", "2", "--cluster", "local",
                           "--time", "00:20:00", "--run-dir", run, "--trainer.max_steps=5", "--dry-run")
    assert rc == 0 and not run.exists(), "a dry run writes nothing"
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --time=00:20:00", "#SBATCH --signal=B:USR1@90", "#SBATCH --requeue",
                 "#SBATCH --partition=debug", f"#SBATCH --output={run}/slurm-%j.out", "#SBATCH --open-mode=append"):
        assert line in script.splitlines(), line
    assert "--gres" not in script and "srun " in script and "export MASTER_ADDR=" in script
    for flag in ("--trainer.max_steps=5", "--trainer.num_nodes=2", "--trainer.devices=2",
                 "--trainer.accelerator=cpu", f"--trainer.default_root_dir={run}", "--ckpt_path=auto"):
        assert flag in script, flag
    assert "{{" not in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_render_gpu_profile(capsys, tmp_path):
    rc, script, _ = launch(capsys, QUICKSTART, "--cluster", GPU_PROFILE, "--nodes", "4", "--account", "other",
                           "--run-dir", tmp_path / "run", "--dry-run")
    assert rc == 0
    lines = script.splitlines()
    # devices per node default to the profile's GPUs; CPUs are split among the node's tasks
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gres=gpu:8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --account=other", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --exclusive", "#SBATCH --mem=0",
                 "module load cuda/12.4", "export NCCL_ASYNC_ERROR_HANDLING=1"):
        assert line in lines, line
    assert "--trainer.accelerator=gpu" in script and "--trainer.devices=8" in script
    assert "--trainer.num_nodes=4" in script and "    python -m lm.cli fit -c" in script


def test_local_dry_run_is_torchrun(capsys, tmp_path):
    rc, out, _ = launch(capsys, "--local", "--nproc", "2", TINY, "--trainer.max_steps=3", "--run-dir",
                        tmp_path / "r", "--dry-run")
    assert rc == 0
    assert "-m torch.distributed.run --standalone --nproc_per_node=2 -m lm.cli fit -c" in out
    assert "--trainer.devices=2" in out and "--trainer.num_nodes=1" in out and "--ckpt_path=auto" in out


def test_global_batch_size_sets_per_rank_batch(capsys, tmp_path):
    rc, script, _ = launch(capsys, TINY, "--devices-per-node", "2", "--global-batch-size", "8",
                           "--run-dir", tmp_path / "r", "--dry-run")
    assert rc == 0 and "--data.batch_size=4" in script


BAD = [
    (["--trainer.strategy=nope"], "trainer.strategy: unknown strategy 'nope'"),
    (["--trainer.strategy=fsdp2", "--devices-per-node", "2", "--nodes", "1", "--global-batch-size", "5"],
     "--global-batch-size: 5 is not divisible by the world size 2"),
    (["--nodes", "0"], "--nodes: must be at least 1, got 0"),
    (["--devices-per-node", "0"], "--devices-per-node: must be at least 1"),
    (["--devices-per-node", "3"], "profile local has 2 CPUs per node"),
    (["--cluster", "nosuchcluster"], "--cluster: no profile 'nosuchcluster'"),
    (["--time", "90"], "--time: '90' is not [D-]HH:MM:SS"),
    (["--time", "00:01:00"], "not longer than the pre-timeout signal"),
    (["--trainer.devices=4"], "--trainer.devices: derived from --nodes"),
    (["--ckpt_path=last"], "--ckpt_path: lm launch always resumes"),
    (["--model.config.dim=30"], "model.config.dim"),
    (["--trainer.nope=1"], "trainer.nope: unknown key"),
    (["--nproc", "2"], "--nproc: only with --local"),
    (["--bogus"], "bogus: unknown key"),  # neither a launch flag nor a recipe key
]


@pytest.mark.parametrize("extra,expected", BAD, ids=[b[1][:32] for b in BAD])
def test_bad_input_one_line_before_anything_is_written(extra, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("LM_TRACEBACK", raising=False)
    run = tmp_path / "run"
    rc, out, err = launch(capsys, TINY, "--run-dir", run, *extra, "--dry-run")
    lines = err.strip().splitlines()
    assert rc == 2 and lines and lines[-1].startswith("lm: error: ") and expected in lines[-1], err[-800:]
    assert not run.exists() and not out


def test_missing_sbatch(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here; dry runs and --local do not need it
    run = tmp_path / "run"
    rc, _, err = launch(capsys, TINY, "--devices-per-node", "2", "--run-dir", run)
    assert rc == 2 and err.strip().splitlines()[-1].startswith("lm: error: sbatch not found on PATH")
    assert not run.exists()


def test_profiles_parse_and_reject_unknown_keys(tmp_path):
    from lm.launch.job import LaunchError, available_profiles, load_profile

    assert {"local", "example-gpu"} <= set(available_profiles())
    assert load_profile("local").gpus_per_node == 0 and load_profile("example-gpu").gpus_per_node == 8
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition: x\ngpus: 4\n")
    with pytest.raises(LaunchError, match="unknown key 'gpus'"):
        load_profile(str(bad))


def test_resume_picks_newest_of_last_and_hpc(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lm.launch.preempt import resolve_resume

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    trainer = SimpleNamespace(default_root_dir=str(tmp_path),
                              checkpoint_callbacks=[ModelCheckpoint(dirpath=str(ckpts), save_last=True)])
    assert resolve_resume(trainer) is None
    now = time.time()

    def touch(path: Path, age: float) -> Path:
        path.write_bytes(b"x")
        os.utime(path, (now - age, now - age))
        return path

    last = touch(ckpts / "last.ckpt", 30)
    touch(tmp_path / "hpc_ckpt_1.ckpt", 60)
    assert resolve_resume(trainer) == str(last)
    hpc2 = touch(tmp_path / "hpc_ckpt_2.ckpt", 10)
    touch(tmp_path / ".hpc_ckpt_3.ckpt.abc.tmp", 0)  # a save killed midway is never picked
    touch(ckpts / ".last.ckpt.tmp", 0)
    assert resolve_resume(trainer) == str(hpc2)


class SignalAt(L.Callback):
    """Sends ``signal`` to its own process after optimizer step ``step`` (used by the test below)."""

    def __init__(self, step: int = 3, signal: str = "SIGUSR1"):
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and not Path(trainer.default_root_dir, "signalled").exists():
            Path(trainer.default_root_dir, "signalled").touch()
            os.kill(os.getpid(), getattr(signal, self.signal))


def _csv_steps(run: Path) -> list[int]:
    steps = []
    for f in sorted(run.glob("logs/version_*/metrics.csv")):
        steps += [int(r["step"]) for r in csv.DictReader(f.open()) if r.get("train/loss")]
    return steps


@pytest.mark.slow
def test_sigterm_checkpoints_at_step_boundary_and_resume_continues(tmp_path):
    """SIGTERM (the USR1 path differs only in asking SLURM for a requeue: tests/slurm)."""
    sig = "SIGTERM"
    env = dict(os.environ, LM_PREEMPTION="1", PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    for k in ("SLURM_JOB_ID", "LM_TRACEBACK"):
        env.pop(k, None)
    run = tmp_path / "run"
    args = [sys.executable, "-m", "lm.cli", "fit", "-c", TINY, "--trainer.max_steps=8",
            "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={run}", "--ckpt_path=auto",
            "--trainer.callbacks+=tests.unit.test_launch.SignalAt", f"--trainer.callbacks.signal={sig}"]
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"lm: preempted ({sig}): checkpoint of step 3" in first.stderr
    assert torch.load(run / "hpc_ckpt_1.ckpt", weights_only=True)["global_step"] == 3
    assert not (run / "requeue.request").exists()  # outside SLURM nothing asks for a requeue
    assert _csv_steps(run) == [0, 1, 2]
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in second.stderr  # "Restoring states from the checkpoint path at ..."
    assert _csv_steps(run) == list(range(8))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
