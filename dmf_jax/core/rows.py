"""Item rows: the one way per-item work is done — once per distinct item, then gathered.

A batch names items at many positions (B targets, B x L behaviours, N candidates). `Rows`
holds per-item values for R distinct items and the row of every position:

  values [R, ...]   one entry per distinct item
  index  int [...]  the row of each position, in [0, R)   (None: `values` is per position)

so any per-item computation f (an embedding lookup, a projection, a Q-Former) runs on R rows
with `rows.map(f)` and reaches the positions with `rows.take()`: `Rows(f(v), i).take() ==
f(v[i])` for row-wise f. `item_rows` picks the distinct set: the whole catalog (R = V + 1,
the last row the out-of-range id) when that is fewer rows than the batch's item positions — a
small catalog, or a training batch of B x L behaviours — and the positions themselves otherwise
(R = positions, index None: no gather, no scatter in the backward pass). Within one compiled
step the catalog rows are computed once (XLA merges the identical computations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dmf_jax.core.sharding import take_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
  """Per-item `values` [R, ...] and the row `index` int32 [...] of each position (or None)."""

  values: jax.Array
  index: jax.Array | None = None

  @property
  def positions(self) -> tuple[int, ...]:
    """The shape of the positions the rows stand for."""
    if self.index is None:
      raise ValueError("Rows without an index: the positions are the values' leading dims")
    return tuple(self.index.shape)

  def map(self, fn: Callable[[jax.Array], jax.Array]) -> "Rows":
    """`fn` applied to the rows (row-wise `fn`: [R, ...] -> [R, ...]); the index is kept."""
    return Rows(fn(self.values), self.index)

  def take(self) -> jax.Array:
    """The values at the positions: [..., ...] (`values` itself when per position)."""
    if self.index is None:
      return self.values
    return take_rows(self.values, self.index)


def item_rows(item_ids: jax.Array, num_items: int, positions: int | None = None) -> Rows:
  """The distinct items of `item_ids` (int [...], range-checked by the caller) as `Rows` of ids.

  Whole catalog when it has fewer rows than `positions` (default: item_ids.size; a model passes
  all the item positions of its batch, so the candidates of a training batch share the
  history's catalog rows): values = arange(V + 1) and index = the ids, out-of-range ids pointing
  at row V (so each lookup keeps its own out-of-range rule); else values = the ids, index None.
  The choice depends only on static shapes, so it is fixed per compiled program.
  """
  item_ids = jnp.asarray(item_ids, jnp.int32)
  if (item_ids.size if positions is None else positions) <= num_items + 1:
    return Rows(item_ids)
  safe = jnp.where((item_ids >= 0) & (item_ids < num_items), item_ids, num_items)
  return Rows(jnp.arange(num_items + 1, dtype=jnp.int32), safe)
