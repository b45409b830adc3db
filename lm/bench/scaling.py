"""``lm bench scaling``: tokens/s of 2 processes over 1 for DDP, FSDP2 and ZeRO-2 on this machine.

Weak scaling: every process trains the same model on its own batch of the same shape (random token
ids, as ``lm bench train``), so the ideal ``scaling.<s>_2v1`` is 2 (two processes do twice the work
in the same time) and what is lost is communication and the processes' contention for the machine.
Each process gets the same number of intra-op threads at both world sizes: torch's threads in
``lm bench`` (``--threads``; default all cores) divided by 2, so the 2-process run does not
oversubscribe the machine. On a 2-core CPU that is 1 thread per process and the 1-process run leaves
a core idle that the 2-process run uses: the figure is a correctness-of-scaling check there, not a
speed claim.

Each world size is one ``torchrun --standalone --nproc_per_node=W`` launch of this module running
the three strategies one after another (Lightning reuses the process group; start-up is paid once);
the launches alternate (1, 2, 2, 1, ...) over ``--repeats`` and the medians are kept. A run's step
time is the median period between step starts after warm-up (``lm.bench.train``'s step clock).

Communication time is measured where it can be isolated: after training, the 2-process launch
replays each strategy's collectives for one step on a flat fp32 buffer of the model's size --
DDP: one all-reduce of the gradients; FSDP2 (reshard after forward): an all-gather of the parameters
in forward and again in backward plus a reduce-scatter of the gradients; ZeRO-2: a reduce-scatter of
the gradients plus an all-gather of the updated parameters -- and reports its median time per step
(``scaling.<s>.comm_ms``) and its share of the measured 2-process step (``scaling.<s>.comm_share``).
It is the collectives' cost without overlap with compute (an upper bound on the exposed part).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lm.bench.common import device_name, fmt, median, resolve_device, table

STRATEGIES = {"ddp": "ddp", "fsdp2": "fsdp2", "zero2": "deepspeed_stage_2"}
WORLDS = (1, 2)


def plan(quick: bool, device: torch.device, repeats: int | None) -> dict:
    from lm.bench.train import QUICKSTART, QUICKSTART_OPTIM, TINY

    if quick:
        return dict(config=TINY, optim=QUICKSTART_OPTIM, batch=4, seq_len=32, warmup=1, steps=3,
                    repeats=repeats or 1)
    if device.type == "cuda":
        return dict(config=QUICKSTART, optim=QUICKSTART_OPTIM, batch=16, seq_len=256, warmup=5, steps=30,
                    repeats=repeats or 2)
    return dict(config=QUICKSTART, optim=QUICKSTART_OPTIM, batch=8, seq_len=256, warmup=2, steps=6,
                repeats=repeats or 2)


# -- the worker (one per process of a torchrun launch) ----------------------------------------------
class _Loader:
    """The batches as a sized iterable: not a list (Lightning would take it for a list of loaders) and
    not ``DataLoader(batch_size=None)`` (no ``batch_sampler``, which DeepSpeed's set-up reads)."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _fit(strategy: str, spec: dict, world: int, rank: int) -> dict:
    import lightning as L

    import lm.parallel  # noqa: F401  (registers fsdp2 and the CPU-capable DeepSpeed strategies)
    from lm.bench.train import SEED, _step_clock, make_batches
    from lm.models import DecoderConfig
    from lm.training.module import LanguageModel
    from lm.training.optim import OptimConfig

    dev = torch.device(spec["device"])
    torch.manual_seed(SEED)
    module = LanguageModel(config=DecoderConfig(**spec["config"]), optim=OptimConfig(**spec["optim"]))
    warmup, steps = spec["warmup"], spec["steps"]
    batches = make_batches(warmup + steps + 1, spec["batch"], spec["seq_len"], spec["config"]["vocab_size"],
                           seed=SEED + rank)
    timer = _step_clock(warmup, steps, dev)
    with tempfile.TemporaryDirectory(prefix="lm-bench-scaling-") as root, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            accelerator="gpu" if dev.type == "cuda" else "cpu", devices=world, num_nodes=1, strategy=strategy,
            precision="32-true", max_steps=warmup + steps + 1, logger=False, default_root_dir=root,
            callbacks=[timer], enable_progress_bar=False, enable_checkpointing=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            use_distributed_sampler=False)
        trainer.fit(module, train_dataloaders=_Loader(batches))
    from lm.bench.common import step_period

    period = step_period(timer.stamps, dev)
    numel = sum(p.numel() for p in module.model.parameters())  # FSDP2/ZeRO-3 would show shards; not here
    return {"step_s": period, "tokens_per_s": world * batches[0]["input_ids"].numel() / period,
            "loss": float(timer.loss), "params": numel}


def _comm(numel: int, world: int, dev: torch.device, reps: int = 5) -> dict[str, float]:
    """Median seconds per step of each strategy's collectives, replayed on a flat buffer."""
    import torch.distributed as dist

    n = -(-numel // world) * world  # padded to a multiple of the world, as the sharded strategies do
    full = torch.randn(n, device=dev)
    shard = torch.empty(n // world, device=dev)

    def reduce_scatter():  # gloo and NCCL both have it
        dist.reduce_scatter_tensor(shard, full)

    ops = {
        "ddp": lambda: dist.all_reduce(full),
        "fsdp2": lambda: (dist.all_gather_into_tensor(full, shard), dist.all_gather_into_tensor(full, shard),
                          reduce_scatter()),
        "zero2": lambda: (reduce_scatter(), dist.all_gather_into_tensor(full, shard)),
    }
    out = {}
    for name, op in ops.items():
        op()  # warm-up (connection set-up, buffers)
        times = []
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            op()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t)
        out[name] = median(times)
    return out


def _worker(spec_file: str, out_file: str) -> int:
    import torch.distributed as dist

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if spec["device"] == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        spec["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    res = {name: _fit(strategy, spec, world, rank) for name, strategy in STRATEGIES.items()}
    if world > 1 and dist.is_initialized():
        comm = _comm(res["ddp"]["params"], world, torch.device(spec["device"]))
        for name, seconds in comm.items():
            res[name]["comm_s"] = seconds
    if rank == 0:
        Path(out_file).write_text(json.dumps(res))
    return 0


# -- the benchmark ------------------------------------------------------------------------------------
def _launch(world: int, spec: dict, tmp: Path) -> dict:
    spec_file, out_file = tmp / "spec.json", tmp / f"out{world}.json"
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "lm.bench.scaling", str(spec_file), str(out_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"lm bench scaling: the {world}-process launch failed ({proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(out_file.read_text())


def run(quick: bool = False, device: str = "auto", repeats: int | None = None, out=print) -> dict:
    dev = resolve_device(device)
    p = plan(quick, dev, repeats)
    if dev.type == "cuda" and torch.cuda.device_count() < max(WORLDS):
        raise ValueError(f"bench scaling: needs {max(WORLDS)} GPUs, found {torch.cuda.device_count()}")
    threads = max(1, torch.get_num_threads() // max(WORLDS))  # the same at both worlds, never oversubscribed
    spec = dict(p, device=dev.type, threads=threads)
    cfg = p["config"]
    out(f"[lm bench scaling] device {device_name(dev)}; model dim={cfg['dim']} layers={cfg['num_layers']}; "
        f"batch {p['batch']}x{p['seq_len']} per process, {threads} thread(s) per process; {p['warmup']} warm-up "
        f"+ {p['steps']} timed steps; worlds {WORLDS} alternating over {p['repeats']} repeat(s)")
    runs: dict[int, list[dict]] = {w: [] for w in WORLDS}
    with tempfile.TemporaryDirectory(prefix="lm-bench-scaling-") as tmp:
        for r in range(p["repeats"]):
            for w in (WORLDS if r % 2 == 0 else WORLDS[::-1]):
                runs[w].append(_launch(w, spec, Path(tmp)))
    res: dict[str, float] = {}
    rows = []
    for name, strategy in STRATEGIES.items():
        tps = {w: [x[name]["tokens_per_s"] for x in runs[w]] for w in WORLDS}
        ratio = median(tps[2]) / median(tps[1])
        step2 = median(x[name]["step_s"] for x in runs[2])
        comm = median(x[name]["comm_s"] for x in runs[2])
        res.update({f"scaling.{name}_2v1": ratio, f"scaling.{name}.tokens_per_s_1": median(tps[1]),
                    f"scaling.{name}.tokens_per_s_2": median(tps[2]), f"scaling.{name}.comm_ms": 1e3 * comm,
                    f"scaling.{name}.comm_share": comm / step2})
        rows.append([f"{name} ({strategy})", median(tps[1]), median(tps[2]), ratio, 1e3 * comm, comm / step2])
    res["scaling.batch"], res["scaling.seq_len"] = float(p["batch"]), float(p["seq_len"])
    res["scaling.threads_per_process"] = float(threads)
    out(table("scaling: tokens/s (1 vs 2 processes, same per-process batch; ideal 2v1 = 2)",
              ["strategy", "1 proc", "2 procs", "2v1", "comm ms/step", "comm share"],
              [[r[0], *[fmt(x) for x in r[1:]]] for r in rows]))
    return res


if __name__ == "__main__":
    from lm.parallel.worker import exit_worker, start_worker

    start_worker()
    exit_worker(_worker(sys.argv[1], sys.argv[2]))
