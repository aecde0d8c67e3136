"""The evaluation batch: the largest whose working set fits the device's budget.

`config.eval_batch_size = 0` (the default) sizes evaluation per run, from XLA's own figures for
the compiled predict step, so every model gets its own size and evaluates in one compiled shape:

  working set(b) = temporaries + the batch + the logits (per device)   (linear in b: two
                   small compiles give its intercept, per-catalog-row work, and its slope)
  budget         = GPU / TPU: the device memory the train state leaves free (`memory_stats`),
                   x BUDGET_FRACTION;
                   CPU: the last-level cache, at most CPU_CACHE_PER_CPU per processor this
                   process may run on. On the 2-core CPU of BUILD_NOTES a batch whose
                   temporaries outgrow the 32 MiB L3 evaluates about 2x slower (DIN: 96,628
                   examples/s at 512, 22 MiB; 42,265 at 1,024, 44 MiB), so on a CPU "fits"
                   means the cache, not the RAM. A virtual machine may list its host's whole
                   L3 (a 2-core VM of BUILD_NOTES lists 480 MiB, and there the validation
                   split evaluates fastest at about 20-30 MiB too: BST 0.50 s at 256 rows,
                   0.75 s at 4,096), hence the cap by the processors it has.
  size           = the largest unit x 2^k with working set(size) <= budget (unit: the data
                   axis times the processes, so every device and process gets whole rows),
                   capped at the largest evaluated split (more would be padding only).
  check          = a size beyond the probes is compiled and measured before it is used: the
                   working set is not always linear at the probes' size. A fixed peak (EM3's
                   content tower over the whole catalog, 14 MiB) can hide the per-row growth
                   there (its probes at 64 and 128 rows both measured 14.4 MiB, so the line
                   said 9,988 rows fit in 19 MiB; 4,096 rows need 205 MiB). A size that does
                   not fit is replaced by the line through the largest size measured to fit
                   and the least measured not to (a chord: above a convex curve between them,
                   so it does not overshoot), and that size is measured in turn, at most
                   MAX_CHECKS compiles in all; the largest size measured to fit is used. The
                   measuring compile is the one the run then uses (`Partitioner.predict_step`
                   keeps it): a line that was right costs no extra compile.

A positive `eval_batch_size` is used as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
from etils import epath

from dmf_jax.core import host

BUDGET_FRACTION = 0.8  # of an accelerator's free memory: room for XLA's own buffers
CPU_CACHE_FALLBACK = 32 << 20  # bytes, when the last-level cache size cannot be read
CPU_CACHE_PER_CPU = 16 << 20  # bytes of cache counted per usable processor, at most
PROBE_ROWS = 64  # the probe compiles run at PROBE_ROWS and 2 x PROBE_ROWS units (or the split)
MAX_CHECKS = 4  # compiles that check a size beyond the probes, at most
FALLBACK_BATCH = 2048  # when XLA reports no memory figures


def last_level_cache_bytes(caches: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
  """The largest cache listed under `caches` (Linux sysfs: index*/size, e.g. '32768K'),
  CPU_CACHE_FALLBACK when none can be read."""
  sizes = []
  for path in epath.Path(caches).glob("index*/size"):
    try:
      text = path.read_text().strip().upper()
    except OSError:
      continue
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text.rstrip("KMG")
    if digits.isdigit():
      sizes.append(int(digits) * scale)
  return max(sizes, default=CPU_CACHE_FALLBACK)


def cpu_cache_budget(cache_bytes: int, cpus: int) -> tuple[int, str]:
  """(bytes, what they are): the last-level cache, at most CPU_CACHE_PER_CPU x cpus."""
  cap = CPU_CACHE_PER_CPU * max(cpus, 1)
  if cache_bytes <= cap:
    return cache_bytes, "the CPU's last-level cache"
  return cap, (f"the CPU's last-level cache for {max(cpus, 1)} processor(s) (at most "
               f"{CPU_CACHE_PER_CPU >> 20} MiB each of the {cache_bytes >> 20} MiB listed)")


def device_budget(device: jax.Device) -> tuple[int, str]:
  """(bytes an evaluation batch's working set may use on `device`, what they are)."""
  if device.platform == "cpu":
    return cpu_cache_budget(last_level_cache_bytes(), host.usable_cpus())
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    return 0, f"{device.platform} memory (unknown)"
  free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
  return int(free * BUDGET_FRACTION), f"{BUDGET_FRACTION:.0%} of the free {device.platform} memory"


def working_set_bytes(compiled, batch_bytes: int) -> int | None:
  """Temporaries + outputs of a compiled step, plus its batch's bytes (per device); None when
  XLA reports no memory figures."""
  try:
    analysis = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
    return None
  if analysis is None:
    return None
  return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes + batch_bytes)


def largest_fitting(working_set: Callable[[int], int | None], *, unit: int, largest: int,
                    budget: int) -> tuple[int, dict]:
  """The largest unit x 2^k (>= unit, <= largest rounded up to unit) whose working set fits
  `budget`, extrapolated from two probes and measured when beyond them (module docstring);
  and the figures it was chosen from ('checked': the [rows, bytes] measured beyond them;
  'working_set_bytes': the size's, measured or else predicted).

  working_set(b): the working-set bytes of the step compiled for b rows (None: unknown).
  """
  cap = max(unit, -(-largest // unit) * unit)
  large = min(cap, 2 * unit * PROBE_ROWS)
  small = max(unit, large // 2 // unit * unit)
  if small == large:  # one unit is the whole split
    return cap, {"budget": budget}
  a_bytes, b_bytes = working_set(small), working_set(large)
  figures = {"probe_rows": [small, large], "probe_bytes": [a_bytes, b_bytes], "budget": budget}
  if a_bytes is None or b_bytes is None or budget <= 0:
    return min(cap, -(-FALLBACK_BATCH // unit) * unit), figures
  slope, intercept = _line((small, a_bytes), (large, b_bytes))
  size = _fitting_size(slope, intercept, unit=unit, cap=cap, budget=budget)
  figures.update(bytes_per_row=slope, fixed_bytes=intercept,
                 predicted_bytes=intercept + slope * size)
  checked, fits, over = [], (large, b_bytes), None  # the largest that fits, the least not
  while size > fits[0] and len(checked) < MAX_CHECKS:
    measured = working_set(size)
    checked.append([size, measured])
    if measured is None or measured <= budget:
      fits = (size, measured)
      if over is None or measured is None:
        break
    else:
      over = (size, measured)
    size = _fitting_size(*_line(fits, over), unit=unit, cap=cap, budget=budget)
  if checked:
    figures["checked"] = checked
    size, measured = fits
    if measured is not None:
      figures["working_set_bytes"] = measured
  figures.setdefault("working_set_bytes", figures["predicted_bytes"])
  return size, figures


def _line(a: tuple[int, int], b: tuple[int, int]) -> tuple[float, float]:
  """(slope >= 1 byte per row, intercept) of the line through two (rows, bytes) points."""
  slope = max((b[1] - a[1]) / max(b[0] - a[0], 1), 1.0)
  return slope, a[1] - slope * a[0]


def _fitting_size(slope: float, intercept: float, *, unit: int, cap: int, budget: int) -> int:
  """The largest unit x 2^k (at least unit) the line puts within `budget`, `cap` beyond it."""
  rows = (budget - intercept) / slope
  size = unit * 2 ** max(0, math.floor(math.log2(max(rows / unit, 1.0))))
  return cap if size >= cap else size
