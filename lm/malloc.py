"""CPU allocator policy of the ``lm`` command: keep freed large blocks for reuse (glibc ``mallopt``).

PyTorch's CPU allocator is plain ``malloc``. glibc serves every block above its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and returns it with ``munmap`` on free, so each large
activation of every training step is page-faulted and zeroed again by the kernel: at 8k-16k
tokens that costs 10-40 % of a step on these machines and bends linear-time mixers' length
scaling upwards (``lm bench attention`` / ``mixers``). The remedy PyTorch's CPU performance guide
gives is a caching allocator (jemalloc / tcmalloc through ``LD_PRELOAD``); without installing
one, the same effect comes from glibc itself: no mmap for large blocks (``M_MMAP_MAX = 0``) and no
trimming of the heap top (``M_TRIM_THRESHOLD``), so freed blocks stay in the heap and the next
step reuses them. The resident size then stays at the run's peak, as with CUDA's caching allocator.

``LM_MALLOC=system`` leaves glibc's defaults (also when another allocator is preloaded, or not on
glibc, nothing is changed).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


@functools.cache
def keep_freed_blocks() -> bool:
    """Applies the policy once per process; True when glibc accepted it."""
    if os.environ.get("LM_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
