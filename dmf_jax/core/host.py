"""The host process's memory allocator, set for XLA's CPU buffers.

XLA:CPU allocates each execution's buffers with malloc and frees them when it ends. glibc
serves a large allocation (above its mmap threshold, at most 32 MiB) from freshly mapped
pages, and unmaps a thread arena's heap once it is all free, so every train step can write its
temporaries into new pages and take a page fault per 4 KiB: a DIEN step at batch 512 took
44,500 faults (about 180 MB), a BST step 22,800, at about a third of their step time on a
2-core VM. Two settings remove most of that cost:

- **Huge pages** (the binaries' default, `start_with_huge_pages`): glibc's tunable
  `glibc.malloc.hugetlb=1` makes malloc ask for transparent huge pages (2 MiB) for what it
  maps, so those steps take about 80x fewer faults (DIEN 44,500 -> about 550 a step, BST
  22,800 -> about 300) while every thread keeps its own arena. Measured (BUILD_NOTES, 2026-12-05
  sixth session): a BST study run trains in 65-68 s against 79-80 s, a DMF study run is
  unchanged (A/B wall 1.03x in its favour). A tunable is read when the process starts, so a
  binary started as `python -m experiments.<name>` re-executes itself once with it set,
  before anything heavy is imported (tens of milliseconds); `--nohuge_pages` on the command
  line, or a GLIBC_TUNABLES of your own that names `glibc.malloc.hugetlb`, leaves it out. It
  applies where it helps: Linux, glibc 2.35 or newer, transparent huge pages in `madvise`
  mode (with `always` the kernel already does it; with `never` it cannot). Your own program
  gets it by starting with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment.
- **Reusing freed memory** (`reuse_freed_memory`, opt-in: the binaries' --reuse_freed_memory):
  one arena, no mapped chunks, no trimming; those steps then take almost no faults. Its
  price, measured (BUILD_NOTES, 2026-12-05 fifth session): resident memory stays at its
  peak, and every thread allocates under one lock: BST's, DIEN's and DIN's train steps ran
  1.25-1.5x faster with it, DMF's at 0.86x, and a whole DMF study run (input pipeline
  threads beside the steps) 1.25x slower. A program of your own calls it first thing, before
  JAX starts its threads.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping, Sequence

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8

_SETTINGS = (
    (_M_ARENA_MAX, 1),  # every thread allocates from the main arena (no per-thread heaps)
    (_M_MMAP_MAX, 0),  # no chunk is mapped on its own: large ones come from the arena too
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # freed memory stays in the arena (up to 2 GiB free)
    (_M_TOP_PAD, 64 << 20),  # the arena grows 64 MiB at a time
)


def usable_cpus() -> int:
  """The processors this process may run on (its affinity set where the OS has one, else
  the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows: no affinity call
    return os.cpu_count() or 1


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to reuse freed memory (see the module docstring); True when it did,
  False where the C library is not glibc (nothing is changed there)."""
  if _glibc_version() is None:
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)


def huge_pages_environment(orig_argv: Sequence[str], argv0: str, package: str,
                           environ: Mapping[str, str], glibc: tuple[int, int] | None,
                           thp_mode: str | None) -> dict[str, str] | None:
  """The environment to re-execute a binary with so that malloc uses huge pages, or None.

  orig_argv: the interpreter's command line (`sys.orig_argv`); argv0: `sys.argv[0]`, which
  is '-m' while `python -m` is still importing the binary's package; glibc: its (major,
  minor) version (None: another C library); thp_mode: the kernel's transparent huge page mode
  ('always', 'madvise', 'never'; None: unknown). None unless all of: the process is
  `python -m <package>.<binary>`, still starting; no --nohuge_pages (or --huge_pages=false)
  on its command line; GLIBC_TUNABLES does not already set `glibc.malloc.hugetlb`; glibc >=
  2.35; the kernel's mode is 'madvise'. The returned environment is `environ` with
  HUGE_PAGES_TUNABLE appended to GLIBC_TUNABLES (any other tunables kept).
  """
  args = list(orig_argv)
  if argv0 != "-m" or "-m" not in args[:-1]:
    return None
  at = args.index("-m")
  module, flags = args[at + 1], args[at + 2:]
  if not module.startswith(package + "."):
    return None
  if any(_turns_off_huge_pages(flag) for flag in flags):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables or glibc is None or glibc < (2, 35):
    return None
  if thp_mode != "madvise":
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
  return env


def _turns_off_huge_pages(arg: str) -> bool:
  """Whether a command-line argument is absl's --nohuge_pages or --huge_pages=<false> (one or
  two dashes; false, f, 0 in any case)."""
  name, _, value = arg.lstrip("-").partition("=")
  if not arg.startswith("-"):
    return False
  return name == "nohuge_pages" or (name == "huge_pages" and value.lower() in ("false", "f", "0"))


def _glibc_version() -> tuple[int, int] | None:
  name, version = platform.libc_ver()
  if platform.system() != "Linux" or name != "glibc":
    return None
  try:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def _thp_mode() -> str | None:
  """The bracketed word of the kernel's THP setting, e.g. 'always [madvise] never'."""
  try:
    with open(_THP_MODE_FILE) as f:
      words = f.read().split()
  except OSError:
    return None
  chosen = [w[1:-1] for w in words if w.startswith("[") and w.endswith("]")]
  return chosen[0] if chosen else None


def start_with_huge_pages(package: str) -> None:
  """Re-executes `python -m <package>.<binary> ...` with HUGE_PAGES_TUNABLE set when
  `huge_pages_environment` says so (call it from the package's `__init__`, which `python -m`
  imports before the binary); otherwise returns and nothing changes."""
  argv0 = sys.argv[0] if sys.argv else ""
  if argv0 != "-m":  # not `python -m` starting: skip reading the C library and the kernel
    return
  env = huge_pages_environment(getattr(sys, "orig_argv", ()), argv0, package, os.environ,
                               _glibc_version(), _thp_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
