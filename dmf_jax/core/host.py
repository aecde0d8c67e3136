"""The host process's memory allocator, set for XLA's CPU buffers.

XLA:CPU allocates each execution's buffers with malloc and frees them when it ends. glibc
serves a large allocation (above its mmap threshold, at most 32 MiB) from freshly mapped
pages, and unmaps a thread arena's heap once it is all free, so every train step can write its
temporaries into new pages and take a page fault per 4 KiB: a DIEN step at batch 512 took
44,500 faults (about 180 MB), a BST step 22,800, at about a third of their step time on a
2-core VM. `reuse_freed_memory` makes glibc keep what is freed for the next allocation: one
arena, no mapped chunks, no trimming; those steps then take almost no faults.

The price, measured (BUILD_NOTES, 2026-12-05 fifth session): the process's resident memory
stays at its peak, and every thread allocates under one lock: BST's, DIEN's and DIN's train
steps ran 1.25-1.5x faster with it, DMF's at 0.86x, and a whole DMF study run (input pipeline
threads beside the steps) 1.25x slower. So it is opt-in: the binaries' --reuse_freed_memory
(`dmf_jax.cli.run`), or a call first thing in a program of your own, before JAX starts its
threads.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8

_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main arena (no per-thread heaps)
    (_M_MMAP_MAX, 0),  # no chunk is mapped on its own: large ones come from the arena too
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # freed memory stays in the arena (up to 2 GiB free)
    (_M_TOP_PAD, 64 << 20),  # the arena grows 64 MiB at a time
)


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to reuse freed memory (see the module docstring); True when it did,
  False where the C library is not glibc (nothing is changed there)."""
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
