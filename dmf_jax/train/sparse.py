"""Row-sparse ("lazy") updates of large embedding tables.

A dense optimizer step over a [V, d] table costs O(V d) whatever the batch touches: the
gradient is a dense [V, d] array and the moments are read and written whole. At a million items
that is most of the train step (BUILD_NOTES.md). With `optimizer.sparse_min_rows = N`, tables of
at least N rows are updated only at the rows that the batch looked up:

  g_r  = the loss's gradient w.r.t. row r (summed over its lookups; `nn.embedding.RowProbes`)
  adam:    m_r <- b1 m_r + (1 - b1) g_r;  v_r <- b2 v_r + (1 - b2) g_r^2
           p_r <- p_r - lr_t (m_r / (1 - b1^t)) / (sqrt(v_r / (1 - b2^t)) + eps)   (t = step + 1)
  adagrad: a_r <- a_r + g_r^2;  p_r <- p_r - lr_t g_r / sqrt(a_r + eps)   (a starts at 0.1)
  sgd:     u_r <- 0.9 u_r + g_r;  p_r <- p_r - lr_t u_r                   (momentum 0.9)

with the constants of `optax.adam` / `optax.adagrad` / `optax.sgd(momentum=0.9)`. Rows that a
step does not look up keep their values and moments (as TF's LazyAdam and PyTorch's
SparseAdam), which is not the dense optimizer's function: that one keeps moving every row by
its decaying momentum. When every row is looked up in every step, the two are equal (tested).
Gradient clipping (`grad_clip_norm`) covers the dense parameters only.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from dmf_jax.core import sharding

SPARSE_KINDS = ("adam", "adamw", "adagrad", "sgd")
_B1, _B2, _EPS = 0.9, 0.999, 1e-8  # optax.adam
_ADAGRAD_INIT, _ADAGRAD_EPS = 0.1, 1e-7  # optax.adagrad
_MOMENTUM = 0.9  # optimizers._base's sgd


def path_names(keypath) -> tuple[str, ...]:
  """A pytree key path into an nnx.State -> the attribute names from the model root."""
  names = []
  for key in keypath:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
    if name is not None and name != "value":
      names.append(str(name))
  return tuple(names)


def is_sparse_table(path: tuple, shape: tuple, min_rows: int) -> bool:
  """An EmbeddingTable's rows (the Param named 'embedding') of at least `min_rows` rows."""
  return bool(min_rows) and bool(path) and path[-1] == "embedding" and shape[0] >= min_rows


def split(params: nnx.State, min_rows: int) -> tuple[nnx.State, nnx.State]:
  """(the other parameters, the tables of at least `min_rows` rows), as two States."""
  flat = list(params.flat_state())
  tables = [(k, v) for k, v in flat if is_sparse_table(tuple(map(str, k)), v.shape, min_rows)]
  names = {k for k, _ in tables}
  return (nnx.State.from_flat_path([(k, v) for k, v in flat if k not in names]),
          nnx.State.from_flat_path(tables))


def join(dense: nnx.State, tables: nnx.State) -> nnx.State:
  """The inverse of `split`."""
  return nnx.State.from_flat_path(sorted(list(dense.flat_state()) + list(tables.flat_state()),
                                         key=lambda kv: tuple(map(str, kv[0]))))


class RowSparseState(NamedTuple):
  """dense: the optax state of the other parameters; rows: per moment name ('m', and 'v' for
  Adam) a State shaped, sharded and nested like the row-sparse tables (so its paths end with
  the table's, as optax's moments do); count: steps taken (bias correction)."""

  dense: optax.OptState
  rows: dict
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class RowSparse:
  """`dense`, an optax transformation of the other parameters, plus lazy updates of the
  tables of at least `min_rows` rows (`apply_rows`, called by the train step with the rows'
  gradients; the tables are not differentiated, so no dense gradient is ever made)."""

  dense: optax.GradientTransformation
  min_rows: int
  kind: str
  learning_rate: optax.Schedule

  def __post_init__(self):
    if self.kind not in SPARSE_KINDS:
      raise ValueError(f"row-sparse updates support {SPARSE_KINDS}, not {self.kind!r}")

  def split(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
    return split(params, self.min_rows)

  def init(self, params: nnx.State) -> RowSparseState:
    dense, tables = self.split(params)
    first = _ADAGRAD_INIT if self.kind == "adagrad" else 0.0
    rows = {"m": jax.tree.map(lambda x: jnp.full_like(x, first), tables)}
    if self.kind in ("adam", "adamw"):
      rows["v"] = jax.tree.map(jnp.zeros_like, tables)
    return RowSparseState(self.dense.init(dense), rows, jnp.zeros((), jnp.int32))

  def update(self, grads, state: RowSparseState, params=None):
    """The other parameters' updates (optax protocol over the `split` dense part)."""
    updates, dense = self.dense.update(grads, state.dense, params)
    return updates, state._replace(dense=dense)

  def apply_rows(self, tables: nnx.State, state: RowSparseState, lookups: dict[str, tuple],
                 trainable=lambda path: True) -> tuple[nnx.State, RowSparseState]:
    """Updates each table at its looked-up rows.

    lookups: table path ('/'-joined) -> (rows int [N], gradients [N, d]) of all its lookups.
    trainable(path): False keeps a table (a training phase that freezes it) as it is.
    """
    count = state.count + 1
    lr = self.learning_rate(state.count)
    values = _by_path(tables)
    moments = {k: _by_path(v) for k, v in state.rows.items()}
    new_tables, new_moments = {}, {k: {} for k in moments}
    for name, (ids, grads) in lookups.items():
      path = tuple(name.split("/"))
      if not trainable(path):
        continue
      new_tables[path], updated = _lazy_update(
          self.kind, values[path], {k: m[path] for k, m in moments.items()}, ids, grads, lr,
          count)
      for k, m in updated.items():
        new_moments[k][path] = m
    rows = {k: _replaced(v, new_moments[k]) for k, v in state.rows.items()}
    return _replaced(tables, new_tables), RowSparseState(state.dense, rows, count)


def _by_path(tree) -> dict:
  return {path_names(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _replaced(tree, new_by_path: dict):
  """`tree` with the leaves at the paths of `new_by_path` replaced."""
  return jax.tree_util.tree_map_with_path(lambda kp, x: new_by_path.get(path_names(kp), x), tree)


def _summed_by_row(ids: jax.Array, grads: jax.Array, fill: int) -> tuple[jax.Array, jax.Array]:
  """ids int [N] (repeats allowed, all < fill), grads [N, d] -> (the distinct ids, sorted, then
  `fill` [N]; each one's summed gradient [N, d], 0 for the fill entries).

  The ids alone are sorted (XLA's CPU backend sorts one array about 5x faster than an (id,
  position) pair: 0.76 against 4.2 ms for 24,576 ids), each position finds its distinct id's
  slot by binary search, and one scatter-add sums the gradients there: 1.0 ms against 3.2 ms
  for the argsort and sorted segment sums used before (BUILD_NOTES, 2026-12-05 sixth
  session)."""
  n = ids.shape[0]
  ordered = jnp.sort(ids)
  starts = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
  segment = jnp.cumsum(starts) - 1  # [N]: the distinct id's slot of each sorted position
  distinct = jax.ops.segment_max(ordered, segment, num_segments=n, indices_are_sorted=True)
  distinct = jnp.where(jnp.arange(n) <= segment[-1], distinct, fill)  # sorted, fill last
  slot = jnp.searchsorted(distinct, ids)  # [N]: each position's distinct id
  return distinct, jax.ops.segment_sum(grads, slot, num_segments=n)


def _lazy_update(kind, table, moments, ids, grads, lr, count):
  """One table's update at rows `ids` (int [N], repeats summed) with gradients [N, d]."""
  ids, grads = sharding.replicated(ids), sharding.replicated(grads)  # from batch-split lookups
  unique, g = _summed_by_row(ids, grads, fill=table.shape[0])

  on_mesh = sharding.leading_axis(table) is not None

  def read(x):  # replicated rows [N, d] of a table, row-sharded or not
    if on_mesh:
      return x.at[unique].get(mode="fill", fill_value=0, out_sharding=P(None, None))
    return x.at[unique].get(mode="fill", fill_value=0)

  def write(x, new):  # the table (or moment) with rows `unique` set, sharded as it was
    if on_mesh:
      return x.at[unique].set(new, mode="drop", out_sharding=jax.typeof(x).sharding.spec)
    return x.at[unique].set(new, mode="drop")

  p = read(table)
  if kind in ("adam", "adamw"):
    m = _B1 * read(moments["m"]) + (1 - _B1) * g
    v = _B2 * read(moments["v"]) + (1 - _B2) * g * g
    t = count.astype(jnp.float32)
    step = lr * (m / (1 - _B1 ** t)) / (jnp.sqrt(v / (1 - _B2 ** t)) + _EPS)
    moments = {"m": write(moments["m"], m), "v": write(moments["v"], v)}
  elif kind == "adagrad":
    a = read(moments["m"]) + g * g
    step = lr * jnp.where(a > 0, jax.lax.rsqrt(a + _ADAGRAD_EPS), 0.0) * g
    moments = {"m": write(moments["m"], a)}
  else:  # sgd with momentum
    u = _MOMENTUM * read(moments["m"]) + g
    step = lr * u
    moments = {"m": write(moments["m"], u)}
  return write(table, p - step), moments
