"""lm/malloc.py: with the policy, freed large blocks are reused instead of being page-faulted again."""
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys, torch
import lm.malloc
applied = lm.malloc.keep_freed_blocks()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):  # warm-up: the heap grows to its working size (fragmentation: a few blocks)
    x = torch.ones(16 << 20)  # 64 MiB: above glibc's largest mmap threshold
    del x
f0 = faults()
for _ in range(8):
    x = torch.ones(16 << 20)
    del x
print(applied, (faults() - f0) * 4096 / (8 * 64 << 20))
"""


def probe(env_extra: dict) -> tuple[bool, float]:
    import os

    env = {k: v for k, v in os.environ.items() if k != "LM_MALLOC"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    applied, per_alloc = out.stdout.split()
    return applied == "True", float(per_alloc)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt policy is glibc (Linux) only")
def test_policy_reuses_freed_large_blocks():
    applied, faulted = probe({})
    assert applied
    assert faulted < 0.1, f"{faulted:.2f} of every reallocated 64 MiB block was page-faulted again"
    applied, faulted = probe({"LM_MALLOC": "system"})
    assert not applied
    assert faulted > 0.9, f"glibc's default should re-fault a fresh mmap each time, got {faulted:.2f}"
