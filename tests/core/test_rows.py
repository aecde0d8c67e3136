"""Item rows: the distinct set chosen by shape, and take(map(f)) == f at every position."""

import jax.numpy as jnp
import numpy as np

from dmf_jax.core.rows import Rows, item_rows


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


def test_positions_themselves_when_the_catalog_is_larger():
  ids = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
  rows = item_rows(ids, num_items=100)
  assert rows.index is None
  np.testing.assert_array_equal(rows.take(), ids)
  np.testing.assert_array_equal(rows.map(lambda v: v + 1).take(), ids + 1)


def test_rows_is_a_pytree():
  import jax  # pylint: disable=g-import-not-at-top

  rows = Rows(jnp.ones((3, 2)), jnp.zeros((4,), jnp.int32))
  assert len(jax.tree.leaves(rows)) == 2
  assert len(jax.tree.leaves(Rows(jnp.ones((3, 2))))) == 1
