"""Events grouped by user out of core: user-range partitions spilled to disk, loaded one at a time.

A streamed build reads its events in chunks of the input file(s), in any order. Each chunk's
events (dense user index, dense item index, timestamp, label) are appended to the partition of
their user's range, partition p holding users [starts[p], starts[p + 1]) (consecutive users, about
`max_events` events each; a user with more is a partition of its own). A partition, loaded
alone, holds every event of its users, so per-user work (ordering, strict histories, the
per-user split) runs on it as on the whole data, and partitions in order give the users in
order: the records come out exactly as from the whole data at once, in memory bounded by one
partition (plus per-user state), not by the number of impressions.

Files: `<root>/p<partition>/c<chunk>.npy`, one per (partition, input chunk) pair, written once
(no appends, so any `epath` file system works, object stores included).

`kth_smallest` and `linear_quantiles` give exact quantiles (numpy's default 'linear' method)
of a column too large to hold: a few histogram passes over the partitions.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np
from etils import epath

EVENT = np.dtype([("user", "<i4"), ("item", "<i4"), ("timestamp", "<i8"), ("label", "i1")])
PARTITION_EVENTS = 500_000


def user_ranges(counts: np.ndarray, max_events: int) -> np.ndarray:
  """First user of each partition, then the number of users: consecutive users with about
  `max_events` events per partition (counts: events per user)."""
  counts = np.asarray(counts, np.int64)
  before = np.cumsum(counts) - counts
  part = before // max(1, max_events)
  starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]]) if len(counts) else np.zeros(0, int)
  return np.r_[starts, len(counts)].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SpilledEvents:
  """The events of `root`, partitioned by the user ranges `starts` (see module docstring)."""

  root: str
  starts: tuple[int, ...]

  @property
  def num_partitions(self) -> int:
    return len(self.starts) - 1

  def _dir(self, partition: int) -> epath.Path:
    return epath.Path(self.root) / f"p{partition:05d}"

  def write_chunk(self, chunk: int, user, item, timestamp, label) -> None:
    """Spills one input chunk's events (user: dense indices) to their partitions."""
    events = np.empty(len(user), EVENT)
    events["user"], events["item"], events["timestamp"], events["label"] = (
        user, item, timestamp, label)
    part = np.searchsorted(np.asarray(self.starts), events["user"], side="right") - 1
    order = np.argsort(part, kind="stable")  # keeps the input order within a partition
    events, part = events[order], part[order]
    cuts = np.flatnonzero(np.r_[True, part[1:] != part[:-1], True]) if len(part) else [0]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
      folder = self._dir(int(part[lo]))
      folder.mkdir(parents=True, exist_ok=True)
      with (folder / f"c{chunk:06d}.npy").open("wb") as f:
        np.save(f, events[lo:hi], allow_pickle=False)

  def load(self, partition: int) -> np.ndarray:
    """A partition's events (EVENT records) in input order."""
    folder = self._dir(partition)
    parts = []
    if folder.exists():
      for path in sorted(folder.glob("c*.npy")):
        with path.open("rb") as f:
          parts.append(np.load(f, allow_pickle=False))
    return np.concatenate(parts) if parts else np.zeros(0, EVENT)

  def timestamps(self) -> Iterable[np.ndarray]:
    for p in range(self.num_partitions):
      yield self.load(p)["timestamp"]


def kth_smallest(columns: Callable[[], Iterable[np.ndarray]], ks: Iterable[int]) -> list[int]:
  """The k-th smallest values (0-based) of the integers that `columns()` yields, array by array,
  without holding them: each pass counts values in 65,536 bins of the remaining range."""
  bins = 1 << 16
  lo = hi = None
  for a in columns():
    if len(a):
      lo = int(a.min()) if lo is None else min(lo, int(a.min()))
      hi = int(a.max()) if hi is None else max(hi, int(a.max()))
  if lo is None:
    raise ValueError("kth_smallest: no values")
  state = {k: [lo, hi, k] for k in ks}  # k -> [low, high, rank within [low, high]]
  while any(low < high for low, high, _ in state.values()):
    open_ks = [k for k, (low, high, _) in state.items() if low < high]
    width = {k: -(-(state[k][1] - state[k][0] + 1) // bins) for k in open_ks}
    hist = {k: np.zeros(bins, np.int64) for k in open_ks}
    for a in columns():
      for k in open_ks:
        low, high, _ = state[k]
        sel = a[(a >= low) & (a <= high)]
        offset = (sel.astype(np.uint64) - np.uint64(low & ((1 << 64) - 1))) // np.uint64(width[k])
        hist[k] += np.bincount(offset.astype(np.int64), minlength=bins)
    for k in open_ks:
      low, high, rank = state[k]
      cum = np.cumsum(hist[k])
      b = int(np.searchsorted(cum, rank, side="right"))
      below = int(cum[b - 1]) if b else 0
      new_low = low + b * width[k]
      state[k] = [new_low, min(high, new_low + width[k] - 1), rank - below]
  return [state[k][0] for k in ks]


def linear_quantiles(n: int, quantiles, kth: Callable[[list[int]], list[int]]) -> np.ndarray:
  """numpy's `np.quantile(a, quantiles)` (method 'linear') of n integers from their order
  statistics `kth([i, ...])` (the i-th smallest, 0-based): the same float64 arithmetic, so the
  cuts equal those of the whole column in memory."""
  q = np.asarray(quantiles, np.float64)
  virtual = (n - 1) * q
  previous = np.floor(virtual)
  at_end = virtual >= n - 1
  prev_index = np.where(at_end, n - 1, previous).astype(np.int64)
  next_index = np.where(at_end, n - 1, previous + 1).astype(np.int64)
  wanted = sorted(set(np.r_[prev_index, next_index].tolist()))
  values = dict(zip(wanted, kth(wanted)))
  a = np.array([values[i] for i in prev_index], np.int64)
  b = np.array([values[i] for i in next_index], np.int64)
  gamma = virtual - np.where(at_end, -1.0, previous)  # numpy moves both indices to -1 there
  diff = b - a
  out = a + diff * gamma
  np.subtract(b, diff * (1 - gamma), out=out, where=gamma >= 0.5)
  return out
