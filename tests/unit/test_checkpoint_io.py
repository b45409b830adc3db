"""Atomic checkpoint writes: a process killed mid-save leaves the previous checkpoint intact."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from {module} import {cls} as IO
    def dying_save(obj, f, *a, **k):   # write half a checkpoint, then die without warning
        f.write(b"\\x00" * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
    torch.save = dying_save
    import lm.training.checkpoint_io
    lm.training.checkpoint_io.torch.save = dying_save
    IO().save_checkpoint({{"state_dict": {{"w": torch.zeros(3)}}}}, sys.argv[1])
""")


def _kill_during_save(path, module: str, cls: str) -> int:
    code = SCRIPT.format(module=module, cls=cls)
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True).returncode


def test_atomic_save_survives_kill(tmp_path):
    from lm.training.checkpoint_io import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 7}, path)
    assert _kill_during_save(path, "lm.training.checkpoint_io", "AtomicCheckpointIO") == -9
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["global_step"] == 7 and torch.equal(ckpt["state_dict"]["w"], torch.ones(3))


def test_failed_save_leaves_no_temp_file(tmp_path):
    from lm.training.checkpoint_io import AtomicCheckpointIO

    class Unpicklable:
        pass

    try:
        AtomicCheckpointIO().save_checkpoint({"x": Unpicklable()}, tmp_path / "a.ckpt")
    except Exception:
        pass
    AtomicCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "b.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.ckpt"]
