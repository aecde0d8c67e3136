"""From logged events to CTR examples: strict-history behaviour sequences and chronological splits.

Protocol (README, "MovieLens-100K multimodal"): events are ordered per user by (timestamp, item
id); the behaviour sequence of a target is the user's positive items with timestamp strictly
before the target's (same-second events excluded), the last `seq_len` of them, most recent last.
Per-user chronological split: with n events, the last max(1, round(0.1 n)) go to test, the
max(1, round(0.1 n)) before them to validation, the rest to train (Python's round).
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "validation", "test")


def order_events(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
  """Permutation sorting events by (user, timestamp, item)."""
  return np.lexsort((item, timestamp, user))


def user_boundaries(sorted_user: np.ndarray) -> np.ndarray:
  """Start offsets of each user's run in a user-sorted array, plus the end: [num_users + 1]."""
  starts = np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]])
  return np.r_[starts, len(sorted_user)]


def build_histories(
    user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, label: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Strict-history sequences for events already ordered by (user, timestamp, item).

  Returns hist_item_id int32 [n, seq_len] (chronological, most recent at index len - 1, padding
  0 after), hist_len int32 [n] and hist_timestamp int64 [n, seq_len] (for leakage checks).
  """
  n = len(user)
  hist = np.zeros((n, seq_len), np.int32)
  hist_ts = np.full((n, seq_len), -1, np.int64)
  hist_len = np.zeros(n, np.int32)
  bounds = user_boundaries(user)
  for start, end in zip(bounds[:-1], bounds[1:]):
    ts, lab = timestamp[start:end], label[start:end]
    pos = np.flatnonzero(lab > 0)
    pos_items, pos_ts = item[start:end][pos], ts[pos]
    # Positives with timestamp < target's: pos_ts is sorted, so a left searchsorted counts them.
    counts = np.searchsorted(pos_ts, ts, side="left")
    for i, count in enumerate(counts):
      lo = max(0, count - seq_len)
      length = count - lo
      hist[start + i, :length] = pos_items[lo:count]
      hist_ts[start + i, :length] = pos_ts[lo:count]
      hist_len[start + i] = length
  return hist, hist_len, hist_ts


def strict_histories(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray,
                     label: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """`build_histories` without Python loops (for millions of events), the same result.

  For events ordered by (user, timestamp, item): event e's history is the positives p of its
  user with ts_p < ts_e, the last L of them. With the positives in order, those are the slice
  [max(first_u, c_e - L), c_e) where c_e counts the positives before (user_e, ts_e) and first_u
  those before user_e's first: two searchsorted calls and one [n, L] gather.
  Returns hist_item_id int32 [n, L] (left-aligned, 0-padded) and hist_len int32 [n].
  """
  n = len(user)
  pos = np.flatnonzero(label > 0)
  # (user, ts) as one sortable key: users ranked densely (they come in runs), timestamps
  # shifted to start at 0, so the key cannot overflow for any realistic range.
  user_rank = np.zeros(n, np.int64)
  if n:
    np.cumsum(user[1:] != user[:-1], out=user_rank[1:])
  ts_rank = timestamp.astype(np.int64) - (timestamp.min() if n else 0)
  key = user_rank * (int(ts_rank.max(initial=0)) + 1) + ts_rank
  pos_key, pos_items = key[pos], item[pos].astype(np.int32)
  count = np.searchsorted(pos_key, key, side="left")
  first = np.searchsorted(pos_key, key - ts_rank, side="left")
  length = np.minimum(count - first, seq_len).astype(np.int32)
  slots = np.arange(seq_len)[None, :]
  valid = slots < length[:, None]
  index = np.where(valid, (count - length)[:, None] + slots, 0)
  hist = np.where(valid, pos_items.take(index) if len(pos_items) else 0, 0).astype(np.int32)
  return hist, length


def per_user_split(user: np.ndarray) -> np.ndarray:
  """Split index per event (0 train, 1 validation, 2 test) for events ordered per user
  (vectorised `split_sizes` per run of a user)."""
  bounds = user_boundaries(user)
  counts = np.diff(bounds)
  run = np.repeat(np.arange(len(counts)), counts)
  position = np.arange(len(user)) - bounds[:-1][run]
  n_test, n_val = per_user_split_sizes(counts)
  from_end = counts[run] - position  # 1 for a user's last event
  return np.where(from_end <= n_test[run], 2,
                  np.where(from_end <= (n_test + n_val)[run], 1, 0)).astype(np.int8)


def per_user_split_sizes(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(n_test, n_validation) per user with counts[u] events: `split_sizes`, vectorised."""
  counts = np.asarray(counts, np.int64)
  tenth = np.maximum(1, np.round(0.1 * counts)).astype(np.int64)
  n_test = np.minimum(tenth, counts)
  return n_test, np.minimum(tenth, counts - n_test)


def split_sizes(n: int) -> tuple[int, int]:
  """(n_test, n_validation) for a user with n events."""
  tenth = max(1, round(0.1 * n))
  n_test = min(tenth, n)
  n_val = min(tenth, n - n_test)
  return n_test, n_val


GLOBAL_TIME_FRACTIONS = (0.8, 0.1)


def cut_quantiles(fractions=GLOBAL_TIME_FRACTIONS) -> list[float]:
  """The quantiles of the global-time split's two cuts: fractions[0] and their sum."""
  return [fractions[0], fractions[0] + fractions[1]]


def global_time_cuts(timestamp: np.ndarray, fractions=GLOBAL_TIME_FRACTIONS) -> np.ndarray:
  """The two cut times of the global-time split."""
  return np.quantile(timestamp, cut_quantiles(fractions))


def global_time_split(timestamp: np.ndarray, fractions=GLOBAL_TIME_FRACTIONS,
                      cuts: np.ndarray | None = None) -> np.ndarray:
  """Split index per event by a global time cut at the given quantiles (cold-start report);
  `cuts` (from `global_time_cuts` of all events) when `timestamp` is a part of them."""
  cuts = global_time_cuts(timestamp, fractions) if cuts is None else cuts
  return np.where(timestamp < cuts[0], 0, np.where(timestamp < cuts[1], 1, 2)).astype(np.int8)


def examples_from_events(
    user: np.ndarray,
    item: np.ndarray,
    timestamp: np.ndarray,
    label: np.ndarray,
    user_table: dict[str, np.ndarray],
    seq_len: int,
    split: np.ndarray | str = "per_user",
) -> dict[str, dict[str, np.ndarray]]:
  """Impression examples per split from raw events.

  Args:
    user, item, timestamp, label: [n] arrays of events in any order (user and item are
      dense indices, label 0/1).
    user_table: field name -> array indexed by user index ([num_users] or [num_users, M]).
    seq_len: L, the longest behaviour sequence kept.
    split: 'per_user' (chronological 80/10/10), 'global_time' (global time cut), or an
      explicit int array [n] of 0/1/2 given in the events' original order.

  Returns:
    {split name: {user/<field>, item_id, timestamp, label, hist_item_id [m, L], hist_len}}
    with each split's rows ordered by (user, timestamp, item).
  """
  order = order_events(user, item, timestamp)
  user, item, ts, label = user[order], item[order], timestamp[order], label[order]
  hist, hist_len = strict_histories(user, item, ts, label, seq_len)
  if isinstance(split, str):
    if split == "per_user":
      split = per_user_split(user)
    elif split == "global_time":
      split = global_time_split(ts)
    else:
      raise ValueError(f"split {split!r} is not one of ('per_user', 'global_time')")
  else:
    split = np.asarray(split)[order]
  out = {}
  for index, name in enumerate(SPLITS):
    sel = split == index
    rows = {f"user/{k}": np.asarray(v)[user[sel]] for k, v in user_table.items()}
    rows.update(
        item_id=item[sel].astype(np.int32), timestamp=ts[sel].astype(np.int64),
        label=label[sel].astype(np.float32), hist_item_id=hist[sel], hist_len=hist_len[sel],
    )
    out[name] = rows
  return out


def to_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Examples from `examples_from_events` as one model batch (mask from hist_len, weight 1)."""
  seq_len = rows["hist_item_id"].shape[1]
  batch = {k: v for k, v in rows.items() if k != "hist_len"}
  batch["hist_mask"] = np.arange(seq_len)[None, :] < rows["hist_len"][:, None]
  batch["weight"] = np.ones(len(rows["label"]), np.float32)
  return batch
