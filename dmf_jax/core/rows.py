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

Large catalogs: the input pipeline sends each batch's distinct items (`batch_unique_rows`,
numpy, in the Grain workers): per data shard s (the batch's examples split into S equal
groups, as the mesh splits them) the distinct ids of its targets and behaviours, padded to a
static count U from a few sizes (`UNIQUE_ROW_COUNTS`), and each position's row within its
shard. `Rows` with `shards=S` holds values [S, U, ...] and an index local to each shard, so
per-item work runs once per distinct item of each device's examples and every gather stays on
its device. With several processes each one's pipeline does this for its own data shards and
the processes agree on the largest U before a step (`pad_unique_rows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from dmf_jax.core.sharding import leading_axis, take_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
  """Per-item `values` [R, ...] and the row `index` int32 [...] of each position (or None).

  shards = S > 0: values [S, U, ...] grouped by data shard, index [B, ...] with the B
  positions' leading dim split into S equal groups, each indexing its own shard's U rows.
  catalog = True: the rows are the whole catalog, V + 1 of them (`item_rows`): row i < V is
  item i, row V the out-of-range ids' (so per-item work may read the catalog's tables whole)."""

  values: jax.Array
  index: jax.Array | None = None
  shards: int = dataclasses.field(default=0, metadata=dict(static=True))
  catalog: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def positions(self) -> tuple[int, ...]:
    """The shape of the positions the rows stand for."""
    if self.index is None:
      raise ValueError("Rows without an index: the positions are the values' leading dims")
    return tuple(self.index.shape)

  def map(self, fn: Callable[[jax.Array], jax.Array]) -> "Rows":
    """`fn` applied to the rows (row-wise `fn`: [R, ...] -> [R, ...]); the index is kept."""
    if not self.shards:
      return Rows(fn(self.values), self.index, catalog=self.catalog)
    s, u = self.values.shape[:2]
    out = fn(_reshape(self.values, (s * u, *self.values.shape[2:])))
    return Rows(_reshape(out, (s, u, *out.shape[1:])), self.index, self.shards)

  def take(self) -> jax.Array:
    """The values at the positions: [..., ...] (`values` itself when per position)."""
    if self.index is None:
      return self.values
    if not self.shards:
      return take_rows(self.values, self.index)
    s, b, rest = self.shards, self.index.shape[0], self.index.shape[1:]
    n = self.index.size // s  # each shard's positions, its own rows
    index = _reshape(self.index, (s, n, *([1] * (self.values.ndim - 2))))
    out = jnp.take_along_axis(self.values, index, axis=1, mode="promise_in_bounds")
    return _reshape(out, (b, *rest, *self.values.shape[2:]))

  def take_swapped(self) -> jax.Array:
    """`take()` with the positions' first two dims swapped: [B, L, ...] -> [L, B, ...]. Rows
    shared by all positions (a table) are gathered with the index transposed, so the gathered
    values are never transposed; rows per position or per data shard are taken, then swapped."""
    if self.index is not None and not self.shards and leading_axis(self.index) is None:
      return Rows(self.values, self.index.T).take()
    return jnp.swapaxes(self.take(), 0, 1)

  def index_bound(self) -> int:
    """The index's exclusive bound: the rows one position may point at (per shard)."""
    return self.values.shape[1] if self.shards else self.values.shape[0]


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
  return Rows(jnp.arange(num_items + 1, dtype=jnp.int32), safe, catalog=True)


def _reshape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """x.reshape(shape) keeping a mesh split of the leading dimension on the new leading one
  (the data shards: their groups stay on their devices)."""
  axis = leading_axis(x)
  if axis is None:
    return x.reshape(shape)
  return jax.lax.reshape(x, shape, out_sharding=P(axis, *([None] * (len(shape) - 1))))


# Distinct-item counts a batch's unique rows are padded to: static shapes, so each size is a
# compiled program; 8 sizes per octave (256 .. 131,072) pad by at most 12.5%, and a stream of
# similar batches meets one or two of them.
UNIQUE_ROW_COUNTS = tuple(sorted({m << (k - 3) for k in range(8, 17) for m in range(8, 17)}))


def unique_row_count(distinct: int, positions: int,
                     counts: Sequence[int] = UNIQUE_ROW_COUNTS) -> int:
  """The smallest of `counts` holding `distinct` ids (never more than `positions`, which always
  holds them: an overflowing batch takes the next count, no id is dropped)."""
  for size in counts:
    if distinct <= size:
      return min(size, positions)
  return positions


def catalog_exceeds_positions(num_items: int, batch_size: int, shards: int, seq_len: int
                              ) -> bool:
  """Whether the catalog's V + 1 rows outnumber a data shard's item positions
  B / S x (L + 1): then a training batch carries its distinct items (`batch_unique_rows`),
  else the catalog path is cheaper."""
  return num_items + 1 > batch_size // shards * (seq_len + 1)


def batch_unique_rows(item_id: np.ndarray, hist_item_id: np.ndarray, shards: int = 1,
                      counts: Sequence[int] = UNIQUE_ROW_COUNTS) -> dict[str, np.ndarray]:
  """A batch's distinct items per data shard (numpy; the input pipeline's workers run it).

  item_id int [B], hist_item_id int [B, L], B divisible by `shards` -> {
    'unique_items': int32 [S, U]  each shard's distinct ids (targets and behaviours, padding
                                  included), padded with the shard's first id,
    'item_row': int32 [B], 'hist_item_row': int32 [B, L]  each position's row in its shard}
  with U one of `counts` for the whole batch (`unique_row_count` of the largest shard).
  """
  item_id, hist = np.asarray(item_id), np.asarray(hist_item_id)
  b, seq_len = hist.shape
  if b % shards:
    raise ValueError(f"batch of {b} examples does not split into {shards} data shards")
  per = b // shards
  ids = np.concatenate([item_id[:, None], hist], axis=1).reshape(shards, per * (seq_len + 1))
  uniques, rows = [], np.empty_like(ids, dtype=np.int32)
  for s in range(shards):
    values, inverse = np.unique(ids[s], return_inverse=True)
    uniques.append(values)
    rows[s] = inverse
  u = unique_row_count(max(len(v) for v in uniques), per * (seq_len + 1), counts)
  table = np.stack([np.pad(v, (0, u - len(v)), constant_values=v[0]) for v in uniques])
  rows = rows.reshape(b, seq_len + 1)
  return {"unique_items": table.astype(np.int32), "item_row": rows[:, 0].copy(),
          "hist_item_row": rows[:, 1:].copy()}


def pad_unique_rows(batch: dict, count: int) -> dict:
  """`batch` with its 'unique_items' [S, U] padded to [S, count] (count >= U; each shard
  padded with its first id, as `batch_unique_rows` pads): the count all processes agreed on,
  so that their local batches make one global array. The rows' index is unchanged."""
  unique = np.asarray(batch["unique_items"])
  if count < unique.shape[1]:
    raise ValueError(f"cannot pad {unique.shape[1]} unique rows down to {count}")
  pad = np.repeat(unique[:, :1], count - unique.shape[1], axis=1)
  return batch | {"unique_items": np.concatenate([unique, pad], axis=1)}
