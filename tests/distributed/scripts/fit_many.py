"""Runs several ``lm fit`` command lines one after another in every process of one torchrun launch.

``python -m torch.distributed.run --standalone --nproc_per_node=2 fit_many.py JOBS.json`` where
JOBS.json is a list of ``{"args": ["fit", "-c", RECIPE, "--trainer.strategy=fsdp2", ...], "rc": 0}``
(optionally ``"log": PATH``: the job's stderr goes to ``PATH.rank<r>``).
Each job is the real ``lm`` CLI (``lm.cli.main``) with the real strategy; Lightning sees torchrun's
environment and reuses its process group, so the process start-up (~10 s of imports per process
on loaded cores) is paid once for all runs instead of once per run. A job whose exit status is not
its expected ``rc`` stops the launch with status 1. Jobs expected to fail go last.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from lm.cli import main
from lm.parallel.worker import exit_worker, start_worker


def run(jobs_file: str) -> int:
    jobs = json.loads(open(jobs_file).read())
    del sys.argv[1:]  # each job is its own command line
    for job in jobs:
        t = time.time()
        with contextlib.ExitStack() as stack:
            if job.get("log"):
                f = stack.enter_context(open(f"{job['log']}.rank{os.environ.get('RANK', '0')}", "w"))
                stack.enter_context(contextlib.redirect_stderr(f))
            rc = main(list(job["args"]))
        print(f"[fit_many] rc={rc} (expected {job['rc']}) {time.time() - t:.1f}s: {' '.join(job['args'])}",
              file=sys.stderr, flush=True)
        if rc != job["rc"]:
            return 1
    return 0


if __name__ == "__main__":
    start_worker()
    exit_worker(run(sys.argv[1]))
