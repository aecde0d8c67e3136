"""Item rows: the distinct set chosen by shape, a batch's distinct items per data shard, and
take(map(f)) == f at every position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmf_jax.core.rows import (Rows, batch_unique_rows, item_rows, pad_unique_rows,
                               unique_row_count)


def test_whole_catalog_when_fewer_items_than_positions():
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 7, (4, 5)), jnp.int32)
  rows = item_rows(ids.at[0, 0].set(9).at[1, 1].set(-2), num_items=7)  # 20 positions > 8 rows
  np.testing.assert_array_equal(rows.values, np.arange(8))
  assert rows.positions == (4, 5)
  want = np.asarray(ids).copy()
  want[0, 0], want[1, 1] = 7, 7  # out of range: the last row (id V)
  np.testing.assert_array_equal(rows.index, want)
  table = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)), jnp.float32)
  f = lambda v: table[v] * 2.0
  np.testing.assert_allclose(rows.map(f).take(), f(jnp.asarray(want)), rtol=1e-6)
  assert rows.catalog and rows.map(f).catalog  # the whole catalog, marked as such


def test_positions_themselves_when_the_catalog_is_larger():
  ids = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
  rows = item_rows(ids, num_items=100)
  assert rows.index is None and not rows.catalog
  np.testing.assert_array_equal(rows.take(), ids)
  np.testing.assert_array_equal(rows.map(lambda v: v + 1).take(), ids + 1)


def test_rows_is_a_pytree():
  import jax  # pylint: disable=g-import-not-at-top

  rows = Rows(jnp.ones((3, 2)), jnp.zeros((4,), jnp.int32))
  assert len(jax.tree.leaves(rows)) == 2
  assert len(jax.tree.leaves(Rows(jnp.ones((3, 2))))) == 1


def test_batch_unique_rows_per_shard_reconstruct_every_position():
  rng = np.random.default_rng(0)
  item_id = rng.integers(0, 50, 12)
  hist = rng.integers(0, 50, (12, 7))
  for shards in (1, 3, 4):
    out = batch_unique_rows(item_id, hist, shards, counts=(8, 16, 32, 64))
    table, row, hist_row = out["unique_items"], out["item_row"], out["hist_item_row"]
    s, u = table.shape
    per = 12 // shards
    assert s == shards and table.dtype == np.int32
    for b in range(12):  # every position reads its own id from its own shard's rows
      assert table[b // per, row[b]] == item_id[b]
      np.testing.assert_array_equal(table[b // per, hist_row[b]], hist[b])
    distinct = max(len(np.unique(np.concatenate([item_id[k * per:(k + 1) * per],
                                                  hist[k * per:(k + 1) * per].ravel()])))
                   for k in range(shards))
    # the smallest count, never more rows than the shard's positions
    assert u == min(min(b for b in (8, 16, 32, 64) if b >= distinct), per * 8)


def test_an_overflowing_batch_takes_the_next_count_and_never_drops_an_id():
  item_id, hist = np.arange(10), np.arange(10, 40).reshape(10, 3)  # 40 distinct ids
  assert unique_row_count(40, 40, (8, 16)) == 40  # past the largest count: all positions
  out = batch_unique_rows(item_id, hist, 1, counts=(8, 16))
  assert out["unique_items"].shape == (1, 40)
  assert sorted(out["unique_items"][0]) == list(range(40))
  assert batch_unique_rows(item_id, hist, 1, counts=(8, 64))["unique_items"].shape == (1, 40)
  assert batch_unique_rows(item_id[:2], hist[:2], 1, counts=(8, 64))["unique_items"].shape == (
      1, 8)
  with pytest.raises(ValueError, match="batch of 10 examples does not split into 3"):
    batch_unique_rows(item_id, hist, 3)


def test_sharded_rows_take_and_gradients_equal_the_direct_gather():
  rng = np.random.default_rng(2)
  item_id, hist = rng.integers(0, 30, 8), rng.integers(0, 30, (8, 5))
  out = batch_unique_rows(item_id, hist, 4, counts=(16, 64))
  table = jnp.asarray(rng.normal(size=(30, 3)), jnp.float32)

  def via_rows(t):
    rows = Rows(jnp.asarray(out["unique_items"]), jnp.asarray(out["hist_item_row"]), shards=4)
    return rows.map(lambda ids: jnp.tanh(t[ids])).take()

  direct = lambda t: jnp.tanh(t[jnp.asarray(hist)])
  np.testing.assert_allclose(via_rows(table), direct(table), rtol=1e-6)
  cot = jnp.asarray(rng.normal(size=(8, 5, 3)), jnp.float32)
  g1 = jax.grad(lambda t: jnp.sum(via_rows(t) * cot))(table)
  g2 = jax.grad(lambda t: jnp.sum(direct(t) * cot))(table)
  np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_take_swapped_equals_take_with_the_first_two_dims_swapped():
  """`take_swapped()`: a table's rows gathered with the index transposed, rows per position
  and per data shard taken then swapped; all equal swapaxes(take(), 0, 1)."""
  rng = np.random.default_rng(4)
  ids = jnp.asarray(rng.integers(0, 7, (4, 5)), jnp.int32)
  table = item_rows(ids, num_items=7).map(lambda v: jnp.stack([v, 2 * v], -1).astype(jnp.float32))
  per_position = Rows(jnp.asarray(rng.normal(size=(4, 5, 2)), jnp.float32))
  out = batch_unique_rows(rng.integers(0, 30, 8), rng.integers(0, 30, (8, 5)), 4, counts=(16, 64))
  sharded = Rows(jnp.asarray(out["unique_items"]), jnp.asarray(out["hist_item_row"]), shards=4)
  for rows in (table, per_position, sharded):
    np.testing.assert_array_equal(rows.take_swapped(), jnp.swapaxes(rows.take(), 0, 1))
  assert table.take_swapped().shape == (5, 4, 2)


def test_unique_rows_padded_to_an_agreed_count_read_the_same_values():
  """Several processes pad their shards' rows to the largest count any of them needs: each
  position still reads its own id, the added rows repeat the shard's first id."""
  rng = np.random.default_rng(5)
  item_id, hist = rng.integers(0, 40, 6), rng.integers(0, 40, (6, 4))
  out = batch_unique_rows(item_id, hist, 2, counts=(8, 64))  # 12 and 14 distinct: 15 rows
  assert out["unique_items"].shape == (2, 15)
  padded = pad_unique_rows(out | {"other": 1}, 23)
  assert padded["unique_items"].shape == (2, 23) and padded["other"] == 1
  np.testing.assert_array_equal(padded["unique_items"][:, :15], out["unique_items"])
  np.testing.assert_array_equal(padded["unique_items"][:, 15:],
                                np.repeat(out["unique_items"][:, :1], 8, axis=1))
  rows = Rows(jnp.asarray(padded["unique_items"]), jnp.asarray(padded["hist_item_row"]), shards=2)
  np.testing.assert_array_equal(rows.take(), hist)
  targets = Rows(jnp.asarray(padded["unique_items"]), jnp.asarray(padded["item_row"]), shards=2)
  np.testing.assert_array_equal(targets.take(), item_id)
  with pytest.raises(ValueError, match="cannot pad 15 unique rows down to 8"):
    pad_unique_rows(out, 8)
