"""The item catalog: per-item side fields and frozen multimodal vectors, looked up by item id.

Held once per process inside the model as non-trainable `CatalogTable` variables (the optimizer
updates `nnx.Param` only), so batches carry item ids and never copies of the vectors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.schema import FeatureSchema
from dmf_jax.core.sharding import NO_SHARDING, ShardingRules, gather_rows


class CatalogTable(nnx.Variable):
  """A frozen per-item table (not an nnx.Param: never trained)."""


@dataclasses.dataclass(frozen=True)
class ItemCatalog:
  """Host-side catalog arrays.

  side: field name -> int32 [num_items] (single-valued) or [num_items, M] (multi-valued, -1 pad).
  modalities: modality name -> float32 [num_items, D_k]; an all-zero row marks a missing vector.
  """

  side: Mapping[str, np.ndarray]
  modalities: Mapping[str, np.ndarray]

  def validate(self, schema: FeatureSchema) -> None:
    """Raises a ValueError naming the culprit unless the arrays fit `schema`."""
    n = schema.num_items
    want_side = {f.name for f in schema.item_features}
    if set(self.side) != want_side:
      raise ValueError(f"catalog side fields {sorted(self.side)} != schema {sorted(want_side)}")
    for spec in schema.item_features:
      arr = np.asarray(self.side[spec.name])
      expected = (n, spec.max_values) if spec.multi_valued else (n,)
      checks.check_shape(f"catalog.side[{spec.name!r}]", arr, expected)
      checks.check_integer(f"catalog.side[{spec.name!r}]", arr)
      checks.check_ids_in_range(
          f"catalog.side[{spec.name!r}]", arr, spec.vocab_size, allow_padding=spec.multi_valued
      )
    want_mod = set(schema.modality_names)
    if set(self.modalities) != want_mod:
      raise ValueError(
          f"catalog modalities {sorted(self.modalities)} != schema {sorted(want_mod)}"
      )
    for spec in schema.modalities:
      arr = np.asarray(self.modalities[spec.name])
      checks.check_shape(f"catalog.modalities[{spec.name!r}]", arr, (n, spec.dim))
      checks.check_floating(f"catalog.modalities[{spec.name!r}]", arr)
      checks.check_finite(f"catalog.modalities[{spec.name!r}]", arr)

  def with_modalities(self, names) -> "ItemCatalog":
    """The catalog restricted to the modalities `names`."""
    missing = sorted(set(names) - set(self.modalities))
    if missing:
      raise ValueError(f"catalog has no modalities {missing}; it has {sorted(self.modalities)}")
    return dataclasses.replace(self, modalities={k: self.modalities[k] for k in names})

  @classmethod
  def zeros(cls, schema: FeatureSchema) -> "ItemCatalog":
    """A placeholder of the right shapes (for abstract init before the real values load)."""
    n = schema.num_items
    side = {
        f.name: np.zeros((n, f.max_values) if f.multi_valued else (n,), np.int32)
        for f in schema.item_features
    }
    mods = {m.name: np.zeros((n, m.dim), np.float32) for m in schema.modalities}
    return cls(side, mods)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
  """All-pairs cosine of item vectors: [V, D] -> float32 [V, V] (zero vectors give 0)."""
  v = np.asarray(vectors, np.float64)
  v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
  return np.clip(v @ v.T, -1.0, 1.0).astype(np.float32)


def cosine_range(vectors: np.ndarray, *, quantiles=(0.5, 99.5), max_items: int = 1000,
                 seed: int = 0) -> np.ndarray:
  """[low, high] percentiles of the cosine between distinct items with non-zero vectors (all
  pairs of up to `max_items` items drawn with a fixed seed): float32 [2]; [-1, 1] when
  undefined (fewer than two such items, or no spread)."""
  v = np.asarray(vectors, np.float32)
  norms = np.linalg.norm(v, axis=1)
  v = v[norms > 0] / norms[norms > 0, None]
  if len(v) > max_items:
    v = v[np.random.default_rng(seed).choice(len(v), max_items, replace=False)]
  if len(v) < 2:
    return np.array([-1.0, 1.0], np.float32)
  cos = (v @ v.T)[~np.eye(len(v), dtype=bool)]
  low, high = np.percentile(cos, quantiles)
  if high - low < 1e-6:
    return np.array([-1.0, 1.0], np.float32)
  return np.array([low, high], np.float32)


class CatalogTables(nnx.Module):
  """The catalog as frozen variables: `side(name, ids)` and `vectors(name, ids)` gathers.

  With `pairwise=True` it also holds each modality's all-pairs cosine matrix [V, V] (derived
  from the vectors whenever they load), so the frozen target-behaviour similarity is one scalar
  gather instead of gathering and normalizing two D-dimensional vectors per pair.
  """

  def __init__(
      self,
      schema: FeatureSchema,
      catalog: ItemCatalog | None = None,
      sharding: ShardingRules = NO_SHARDING,
      pairwise: bool = False,
  ):
    catalog = catalog or ItemCatalog.zeros(schema)
    catalog.validate(schema)
    self.num_items = schema.num_items
    self.sharding = sharding
    self.has_pairwise = pairwise and bool(catalog.modalities)
    if self.has_pairwise:
      self.pairwise = nnx.Dict(
          {k: CatalogTable(jnp.asarray(cosine_matrix(v))) for k, v in catalog.modalities.items()}
      )
    self.side = nnx.Dict(
        {k: CatalogTable(jnp.asarray(v, jnp.int32)) for k, v in catalog.side.items()}
    )
    self.modalities = nnx.Dict(
        {k: CatalogTable(jnp.asarray(v, jnp.float32)) for k, v in catalog.modalities.items()}
    )
    self.cosine_ranges = nnx.Dict(
        {k: CatalogTable(jnp.asarray(cosine_range(v))) for k, v in catalog.modalities.items()}
    )

  def load(self, schema: FeatureSchema, catalog: ItemCatalog) -> None:
    """Replaces the values in place after validating them (keeps each variable's sharding)."""
    catalog.validate(schema)
    for name, value in catalog.side.items():
      self.side[name].set_value(jnp.asarray(value, jnp.int32))
    for name, value in catalog.modalities.items():
      self.modalities[name].set_value(jnp.asarray(value, jnp.float32))
      self.cosine_ranges[name].set_value(jnp.asarray(cosine_range(value)))
      if self.has_pairwise:
        self.pairwise[name].set_value(jnp.asarray(cosine_matrix(value)))

  def rows(self, table: jax.Array, item_ids: jax.Array) -> jax.Array:
    """table[item_ids] for a per-item table [num_items, ...] (e.g. one derived from the catalog)."""
    return self._rows(table, item_ids)

  def all_vectors(self, name: str) -> jax.Array:
    """Every item's vector of a modality: float32 [num_items, D_k]."""
    return self.modalities[name][...]

  def safe_ids(self, item_ids: jax.Array) -> jax.Array:
    """Item ids with any id outside [0, num_items) replaced by the last item's.

    Item ids are range-checked where they are embedded (eagerly); under jit this keeps every
    catalog lookup of an out-of-range id defined, and the same in every lookup path.
    """
    n = self.num_items
    return jnp.where((item_ids >= 0) & (item_ids < n), item_ids, n - 1)

  def _rows(self, table: jax.Array, item_ids: jax.Array) -> jax.Array:
    return gather_rows(table, self.safe_ids(item_ids), self.sharding)

  def side_values(self, name: str, item_ids: jax.Array) -> jax.Array:
    """int [...] -> int32 [...] or [..., M]."""
    return self._rows(self.side[name][...], item_ids)

  def vectors(self, name: str, item_ids: jax.Array) -> jax.Array:
    """int [...] -> float32 [..., D_k]."""
    return self._rows(self.modalities[name][...], item_ids)

  def calibrate(self, name: str, similarity: jax.Array) -> jax.Array:
    """Maps the catalog's typical cosine range [low, high] (random pairs, 0.5-99.5 percentiles)
    linearly onto [-1, 1], clipped: uniform buckets then resolve the populated range."""
    low, high = self.cosine_ranges[name][...][0], self.cosine_ranges[name][...][1]
    return jnp.clip(2.0 * (similarity - low) / (high - low) - 1.0, -1.0, 1.0)

  def pairwise_similarity(self, name: str, target_ids: jax.Array, item_ids: jax.Array) -> jax.Array:
    """cos(m_t, m_j) from the precomputed matrix: target [...], items [..., L] (broadcast) -> [..., L]."""
    flat = self.safe_ids(target_ids)[..., None] * self.num_items + self.safe_ids(item_ids)
    return gather_rows(self.pairwise[name][...].reshape(-1), flat, self.sharding)
