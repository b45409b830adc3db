"""Cluster profiles and the job ``lm launch`` renders: sbatch script or torchrun command.

A profile (``launch/NAME.yaml``, or a path to a YAML file) describes a cluster once: partition,
account, GPUs and CPUs per node, default time, and the set-up lines a job runs first (modules,
container, environment). From the profile and ``--nodes``/``--devices-per-node`` the job derives
the trainer flags (``num_nodes``, ``devices``, ``accelerator``), so a recipe runs unchanged on one
CPU, on one GPU node and on many nodes: one task per device -- a GPU, or a CPU process on nodes
without GPUs.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from lm.errors import LMError

REPO = Path(__file__).resolve().parents[2]
PROFILE_DIR = REPO / "launch"
TEMPLATE = REPO / "slurm" / "lm.sbatch"
#: trainer keys derived from the launch arguments; a recipe override of them would contradict the job
DERIVED_KEYS = ("trainer.num_nodes", "trainer.devices", "trainer.accelerator")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")
_PLACEHOLDER_RE = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class LaunchError(LMError, ValueError):
    """A launch request that cannot work; reported before anything is submitted."""


@dataclass
class Profile:
    """A cluster profile (the keys of ``launch/*.yaml``).

    Args:
        partition, account: ``#SBATCH --partition/--account`` (None: the cluster's default).
        gpus_per_node: GPUs on a node; 0 for CPU nodes (one task per CPU process then).
        cpus_per_node: CPUs of a node, split evenly among its tasks (``--cpus-per-task``).
        time: default ``--time`` (``[D-]HH:MM:SS``).
        signal_seconds: the pre-timeout signal comes this long before the time limit.
        mem: ``#SBATCH --mem`` (e.g. ``0`` for the whole node); None leaves it out.
        setup: shell lines run before ``srun`` (``module load ...``, ``source venv/bin/activate``).
        env: variables exported in the job.
        sbatch: extra ``#SBATCH`` options (``--qos=...``, ``--constraint=...``).
        srun: extra ``srun`` options (e.g. a container image with pyxis).
        python: the interpreter of the job; None: the one running ``lm launch`` (shared file system).
        template: the sbatch template, relative to the repository; default ``slurm/lm.sbatch``.
    """

    name: str = "default"
    partition: Optional[str] = None
    account: Optional[str] = None
    gpus_per_node: int = 0
    cpus_per_node: int = 1
    time: str = "01:00:00"
    signal_seconds: int = 90
    mem: Optional[str] = None
    setup: list = field(default_factory=list)
    env: dict = field(default_factory=dict)
    sbatch: list = field(default_factory=list)
    srun: list = field(default_factory=list)
    python: Optional[str] = None
    template: Optional[str] = None

    def __post_init__(self):
        for key in ("gpus_per_node", "cpus_per_node", "signal_seconds"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "gpus_per_node" else 1):
                raise LaunchError(f"profile {self.name}: {key} must be a {'non-negative' if key == 'gpus_per_node' else 'positive'} integer, got {v!r}")
        for key in ("setup", "sbatch", "srun"):
            if not isinstance(getattr(self, key), list):
                raise LaunchError(f"profile {self.name}: {key} must be a list of strings")
        if not isinstance(self.env, dict):
            raise LaunchError(f"profile {self.name}: env must be a mapping of NAME: value")
        parse_time(self.time, f"profile {self.name}: time")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> Profile:
    """``launch/NAME.yaml`` or a YAML file path; unknown keys fail naming the key."""
    path = Path(name_or_path)
    if not (name_or_path.endswith((".yaml", ".yml")) and path.is_file()):
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise LaunchError(f"--cluster: no profile {name_or_path!r} ({path} does not exist); "
                          f"available: {', '.join(available_profiles()) or 'none'}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise LaunchError(f"profile {path}: expected a mapping of keys")
    known = {f.name for f in dataclasses.fields(Profile)} - {"name"}
    for key in data:
        if key not in known:
            raise LaunchError(f"profile {path.stem}: unknown key {key!r} (known: {', '.join(sorted(known))})")
    return Profile(name=path.stem, **{k: ([] if v is None and k in ("setup", "sbatch", "srun") else v)
                                      for k, v in data.items()})


def parse_time(text: str, what: str = "--time") -> int:
    """Seconds of a SLURM ``[D-]HH:MM:SS`` time."""
    m = _TIME_RE.match(str(text))
    if not m:
        raise LaunchError(f"{what}: {text!r} is not [D-]HH:MM:SS")
    d, h, mi, s = (int(g or 0) for g in m.groups())
    if mi >= 60 or s >= 60:
        raise LaunchError(f"{what}: {text!r} has minutes or seconds of 60 or more")
    return ((d * 24 + h) * 60 + mi) * 60 + s


@dataclass
class Job:
    """One launch: what runs (recipe, overrides, run folder) and where (profile, nodes, devices)."""

    recipe: Path
    overrides: list
    run_dir: Path
    profile: Profile
    nodes: int = 1
    devices_per_node: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    job_name: Optional[str] = None
    workdir: Path = field(default_factory=Path.cwd)

    def __post_init__(self):
        if self.nodes < 1:
            raise LaunchError(f"--nodes: must be at least 1, got {self.nodes}")
        p = self.profile
        if self.devices_per_node is None:
            self.devices_per_node = p.gpus_per_node or 1
        if self.devices_per_node < 1:
            raise LaunchError(f"--devices-per-node: must be at least 1, got {self.devices_per_node}")
        limit, what = (p.gpus_per_node, "GPUs") if p.gpus_per_node else (p.cpus_per_node, "CPUs")
        if self.devices_per_node > limit:
            raise LaunchError(f"--devices-per-node: {self.devices_per_node} tasks per node, but profile "
                              f"{p.name} has {limit} {what} per node")
        seconds = parse_time(self.time or p.time)
        if seconds <= p.signal_seconds:
            raise LaunchError(f"--time: {self.time or p.time} is not longer than the pre-timeout signal "
                              f"({p.signal_seconds} s before the end, profile {p.name})")
        for arg in self.overrides:
            key = arg.lstrip("-").split("=", 1)[0].replace(".init_args.", ".")
            if key in DERIVED_KEYS:
                raise LaunchError(f"{arg.split('=')[0]}: derived from --nodes/--devices-per-node/--cluster; "
                                  f"do not set it with lm launch")
            if key == "ckpt_path":
                raise LaunchError("--ckpt_path: lm launch always resumes the newest checkpoint of the run "
                                  "folder (--ckpt_path=auto); use --run-dir to pick the run")

    @property
    def accelerator(self) -> str:
        return "gpu" if self.profile.gpus_per_node else "cpu"

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def trainer_args(self) -> list[str]:
        """The flags the job adds to the recipe: derived trainer flags, run folder, resume."""
        return [f"--trainer.num_nodes={self.nodes}", f"--trainer.devices={self.devices_per_node}",
                f"--trainer.accelerator={self.accelerator}", f"--trainer.default_root_dir={self.run_dir}",
                "--ckpt_path=auto"]

    def fit_args(self) -> list[str]:
        return ["fit", "-c", str(self.recipe), *self.overrides, *self.trainer_args()]

    def python(self) -> str:
        return self.profile.python or sys.executable

    @property
    def script_path(self) -> Path:
        return self.run_dir / "job.sbatch"

    def log_path(self, job_id: str = "%j") -> Path:
        return self.run_dir / f"slurm-{job_id}.out"

    # -- rendering --------------------------------------------------------------------------------
    def sbatch_values(self) -> dict[str, str]:
        p = self.profile
        d = self.devices_per_node
        directives = []
        if self.partition or p.partition:
            directives.append(f"--partition={self.partition or p.partition}")
        if self.account or p.account:
            directives.append(f"--account={self.account or p.account}")
        if p.gpus_per_node:
            directives.append(f"--gres=gpu:{d}")
        if p.mem is not None:
            directives.append(f"--mem={p.mem}")
        directives += list(p.sbatch)
        fit = self.fit_args()  # "fit -c RECIPE" on the first line, then one override per line
        command = [" ".join(shlex.quote(a) for a in [self.python(), "-m", "lm.cli", *fit[:3]])]
        command += [shlex.quote(a) for a in fit[3:]]
        env = [f"export {k}={shlex.quote(str(v))}" for k, v in p.env.items()]
        return {
            "recipe": str(self.recipe),
            "job_name": self.job_name or f"lm-{self.recipe.stem}",
            "nodes": str(self.nodes),
            "tasks_per_node": str(d),
            "cpus_per_task": str(max(1, p.cpus_per_node // d)),
            "time": self.time or p.time,
            "signal_seconds": str(p.signal_seconds),
            "log": str(self.log_path()),
            "directives": "\n".join(f"#SBATCH {x}" for x in directives),
            "workdir": shlex.quote(str(self.workdir)),
            "setup": "\n".join([*p.setup, *env]) or "# (no set-up lines in the profile)",
            "run_dir": shlex.quote(str(self.run_dir)),
            "srun_args": " ".join(shlex.quote(a) for a in p.srun),
            "command": " \\\n    ".join(command),
            "profile": p.name,
            "script": str(self.script_path),
        }

    def render(self) -> str:
        """The sbatch script: the template with every ``{{ name }}`` replaced."""
        path = REPO / self.profile.template if self.profile.template else TEMPLATE
        if not path.is_file():
            raise LaunchError(f"profile {self.profile.name}: template {path} does not exist")
        return render_template(path.read_text(), self.sbatch_values(), str(path))

    def torchrun_command(self) -> list[str]:
        """``lm launch --local``: the same job on this machine, one process per device."""
        return [self.python(), "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={self.devices_per_node}", "-m", "lm.cli", *self.fit_args()]


def render_template(text: str, values: dict[str, str], name: str = "template") -> str:
    missing = sorted({m.group(1) for m in _PLACEHOLDER_RE.finditer(text)} - set(values))
    if missing:
        raise LaunchError(f"{name}: unknown placeholder {{{{ {missing[0]} }}}} (known: {', '.join(sorted(values))})")
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)


def local_profile(gpus: int, cpus: int) -> Profile:
    """The profile of ``--local`` runs: this machine's devices."""
    return Profile(name="this-machine", gpus_per_node=gpus, cpus_per_node=max(1, cpus), time="01:00:00")
