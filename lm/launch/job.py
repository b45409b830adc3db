"""Cluster profiles, the job ``lm launch`` renders (sbatch script or torchrun command), and its checks.

A profile (``launch/NAME.yaml``, or a path to a YAML file) describes a cluster once: partition,
account, GPUs and CPUs per node, default time, and the set-up lines a job runs first (modules,
container, environment). From the profile and ``--nodes``/``--devices-per-node`` the job derives
the trainer flags (``num_nodes``, ``devices``, ``accelerator``), so a recipe runs unchanged on one
CPU, on one GPU node and on many nodes: one task per device -- a GPU, or a CPU process on nodes
without GPUs.

Checks before anything is submitted (:func:`check_job`): the recipe is parsed with the job's own
arguments (unknown keys and wrong types fail as ``lm fit`` would), its model and data module are
built on the meta device (inconsistent values such as ``dim % num_heads`` fail here, not an hour later
in the queue), and the strategy must fit the world size: a known name; for ``fsdp2`` a
tensor-parallel size dividing the world; with ``--global-batch-size`` a global batch the world
divides. The trainer itself is not built: a login node without GPUs can launch a GPU job.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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


# -- checks against the recipe ------------------------------------------------------------------
@dataclass
class RecipeFacts:
    strategy: str  # short name or class path
    batch_size: Optional[int]  # data.batch_size (per rank) after the overrides, if the data module has one
    tensor_parallel_size: int = 1
    data_parallel_size: Any = "auto"


def _get(ns: Any, key: str, default: Any = None) -> Any:
    try:
        value = ns[key] if not hasattr(ns, "get") else ns.get(key, default)
    except (KeyError, TypeError):
        return default
    return default if value is None else value


def recipe_facts(job: Job, extra: list[str] = ()) -> RecipeFacts:
    """Parses the recipe with the job's arguments and builds its model and data on the meta device."""
    import torch

    from lm.training.recipe import LMCLI, make_cli

    class _Check(LMCLI):
        def instantiate_trainer(self, **kwargs):  # never: the login node may lack the job's devices
            return None

        def _add_configure_optimizers_method_to_model(self, subcommand):
            return None

        def _set_seed(self):  # parsing must not touch the global RNGs (nor print "Seed set")
            return None

    args = job.fit_args()[1:]  # without "fit": parse only, nothing runs
    args = [a for a in args if not a.startswith("--ckpt_path")] + list(extra)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = make_cli(args, run=False, cli_class=_Check)
    cfg = cli.config
    strategy = _get(cfg.trainer, "strategy", "auto")
    tp, dp = 1, "auto"
    if not isinstance(strategy, str):  # class_path form
        init = _get(strategy, "init_args", {}) or {}
        tp, dp = _get(init, "tensor_parallel_size", 1), _get(init, "data_parallel_size", "auto")
        strategy = _get(strategy, "class_path", "?")
    data_init = _get(_get(cfg, "data", {}), "init_args", {})
    batch = _get(data_init, "batch_size", None) if data_init else None
    return RecipeFacts(strategy=str(strategy), batch_size=batch, tensor_parallel_size=tp, data_parallel_size=dp)


def is_fsdp2(strategy: str) -> bool:
    return strategy.lower() == "fsdp2" or strategy.rsplit(".", 1)[-1] in ("FSDP2Strategy", "ModelParallelStrategy")


def check_job(job: Job, global_batch: Optional[int] = None) -> list[str]:
    """Raises ``LaunchError``/``ValueError`` (one line) for a job that cannot work; returns the overrides
    the job adds to the recipe (the per-rank ``--data.batch_size`` of ``--global-batch-size``)."""
    import lm.parallel

    if global_batch is not None and global_batch < 1:
        raise LaunchError(f"--global-batch-size: must be positive, got {global_batch}")
    facts = recipe_facts(job)
    lm.parallel.check_strategy(facts.strategy)  # "trainer.strategy: unknown strategy 'x'; choose one of ..."
    world, shape = job.world_size, f"{job.nodes} nodes x {job.devices_per_node} devices"
    fsdp2 = is_fsdp2(facts.strategy)
    if fsdp2:
        tp = 1 if facts.tensor_parallel_size in (None, "auto") else int(facts.tensor_parallel_size)
        if world % tp:
            raise LaunchError(f"trainer.strategy: fsdp2 with tensor_parallel_size={tp} needs a world size "
                              f"divisible by {tp}, got {world} ({shape})")
        dp = facts.data_parallel_size
        if dp not in (None, "auto") and int(dp) * tp != world:
            raise LaunchError(f"trainer.strategy: fsdp2 data_parallel_size={dp} x tensor_parallel_size={tp} "
                              f"is not the world size {world} ({shape})")
    if global_batch is None:
        return []
    if facts.batch_size is None:
        raise LaunchError("--global-batch-size: the recipe's data module has no batch_size")
    if global_batch % world:
        why = "fsdp2 shards every step's batch evenly over the ranks" if fsdp2 else "every rank takes the same batch"
        raise LaunchError(f"--global-batch-size: {global_batch} is not divisible by the world size {world} "
                          f"({shape}, strategy {facts.strategy}): {why}; use a multiple of {world}")
    return [f"--data.batch_size={global_batch // world}"]
