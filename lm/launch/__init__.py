"""``lm launch``: run a recipe on a SLURM cluster (sbatch) or on this machine (torchrun), unchanged.

    lm launch RECIPE [--key=value ...] --nodes N --devices-per-node D [--cluster PROFILE]
              [--partition P] [--account A] [--time HH:MM:SS] [--global-batch-size G]
              [--run-dir DIR] [--job-name NAME] [--dry-run]
    lm launch --local --nproc N RECIPE [--key=value ...] [--run-dir DIR] [--dry-run]

Recipe overrides use the ``--key=value`` form of ``lm fit``. The trainer's ``num_nodes``,
``devices`` and ``accelerator`` come from the launch arguments and the cluster profile
(``launch/PROFILE.yaml``; default ``$LM_CLUSTER`` or ``local``), never from the recipe. The job
trains into the run folder (``--run-dir``; default the recipe's ``trainer.default_root_dir`` or
``runs/<recipe>-<date>``) with ``--ckpt_path=auto``: launching again into the same folder, or a
requeue, resumes from its newest checkpoint. Every check (arguments, profile, ``sbatch`` on PATH,
recipe parse and build, strategy against world size) runs before anything is written or submitted.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from lm.launch.job import DERIVED_KEYS, Job, LaunchError, check_job, load_profile, local_profile

__all__ = ["main", "Job", "LaunchError", "DERIVED_KEYS"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through lm.cli, not argparse's usage + exit 2
        raise LaunchError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lm launch", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (as for lm fit -c)")
    where = p.add_argument_group("SLURM")
    where.add_argument("--nodes", type=int, default=1)
    where.add_argument("--devices-per-node", type=int, default=None,
                       help="tasks per node: GPUs, or CPU processes on a profile without GPUs "
                            "(default: the profile's GPUs per node, else 1)")
    where.add_argument("--cluster", default=os.environ.get("LM_CLUSTER", "local"),
                       help="profile name in launch/ or a YAML path (default $LM_CLUSTER or local)")
    where.add_argument("--partition")
    where.add_argument("--account")
    where.add_argument("--time", help="[D-]HH:MM:SS (default: the profile's)")
    where.add_argument("--job-name")
    local = p.add_argument_group("this machine")
    local.add_argument("--local", action="store_true", help="run through torchrun here instead of sbatch")
    local.add_argument("--nproc", type=int, default=None, help="processes for --local (default 1)")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="keep this global batch: data.batch_size = G / (nodes x devices)")
    p.add_argument("--run-dir", help="run folder (checkpoints, logs, job script); an existing one resumes")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script (or torchrun command) only")
    return p


def _split(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launch flags vs recipe overrides: every ``--key[=value]`` that is not a launch flag is passed to
    ``lm fit`` (``--key value`` too: the next word goes with it)."""
    parser = _parser()
    ours_flags = {o for a in parser._actions for o in a.option_strings}
    ours, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        key = a.split("=", 1)[0]
        if a.startswith("-") and key not in ours_flags and len(a) > 1 and not a[1:].isdigit():
            overrides.append(a)
            if "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                overrides.append(argv[i + 1])
                i += 1
        else:
            ours.append(a)
        i += 1
    return parser.parse_args(ours), overrides


def _run_dir(args, overrides: list[str], recipe: Path) -> tuple[Path, list[str]]:
    """The run folder: --run-dir, else a ``--trainer.default_root_dir`` override, else the recipe's
    own, else ``runs/<recipe>-<date-time>``; the override itself is dropped (the job sets it)."""
    given, rest = args.run_dir, []
    for a in overrides:
        key, _, value = a.partition("=")
        if key.lstrip("-") in ("trainer.default_root_dir", "trainer.init_args.default_root_dir"):
            given = given or value
        else:
            rest.append(a)
    if given is None:
        import yaml

        try:
            given = ((yaml.safe_load(recipe.read_text()) or {}).get("trainer") or {}).get("default_root_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            given = None
    if given is None:
        given = f"runs/{recipe.stem}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(given).expanduser().resolve(), rest


def _local_devices() -> tuple[int, int]:
    import torch

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), (os.cpu_count() or 1)


def build_job(argv: list[str]) -> tuple[Job, argparse.Namespace]:
    """Parses ``lm launch`` arguments into a checked :class:`Job` (nothing written, nothing run)."""
    args, overrides = _split(argv)
    recipe = Path(args.recipe).expanduser()
    if not recipe.is_file():
        raise LaunchError(f"recipe file {args.recipe!r} does not exist")
    run_dir, overrides = _run_dir(args, overrides, recipe)
    if args.local:
        if args.nproc is not None and args.nproc < 1:
            raise LaunchError(f"--nproc: must be at least 1, got {args.nproc}")
        nproc = args.nproc or 1
        gpus, cpus = _local_devices()
        profile = local_profile(gpus if gpus >= nproc else 0, cpus)
        job = Job(recipe=recipe.resolve(), overrides=overrides, run_dir=run_dir, profile=profile, nodes=1,
                  devices_per_node=nproc)
    else:
        if args.nproc is not None:
            raise LaunchError("--nproc: only with --local (on SLURM use --nodes and --devices-per-node)")
        profile = load_profile(args.cluster)
        job = Job(recipe=recipe.resolve(), overrides=overrides, run_dir=run_dir, profile=profile,
                  nodes=args.nodes, devices_per_node=args.devices_per_node, partition=args.partition,
                  account=args.account, time=args.time, job_name=args.job_name)
        if not args.dry_run and shutil.which("sbatch") is None:
            raise LaunchError("sbatch not found on PATH: run lm launch on a SLURM login node, or use --local "
                              "(torchrun on this machine) or --dry-run (print the script)")
    job.overrides = job.overrides + check_job(job, args.global_batch_size)
    return job, args


def submit(job: Job) -> str:
    """Writes the job script into the run folder and submits it; returns the job id."""
    script = job.render()
    job.run_dir.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(script)
    proc = subprocess.run(["sbatch", "--parsable", str(job.script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LaunchError(f"sbatch refused the job: {msg[-1] if msg else 'exit status ' + str(proc.returncode)}")
    return proc.stdout.strip().split(";")[0]


def run_local(job: Job) -> int:
    """``--local``: torchrun in the foreground; preemption handling on (SIGTERM checkpoints and stops)."""
    env = dict(os.environ, LM_PREEMPTION="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // job.devices_per_node)))
    job.run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.call(job.torchrun_command(), env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0
    job, args = build_job(argv)
    if args.local:
        cmd = " ".join(shlex.quote(c) for c in job.torchrun_command())
        if args.dry_run:
            print(cmd)
            return 0
        print(f"lm launch: {job.devices_per_node} local processes; run folder {job.run_dir}", file=sys.stderr)
        return run_local(job)
    if args.dry_run:
        print(job.render(), end="")
        return 0
    job_id = submit(job)
    print(f"submitted job {job_id}")
    print(f"log: {job.log_path(job_id)}")
    print(f"run folder: {job.run_dir}")
    return 0
