"""Frozen sharding rules passed into modules.

The mesh has axes ('data', 'model'). Batches are split on 'data'; embedding tables are
row-sharded on 'model' when that axis has more than one device. Modules take a
`ShardingRules` and never read global state: with the default (no rules) they run on one
device or under any replicated setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Which mesh axes the batch dimension and embedding-table rows are split over.

  Attributes:
    batch_axis: mesh axis of the leading (batch) dimension of activations, or None.
    table_axis: mesh axis of embedding-table rows, or None for replicated tables.
    table_shards: size of `table_axis`; tables pad their rows to a multiple of it.
  """

  batch_axis: str | None = None
  table_axis: str | None = None
  table_shards: int = 1

  def padded_rows(self, rows: int) -> int:
    """`rows` rounded up to a multiple of the table shard count."""
    return -(-rows // self.table_shards) * self.table_shards

  def table_spec(self) -> tuple[str | None, None]:
    """Partition names for a [vocab, dim] table (stored as Param `out_sharding` metadata)."""
    return (self.table_axis, None)

  @property
  def on_mesh(self) -> bool:
    """Whether any mesh axis is named (lookups then state their output sharding)."""
    return self.batch_axis is not None or self.table_axis is not None


def agree_across_processes(value: int, reduce: Callable = np.min) -> int:
  """`reduce` (np.min, np.max) of every process's `value`, the same on all processes: a
  decision each process measured on its own (an evaluation batch, a padded row count) that
  must give every process the same shapes. One process: `value`."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  return int(reduce(multihost_utils.process_allgather(np.int64(value))))


def gather_rows(table: jax.Array, ids: jax.Array, rules: ShardingRules) -> jax.Array:
  """table[ids] for in-range int ids: [V, ...], [...ids] -> [...ids, ...].

  On a mesh (Explicit axes) the output sharding is given explicitly: split like the ids'
  leading dimension (batch-split ids give batch-split rows, replicated ids replicated rows),
  whatever the table's row sharding.
  """
  return take_rows(table, ids, force=rules.on_mesh)


NO_SHARDING = ShardingRules()


def leading_axis(x: jax.Array) -> str | tuple | None:
  """The mesh axis the leading dimension of `x` is sharded over (None outside a mesh)."""
  spec = _spec(x)
  return spec[0] if spec else None


def take_rows(table: jax.Array, ids: jax.Array, *, force: bool = False) -> jax.Array:
  """table[ids] ([V, ...], int [...ids] -> [...ids, ...]) split like the ids' leading dimension
  on a mesh with Explicit axes (a plain gather outside one; `force`: state the sharding even
  when the ids are not split)."""
  axis = leading_axis(ids)
  if axis is None and not force:
    return table.at[ids].get(mode="promise_in_bounds")
  lead = (axis,) if ids.ndim else ()
  rest = [None] * (ids.ndim + table.ndim - 1 - len(lead))
  return table.at[ids].get(mode="promise_in_bounds", out_sharding=P(*lead, *rest))


def replicated(x: jax.Array) -> jax.Array:
  """`x` with every device holding all of it (a no-op outside a mesh)."""
  if leading_axis(x) is None:
    return x
  return jax.sharding.reshard(x, P(*([None] * x.ndim)))


def segment_sum_rows(data: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """Sum of the rows of `data` [R, ...] per segment id [R] -> [num_segments, ...].

  The output stays split like the input's rows when the input is batch-sharded on a mesh with
  Explicit axes (where the scatter's output sharding must be stated).
  """
  axis = leading_axis(data)
  if axis is None:
    return jax.ops.segment_sum(data, segment_ids, num_segments=num_segments)
  out = jnp.zeros((num_segments, *data.shape[1:]), data.dtype)
  return out.at[segment_ids].add(data, out_sharding=P(axis, *([None] * (data.ndim - 1))))


def over_merged_rows(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """fn(x) for a row-wise fn ([E, K] -> [E, M]) run on x [..., K] with its leading dims merged
  into one, which keeps the mesh split of the first -> [..., M]. Plain fn(x) for 2-d x, or
  when a later leading dim is split (that merge has no single sharding)."""
  spec, lead = _spec(x), x.shape[:-1]
  if x.ndim <= 2 or any(axis is not None for axis in spec[1:x.ndim - 1]):
    return fn(x)
  axis = spec[0] if spec else None
  if axis is None:
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*lead, y.shape[-1])
  y = fn(jax.lax.reshape(x, (x.size // x.shape[-1], x.shape[-1]), out_sharding=P(axis, None)))
  return jax.lax.reshape(y, (*lead, y.shape[-1]), out_sharding=P(axis, *([None] * len(lead))))


def contract_leading(a: jax.Array, b: jax.Array) -> jax.Array:
  """sum over the leading dims of a[..., i] b[..., j]: a [..., I], b [..., J] -> [I, J]. One
  [E, I]^T @ [E, J] product over the leading dims merged (as `over_merged_rows`) when none of
  them is split over a mesh; else the einsum over all of them, summed across the mesh
  (a replicated result)."""
  if any(axis is not None for axis in _spec(a)[:-1] + _spec(b)[:-1]):
    return jnp.einsum("...i,...j->ij", a, b, out_sharding=P(None, None))
  return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


def _spec(x: jax.Array) -> tuple:
  """The partition spec of x's type (() outside a mesh)."""
  try:
    return tuple(jax.typeof(x).sharding.spec)
  except AttributeError:
    return ()


def merge_leading(x: jax.Array) -> jax.Array:
  """[B, N, ...] -> [B * N, ...]; N = 1 drops the axis (no reshape of a mesh-split B)."""
  if x.shape[1] == 1:
    return x[:, 0]
  return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def split_leading(x: jax.Array, b: int, n: int) -> jax.Array:
  """[B * N, ...] -> [B, N, ...], the inverse of `merge_leading`."""
  if n == 1:
    return x[:, None]
  return x.reshape(b, n, *x.shape[1:])
