"""Start and end of a raw ``torchrun`` worker: ``lm bench scaling|moe`` and the multi-process test
scripts, which run collectives themselves rather than through one Lightning ``fit``.

At interpreter exit the C++ destructors of gloo's and DeepSpeed's objects (process groups still held
by Lightning strategies or ``deepspeed.comm``, their threads) run in no fixed order, and now and then
one of them aborts ("terminate called without an active exception", SIGABRT); torchrun then reports
the launch failed although every rank had finished and written its results. So a worker ends with a
barrier (every rank is done), ``destroy_process_group`` (connections closed in order) and
``os._exit``, which skips those destructors (and ``atexit`` hooks: a worker closes the files it
writes before it ends). ``faulthandler`` is on from the start: should a rank
abort anyway, its Python stack is in the log.
"""
from __future__ import annotations

import faulthandler
import os
import sys
from typing import NoReturn


def start_worker() -> None:
    """Dump every thread's Python stack to stderr on SIGSEGV/SIGABRT/SIGFPE/SIGBUS."""
    faulthandler.enable(all_threads=True)


def exit_worker(code: int = 0) -> NoReturn:
    """Barrier and tear down the default process group (if any), flush stdio, and ``os._exit(code)``."""
    import torch.distributed as dist

    if dist.is_initialized():
        if code == 0:  # a failed rank must not wait for the others: they may never arrive
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
