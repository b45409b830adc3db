"""Preemption-safe training: checkpoint at a step boundary on a signal, requeue, resume the newest.

SLURM tells a job it is about to end in two ways: the pre-timeout signal of ``--signal=B:USR1@90``
(forwarded to the tasks by the batch script of ``slurm/lm.sbatch``), and SIGTERM when the job is
requeued (``scontrol requeue``), preempted or cancelled, followed by SIGKILL ``KillWait`` seconds
later. :class:`Preemption` turns either into a checkpoint that resumes with no step lost or repeated:

* the signal handler only records the signal (a handler runs between two Python bytecodes, possibly
  in the middle of a step or of a collective: saving there, as Lightning's own SLURM handler does,
  can deadlock the ranks or store a half-finished step);
* after every optimizer step (``on_train_batch_end``) the ranks agree whether any of them got a
  signal (one all-reduce of a flag; Lightning already broadcasts its SIGTERM flag every step) and, if
  so, all save ``ROOT/hpc_ckpt_N.ckpt`` (Lightning's hpc name and place, so ``--ckpt_path=hpc`` also
  works) -- the same point ``ModelCheckpoint(every_n_train_steps=...)`` saves at, from which
  Lightning resumes exactly;
* the run stops at the next ``on_train_batch_start``, after Lightning has logged the saved step's
  metrics, by raising :class:`Preempted` (a ``SystemExit(0)``: the loggers are flushed by Lightning's
  interrupt handling and the process exits cleanly);
* on USR1 rank 0 leaves ``ROOT/requeue.request``; the batch script requeues the job once every task
  has exited (``scontrol requeue`` from inside a task would SIGTERM its siblings mid-teardown). On
  SIGTERM nothing is requested: whoever sent it (the scheduler requeueing or preempting the job, or
  a user cancelling it) decides what comes next.

:func:`resolve_resume` picks what a (re)started run resumes from (``--ckpt_path=auto``, which
``lm launch`` always passes): the newest of ``last.ckpt`` (ModelCheckpoint, written periodically,
also what a SIGKILLed run falls back to) and the newest hpc checkpoint.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

REQUEUE_REQUEST = "requeue.request"  # in the run folder; read by the batch script of slurm/lm.sbatch
HPC_RE = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")  # Lightning's name; temporary files (".hpc_ckpt_1.ckpt.x.tmp") do not match
_SIGNALS = {"SIGUSR1": signal.SIGUSR1, "SIGUSR2": signal.SIGUSR2, "SIGTERM": signal.SIGTERM}


class Preempted(SystemExit):
    """Raised on every rank at a step boundary once the preemption checkpoint is written."""

    def __init__(self, step: int, path: str, requeue: bool):
        super().__init__(0)
        self.step, self.path, self.requeue = step, path, requeue


def hpc_checkpoints(root) -> list[Path]:
    """``ROOT/hpc_ckpt_N.ckpt`` (files or sharded folders), oldest first by N."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := HPC_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(trainer) -> Optional[str]:
    """The checkpoint a restarted run continues from: the most recently written of every
    ModelCheckpoint's ``last*.ckpt`` and the newest ``hpc_ckpt_N.ckpt``; None for a fresh run."""
    candidates: set[Path] = set()
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            candidates |= {Path(p) for p in cb._find_last_checkpoints(trainer)}
    hpc = hpc_checkpoints(trainer.default_root_dir)
    if hpc:
        candidates.add(hpc[-1])
    existing = [p for p in candidates if p.exists()]
    if not existing:
        return None
    # ties (same second on coarse file systems) go to the hpc checkpoint: it is at a step boundary
    return str(max(existing, key=lambda p: (p.stat().st_mtime, HPC_RE.match(p.name) is not None)))


def _tolerate_dead_wandb(trainer, terminated) -> None:
    """SLURM's SIGTERM reaches every process of the job, W&B's service process too, which exits at
    once: rank 0's next W&B ``log_metrics`` would raise and turn a clean stop into a crash before the
    step boundary. Once ``terminated()``, a failing W&B ``log_metrics`` prints one line instead (the
    metrics of the last step or so before the signal miss W&B; the CSV log has them)."""
    for lg in trainer.loggers:
        if type(lg).__name__ != "WandbLogger" or getattr(lg, "_lm_tolerant", False):
            continue
        original = lg.log_metrics

        def log_metrics(*args, _original=original, **kwargs):
            try:
                return _original(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- the run is stopping at the next step boundary
                if not terminated():
                    raise
                print(f"lm: W&B logging failed after SIGTERM ({type(e).__name__}); the requeued run "
                      f"continues the W&B run", file=sys.stderr, flush=True)

        lg.log_metrics = log_metrics
        lg._lm_tolerant = True


class Preemption(Checkpoint):
    """Checkpoints and stops the run at the next step boundary after a signal (see module doc).

    Args:
        signals: signals that make the run checkpoint and stop.
        requeue_signal: the one of them that also asks the batch script to requeue the job (SLURM's
            pre-timeout signal, ``--signal=B:USR1@SECONDS`` in ``slurm/lm.sbatch``).

    A ``Checkpoint`` subclass, so Lightning runs its hooks after every other callback's (the saved
    step is complete for all of them).
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM"), requeue_signal: str = "SIGUSR1"):
        unknown = [s for s in (*signals, requeue_signal) if s not in _SIGNALS]
        if unknown:
            raise ValueError(f"Preemption: unknown signal {unknown[0]!r}; choose from {', '.join(_SIGNALS)}")
        self.signals = tuple(_SIGNALS[s] for s in signals)
        self.requeue_signal = _SIGNALS[requeue_signal]
        self.received: list[int] = []
        self._training = False
        self._checked_step = -1
        self._pending: Optional[Preempted] = None
        self._previous: dict[int, object] = {}
        self._install()  # now already: a USR1 during data preparation must not kill the task

    # -- signals ----------------------------------------------------------------------------------
    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            prev = signal.getsignal(sig)
            if prev != self._on_signal:  # bound methods compare equal, never identical
                self._previous.setdefault(sig, prev)
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self._training or (signum == self.requeue_signal and self._pending is None and self._checked_step < 0):
            self.received.append(signum)  # acted on at the next step boundary
            return
        # outside training: SIGTERM keeps its usual meaning; a late pre-timeout signal is moot
        prev = self._previous.get(signum, signal.SIG_DFL)
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL and signum != self.requeue_signal:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    # -- hooks --------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning registered its own SIGTERM handler (which runs a collective inside the handler)
        # just before this hook; ours replaces it for the training loop.
        self._install()
        self._training = True
        _tolerate_dead_wandb(trainer, lambda: signal.SIGTERM in self.received)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._checked_step or self._pending is not None:
            return  # gradient accumulation: only after an optimizer step
        self._checked_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(bool(self.received), all=False):
            return
        requeue = trainer.strategy.reduce_boolean_decision(self.requeue_signal in self.received, all=False)
        root = trainer.default_root_dir
        old = hpc_checkpoints(root)
        number = int(HPC_RE.match(old[-1].name).group(1)) + 1 if old else 1
        path = trainer.strategy.broadcast(os.path.join(root, f"hpc_ckpt_{number}.ckpt"))
        trainer.save_checkpoint(path)
        for p in old:
            trainer.strategy.remove_checkpoint(p)
        self._pending = Preempted(trainer.global_step, path, requeue)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        stop = self._pending
        if trainer.is_global_zero:
            if stop.requeue and os.environ.get("SLURM_JOB_ID"):
                Path(trainer.default_root_dir, REQUEUE_REQUEST).write_text(os.environ["SLURM_JOB_ID"] + "\n")
            what = "requeue requested" if stop.requeue else "stopping"
            names = ",".join(sorted({signal.Signals(s).name for s in self.received}))
            print(f"lm: preempted ({names}): checkpoint of step {stop.step} written to {stop.path}; {what}",
                  file=sys.stderr, flush=True)
        raise stop

    def on_train_end(self, trainer, pl_module) -> None:
        self._training = False  # finished (the pending stop, if any, is moot: training is done)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._training = False

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._training = False
        if threading.current_thread() is threading.main_thread():
            for sig, prev in self._previous.items():
                if signal.getsignal(sig) == self._on_signal:
                    signal.signal(sig, prev)
            self._previous.clear()
