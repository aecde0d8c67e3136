"""Sequence construction and splits, and the synthetic generator."""

import numpy as np

from dmf_jax.data import sequences
from dmf_jax.data import synthetic
from helpers import TINY, tiny_problem


def test_strict_history_excludes_same_second_events_and_keeps_last_l():
  # user 0: events at ts 1 (items 5, 3 clicked), ts 1 (item 9), ts 2 (item 4 not clicked), ts 3.
  user = np.array([0, 0, 0, 0, 0, 1, 1])
  item = np.array([5, 3, 9, 4, 7, 1, 2])
  ts = np.array([1, 1, 1, 2, 3, 10, 11])
  label = np.array([1, 1, 1, 0, 1, 1, 1])
  order = sequences.order_events(user, item, ts)
  user, item, ts, label = user[order], item[order], ts[order], label[order]
  np.testing.assert_array_equal(item[:5], [3, 5, 9, 4, 7])  # (ts, item id) order
  hist, length, hist_ts = sequences.build_histories(user, item, ts, label, seq_len=2)
  np.testing.assert_array_equal(length, [0, 0, 0, 2, 2, 0, 1])
  np.testing.assert_array_equal(hist[3], [5, 9])  # last 2 of (3, 5, 9): most recent last
  np.testing.assert_array_equal(hist[6], [1, 0])  # padding after the real behaviours
  for i in range(len(user)):
    assert np.all(hist_ts[i, :length[i]] < ts[i])


def test_split_sizes_follow_the_protocol():
  assert sequences.split_sizes(20) == (2, 2)
  assert sequences.split_sizes(25) == (2, 2)  # round(2.5) == 2 (half to even)
  assert sequences.split_sizes(35) == (4, 4)  # round(3.5) == 4
  assert sequences.split_sizes(3) == (1, 1)
  assert sequences.split_sizes(1) == (1, 0)
  user = np.repeat([0, 1], [10, 30])
  split = sequences.per_user_split(user)
  np.testing.assert_array_equal(np.bincount(split[:10]), [8, 1, 1])
  np.testing.assert_array_equal(np.bincount(split[10:]), [24, 3, 3])
  np.testing.assert_array_equal(split[:10], [0] * 8 + [1, 2])
  counts = np.arange(1, 300)
  n_test, n_val = sequences.per_user_split_sizes(counts)
  assert list(zip(n_test.tolist(), n_val.tolist())) == [sequences.split_sizes(n) for n in counts]


def test_synthetic_is_deterministic_and_has_cold_items():
  a = synthetic.generate(TINY)[2]
  b = synthetic.generate(TINY)[2]
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  schema, catalog, splits = tiny_problem()
  catalog.validate(schema)
  train_items = set(splits["train"]["item_id"].tolist())
  test_items = set(splits["test"]["item_id"].tolist())
  assert test_items - train_items, "some test items must be cold"
  rate = splits["train"]["label"].mean()
  assert 0.25 < rate < 0.75
  mask = splits["train"]["hist_mask"]
  assert np.all(np.diff(mask.astype(int), axis=1) <= 0)  # real behaviours first, then padding


def test_vectorised_strict_histories_equal_the_reference():
  """`strict_histories` (no Python loops) == `build_histories` on random events with
  same-second ties, users without positives, one-event users and histories longer than L."""
  rng = np.random.default_rng(7)
  for n, users, seq_len in ((0, 1, 4), (1, 1, 4), (300, 40, 3), (5000, 150, 8), (5000, 3, 50)):
    user = rng.integers(0, users, n)
    item = rng.integers(0, 60, n)
    ts = rng.integers(0, 25, n) * 3 + 10**9  # many ties within a user
    label = (rng.random(n) < 0.45).astype(np.int32)
    label[user == 0] = 0  # a user without positives
    order = sequences.order_events(user, item, ts)
    user, item, ts, label = user[order], item[order], ts[order], label[order]
    hist, hist_len, _ = sequences.build_histories(user, item, ts, label, seq_len)
    fast, fast_len = sequences.strict_histories(user, item, ts, label, seq_len)
    np.testing.assert_array_equal(fast_len, hist_len)
    np.testing.assert_array_equal(fast, hist)
    assert fast.dtype == np.int32 and fast.shape == (n, seq_len)


def test_streamed_problem_chunks_are_strict_and_deterministic():
  """Chunks of the streamed generator: per-user chronological 80/10/10 splits, strict
  histories (checked against the reference), cold items only in held-out events, and the same
  chunk twice from its own seed."""
  import dataclasses

  config = dataclasses.replace(TINY, num_users=90, num_items=200)
  problem = synthetic.StreamedProblem(config, chunk_users=40)
  assert problem.num_chunks == 3
  seen_users = 0
  for c in range(problem.num_chunks):
    rows = problem.chunk(c)
    again = problem.chunk(c)
    for key in rows:
      np.testing.assert_array_equal(rows[key], again[key], err_msg=key)
    user, ts = rows["user/user_id"], rows["timestamp"]
    assert np.all(np.diff(user) >= 0)
    hist, hist_len, _ = sequences.build_histories(user, rows["item_id"], ts, rows["label"],
                                                  config.seq_len)
    np.testing.assert_array_equal(rows["hist_item_id"], hist)
    np.testing.assert_array_equal(rows["hist_len"], hist_len)
    np.testing.assert_array_equal(rows["split"], sequences.per_user_split(user))
    assert not problem.cold[rows["item_id"][rows["split"] == 0]].any()
    seen_users += len(np.unique(user))
  assert seen_users == 90
  catalog = problem.catalog()
  assert catalog.modalities["text"].shape == (200, 8) and catalog.side["tags"].shape == (200, 3)
