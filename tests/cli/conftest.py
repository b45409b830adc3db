from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "fixtures" / "tiny.yaml")


@pytest.fixture(scope="session")
def lm_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("lm_cache")
    env = dict(os.environ, LM_CACHE=str(cache), HF_HOME=str(cache / "hf"), WANDB_MODE="offline",
               WANDB_DIR=str(cache / "wandb"), TMPDIR=str(cache), PYTHONUNBUFFERED="1")
    env.pop("LM_TRACEBACK", None)
    return env


@pytest.fixture(scope="session")
def run_lm(lm_env):
    def run(*args, check=True, timeout=300):
        proc = subprocess.run([sys.executable, "-m", "lm.cli", *map(str, args)], cwd=ROOT, env=lm_env,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"lm {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc
    return run
