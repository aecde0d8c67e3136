"""Embedding tables derived from a `FeatureSpec`, with an OOV row and optional row sharding."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.schema import FeatureSpec
from dmf_jax.core.sharding import NO_SHARDING, ShardingRules, gather_rows

DEFAULT_INIT_STDDEV = 0.05


class EmbeddingTable(nnx.Module):
  """A [vocab_size + 1, dim] table; row `vocab_size` is the reserved OOV row.

  When row-sharded over S devices the table has its rows rounded up to a multiple of S; the
  extra rows are never addressed.

  Out-of-range ids raise a ValueError when the ids are concrete (eager use). Under `jax.jit`
  the ids are tracers and cannot be inspected, so any id outside [0, vocab_size) is looked up
  in the OOV row instead: a defined, trainable embedding, never a neighbour's row.

  With `sharding.table_axis` set, the table is created with that row partitioning as
  `out_sharding` metadata, and lookups use `table.at[ids].get(out_sharding=...)` so they work
  on meshes with Explicit axes.
  """

  def __init__(
      self,
      vocab_size: int,
      dim: int,
      *,
      rngs: nnx.Rngs,
      name: str = "ids",
      sharding: ShardingRules = NO_SHARDING,
      init_stddev: float = DEFAULT_INIT_STDDEV,
  ):
    self.vocab_size = vocab_size
    self.dim = dim
    self.name = name
    self.sharding = sharding
    init = jax.nn.initializers.normal(init_stddev)
    value = init(rngs.params(), (sharding.padded_rows(vocab_size + 1), dim), jnp.float32)
    if sharding.table_axis is not None:
      self.embedding = nnx.Param(value, out_sharding=sharding.table_spec())
    else:
      self.embedding = nnx.Param(value)

  @property
  def oov_index(self) -> int:
    return self.vocab_size

  def safe_ids(self, ids: jax.Array) -> jax.Array:
    """Maps ids outside [0, vocab_size) to the OOV row; int32 [...] -> int32 [...]."""
    ids = jnp.asarray(ids, jnp.int32)
    return jnp.where((ids >= 0) & (ids < self.vocab_size), ids, self.oov_index)

  def __call__(self, ids: jax.Array, *, allow_padding: bool = False) -> jax.Array:
    """int [...] -> float32 [..., dim]. With allow_padding, -1 is accepted (OOV row)."""
    checks.check_integer(self.name, ids)
    checks.check_ids_in_range(self.name, ids, self.vocab_size, allow_padding=allow_padding)
    return self.lookup(self.safe_ids(ids))

  def lookup(self, rows: jax.Array) -> jax.Array:
    """Rows already in [0, vocab_size] (the OOV row included), unchecked: int [...] -> [..., dim]."""
    probes = _ROW_PROBES.get()
    if probes is not None and id(self) in probes.tables:
      return probes.lookup(self, rows)
    return gather_rows(self.embedding[...], rows, self.sharding)


@dataclasses.dataclass
class RowProbes:
  """Row-sparse gradients of chosen tables (`dmf_jax.train.sparse`), active in `row_probes`.

  A chosen table's lookup k returns stop_gradient(table)[rows] + probes[k] with probes[k] a zero
  array of the lookup's shape [..., dim]: the loss's gradient w.r.t. probes[k] is its gradient
  w.r.t. the rows looked up, and the table itself gets none. `calls` records (table name,
  rows) per lookup, in call order; with `probes=None` (a shape-finding trace) lookups are
  plain.
  """

  tables: dict[int, str]  # id(EmbeddingTable) -> its name (parameter path)
  probes: list[jax.Array] | None = None
  calls: list[tuple[str, jax.Array]] = dataclasses.field(default_factory=list)

  def lookup(self, table: EmbeddingTable, rows: jax.Array) -> jax.Array:
    k = len(self.calls)
    self.calls.append((self.tables[id(table)], rows))
    out = gather_rows(jax.lax.stop_gradient(table.embedding[...]), rows, table.sharding)
    return out if self.probes is None else out + self.probes[k].astype(out.dtype)


_ROW_PROBES: contextvars.ContextVar[RowProbes | None] = contextvars.ContextVar(
    "row_probes", default=None)


@contextlib.contextmanager
def row_probes(probes: RowProbes):
  token = _ROW_PROBES.set(probes)
  try:
    yield probes
  finally:
    _ROW_PROBES.reset(token)


class FeatureEmbedding(nnx.Module):
  """Embeds one declared field, pooling multi-valued fields over their valid (>= 0) ids.

  Single-valued: int [...] -> [..., dim]. Multi-valued: int [..., M] padded with -1 ->
  [..., dim], mean or sum over the valid values (all-padding rows give zeros).
  """

  def __init__(self, spec: FeatureSpec, *, rngs: nnx.Rngs, sharding: ShardingRules = NO_SHARDING):
    self.spec = spec
    self.table = EmbeddingTable(
        spec.vocab_size, spec.dim, rngs=rngs, name=spec.name, sharding=sharding
    )

  def __call__(self, ids: jax.Array) -> jax.Array:
    spec = self.spec
    if not spec.multi_valued:
      return self.table(ids)
    if ids.shape[-1:] != (spec.max_values,):
      raise ValueError(
          f"{spec.name}: multi-valued field expects trailing size {spec.max_values}, "
          f"got shape {tuple(ids.shape)}"
      )
    emb = self.table(ids, allow_padding=True)
    valid = (jnp.asarray(ids) >= 0).astype(emb.dtype)[..., None]
    pooled = jnp.sum(emb * valid, axis=-2)
    if spec.pooling == "mean":
      pooled = pooled / jnp.maximum(jnp.sum(valid, axis=-2), 1.0)
    return pooled
