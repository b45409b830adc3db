"""A real single-node SLURM cluster for the tests of this folder (``slurm/local/up.sh``).

The cluster is brought up once per session and stopped at its end, unless it was already running
(then it is left as found). Where it cannot run -- not root, or neither slurm nor apt-get present --
every test here is skipped with the reason. Jobs inherit this process's environment (sbatch's
default ``--export=ALL``): the hermetic caches of tests/conftest.py, ``OMP_NUM_THREADS=1`` and the
repository on ``PYTHONPATH`` (for the loss recorder callback of tests/distributed/helpers.py).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREFIX = Path(os.environ.get("LM_SLURM_PREFIX", "/tmp/lm-slurm"))
CONF = PREFIX / "slurm.conf"


def _unavailable() -> str | None:
    if sys.platform != "linux":
        return "the local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurm/local/up.sh runs the daemons as root)"
    if not (shutil.which("sbatch") and shutil.which("slurmctld")) and not shutil.which("apt-get"):
        return "neither slurm (sbatch, slurmctld) nor apt-get to install it is available"
    return None


def _alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def slurm():
    """``SLURM_CONF`` of a running cluster; the environment of the test session points at it."""
    why = _unavailable()
    if why:
        pytest.skip(why)
    was_up = _alive(PREFIX / "slurmctld.pid") and _alive(PREFIX / "slurmd.pid")
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "local" / "up.sh")], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, LM_SLURM_PREFIX=str(PREFIX)))
    if proc.returncode != 0:
        pytest.fail(f"slurm/local/up.sh failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(CONF)
    yield str(CONF)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if not was_up:
        subprocess.run(["bash", str(ROOT / "slurm" / "local" / "down.sh")], capture_output=True, timeout=120,
                       env=dict(os.environ, LM_SLURM_PREFIX=str(PREFIX)))


def job_env(tmp: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", TMPDIR=str(tmp),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.pop("LM_TRACEBACK", None)
    return env


def launch(args: list, tmp: Path) -> str:
    """``lm launch ARGS`` (submits); returns the job id."""
    proc = subprocess.run([sys.executable, "-m", "lm.cli", "launch", *map(str, args)], cwd=ROOT,
                          env=job_env(tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lm launch failed:\n{proc.stderr[-3000:]}"
    m = re.search(r"submitted job (\d+)", proc.stdout)
    assert m, proc.stdout
    return m.group(1)


def job_info(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(cond, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_now_once_pending(job_id: str, timeout: float = 120) -> None:
    """A requeued job waits ~120 s in PENDING (BeginTime); once it is pending, start it now."""
    wait_for(lambda: job_info(job_id).get("JobState") == "PENDING", timeout, f"job {job_id} to be requeued")
    # slurmd revokes the old run's credential with a whole-second timestamp and refuses a new launch
    # whose credential falls in that same second ("Job credential revoked", the job ends FAILED):
    # the default ~120 s BeginTime never meets it, starting "now" can. Let the second pass first.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, capture_output=True)


def wait_done(job_id: str, log: Path, timeout: float = 300) -> dict[str, str]:
    info = wait_for(lambda: (i := job_info(job_id)).get("JobState") in
                    ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and i,
                    timeout, f"job {job_id} to finish")
    text = log.read_text() if log.exists() else "(no log)"
    assert info["JobState"] == "COMPLETED", f"job {job_id} ended {info['JobState']}:\n{text[-4000:]}"
    return info
