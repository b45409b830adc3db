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
print(applied, faults() - f0)
"""


def probe(env_extra: dict) -> tuple[bool, int]:
    """Whether the policy was applied, and the minor page faults of 8 reallocations of 64 MiB."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "LM_MALLOC"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt policy is glibc (Linux) only")
def test_policy_reuses_freed_large_blocks():
    # Counts, not bytes: with transparent huge pages a fault can map 2 MiB instead of 4 KiB, so only
    # the ratio of the two runs is machine-independent.
    applied, kept = probe({})
    assert applied
    system_applied, fresh = probe({"LM_MALLOC": "system"})
    assert not system_applied
    assert fresh >= 8, f"glibc's default should page-fault each fresh 64 MiB mmap, saw {fresh} faults"
    assert kept < 0.1 * fresh, f"with the policy {kept} faults, without {fresh}: freed blocks were not reused"
