"""The item catalog: per-item side fields and frozen multimodal vectors, looked up by item id.

Held once per process inside the model as non-trainable `CatalogTable` variables (the optimizer
updates `nnx.Param` only), so batches carry item ids and never copies of the vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.schema import FeatureSchema
from dmf_jax.core.sharding import NO_SHARDING, ShardingRules, gather_rows, take_rows


class CatalogTable(nnx.Variable):
  """A frozen per-item table (not an nnx.Param: never trained)."""


@dataclasses.dataclass(frozen=True)
class ItemCatalog:
  """Host-side catalog arrays.

  side: field name -> int32 [num_items] (single-valued) or [num_items, M] (multi-valued, -1
    pad); for a hashed field (`FeatureSpec.hashed`) the raw int64 ids [num_items].
  modalities: modality name -> float32 [num_items, D_k]; an all-zero row marks a missing vector.
  raw_ids: int64 [num_items], each item's raw id (`dmf_jax.core.hashing`); required when the
    schema hashes item ids, else optional (BYOD builds always hold them: warm starts match
    item rows across builds by them).
  numeric: numeric field name -> float32 [num_items], NaN where the item has no value.
  """

  side: Mapping[str, np.ndarray]
  modalities: Mapping[str, np.ndarray]
  raw_ids: np.ndarray | None = None
  numeric: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def validate(self, schema: FeatureSchema) -> None:
    """Raises a ValueError naming the culprit unless the arrays fit `schema`."""
    n = schema.num_items
    want_side = {f.name for f in schema.item_features}
    if set(self.side) != want_side:
      raise ValueError(f"catalog side fields {sorted(self.side)} != schema {sorted(want_side)}")
    for spec in schema.item_features:
      arr = np.asarray(self.side[spec.name])
      name = f"catalog.side[{spec.name!r}]"
      if spec.hashed:
        checks.check_shape(f"{name} (raw ids of a hashed field)", arr, (n,))
        checks.check_integer(name, arr)
        continue
      expected = (n, spec.max_values) if spec.multi_valued else (n,)
      checks.check_shape(name, arr, expected)
      checks.check_integer(name, arr)
      checks.check_ids_in_range(name, arr, spec.vocab_size, allow_padding=spec.multi_valued)
    if self.raw_ids is not None or schema.item_id_spec.hashed:
      if self.raw_ids is None:
        raise ValueError("catalog.raw_ids: the schema hashes item ids, the catalog has no raw ids")
      checks.check_shape("catalog.raw_ids", self.raw_ids, (n,))
      checks.check_integer("catalog.raw_ids", self.raw_ids)
    want_numeric = {f.name for f in schema.item_numeric}
    if set(self.numeric) != want_numeric:
      raise ValueError(f"catalog numeric fields {sorted(self.numeric)} != schema "
                       f"{sorted(want_numeric)}")
    for name, arr in self.numeric.items():
      arr = np.asarray(arr)
      checks.check_shape(f"catalog.numeric[{name!r}]", arr, (n,))
      checks.check_floating(f"catalog.numeric[{name!r}]", arr)
      if np.isinf(arr).any():
        raise ValueError(f"catalog.numeric[{name!r}]: item {int(np.argmax(np.isinf(arr)))} is "
                         f"infinite (NaN marks a missing value; inf is not allowed)")
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

  def without_numeric(self) -> "ItemCatalog":
    """The catalog without its numeric fields."""
    return dataclasses.replace(self, numeric={})

  @classmethod
  def zeros(cls, schema: FeatureSchema) -> "ItemCatalog":
    """A placeholder of the right shapes (for abstract init before the real values load)."""
    n = schema.num_items
    side = {
        f.name: np.zeros((n, f.max_values) if f.multi_valued and not f.hashed else (n,),
                         np.int64 if f.hashed else np.int32)
        for f in schema.item_features
    }
    mods = {m.name: np.zeros((n, m.dim), np.float32) for m in schema.modalities}
    raw_ids = np.zeros(n, np.int64) if schema.item_id_spec.hashed else None
    numeric = {f.name: np.zeros(n, np.float32) for f in schema.item_numeric}
    return cls(side, mods, raw_ids, numeric)

  def fingerprint(self) -> str:
    """SHA-256 of every array (names, dtypes, shapes, bytes): identifies the catalog's content
    (checkpoints hold it instead of the arrays)."""
    digest = hashlib.sha256()
    arrays = {f"side/{k}": v for k, v in self.side.items()}
    arrays |= {f"modality/{k}": v for k, v in self.modalities.items()}
    arrays |= {f"numeric/{k}": v for k, v in self.numeric.items()}
    if self.raw_ids is not None:
      arrays["raw_ids"] = self.raw_ids
    for name in sorted(arrays):
      arr = np.ascontiguousarray(arrays[name])
      digest.update(f"{name}:{arr.dtype.str}:{arr.shape};".encode())
      digest.update(memoryview(arr).cast("B"))
    return digest.hexdigest()


NORM_EPS = 1e-8  # as dmf_jax.nn.similarity.l2_normalize
_CHUNK_ROWS = 65536  # rows per host-side pass over a catalog's vectors (bounded temporaries)


def inverse_norms(vectors: np.ndarray) -> np.ndarray:
  """1 / max(|v|, eps) per row: [V, D] -> float32 [V] (computed in chunks, float64)."""
  return norms_and_presence(vectors)[0]


def norms_and_presence(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """One pass over the rows (in chunks, float64): (1 / max(|v|, eps) float32 [V], whether
  each row is not all zero bool [V]: the catalog's missing marker). |v| > 0 exactly when a
  row has a non-zero entry: a float32's square never underflows in float64."""
  inv, present = np.empty(len(vectors), np.float32), np.empty(len(vectors), bool)
  for start in range(0, len(vectors), _CHUNK_ROWS):
    chunk = np.asarray(vectors[start:start + _CHUNK_ROWS], np.float64)
    norms = np.sqrt(np.sum(chunk * chunk, axis=1))
    inv[start:start + _CHUNK_ROWS] = 1.0 / np.maximum(norms, NORM_EPS)
    present[start:start + _CHUNK_ROWS] = norms > 0
  return inv, present


def record_cosines(vectors: np.ndarray, inv_norms: np.ndarray, item_id: np.ndarray,
                   hist_item_id: np.ndarray, chunk: int = 64) -> np.ndarray:
  """Each record's frozen cosines on the host, as the model computes them from its tables:
  clip((m_t . m_j) * inv_t * inv_j, -1, 1).

  vectors float32 [V, D] (the values the device table holds), inv_norms float32 [V],
  item_id int [B], hist_item_id int [B, L] -> float32 [B, L]. Reads B x (L + 1) rows, `chunk`
  records at a time (bounded scratch memory). Out-of-range ids raise IndexError.
  """
  b, seq_len = np.shape(hist_item_id)
  out = np.empty((b, seq_len), np.float32)
  for start in range(0, b, chunk):
    t, h = item_id[start:start + chunk], hist_item_id[start:start + chunk]
    dots = np.einsum("bd,bld->bl", vectors[t], vectors[h])
    out[start:start + chunk] = np.clip(dots * inv_norms[t][:, None] * inv_norms[h], -1.0, 1.0)
  return out


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
  """All-pairs cosine of item vectors: [V, D] -> float32 [V, V] (zero vectors give 0)."""
  v = np.asarray(vectors, np.float64)
  v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
  return np.clip(v @ v.T, -1.0, 1.0).astype(np.float32)


def cosine_range(vectors: np.ndarray, *, quantiles=(0.5, 99.5), max_items: int = 1000,
                 seed: int = 0) -> np.ndarray:
  """[low, high] percentiles of the cosine between distinct items with non-zero vectors (all
  pairs of up to `max_items` items drawn with a fixed seed): float32 [2]; [-1, 1] when
  undefined (fewer than two such items, or no spread).

  Only the drawn items' vectors are copied: the norms are computed in chunks of rows and the
  draw picks rows first (1,000,000 x 1,280 floats are 5 GB: a normalised copy of every vector
  would double the memory a model's construction needs)."""
  v = np.asarray(vectors, np.float32)
  norms = np.concatenate([np.linalg.norm(v[start:start + _CHUNK_ROWS], axis=1)
                          for start in range(0, len(v), _CHUNK_ROWS)] or [np.zeros(0, np.float32)])
  present = np.flatnonzero(norms > 0)
  if len(present) > max_items:
    present = present[np.random.default_rng(seed).choice(len(present), max_items, replace=False)]
  v = v[present] / norms[present, None]
  if len(v) < 2:
    return np.array([-1.0, 1.0], np.float32)
  cos = (v @ v.T)[~np.eye(len(v), dtype=bool)]
  low, high = np.percentile(cos, quantiles)
  if high - low < 1e-6:
    return np.array([-1.0, 1.0], np.float32)
  return np.array([low, high], np.float32)


VECTOR_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class CatalogTables(nnx.Module):
  """The catalog as frozen variables: `side_values(name, ids)`, `vectors(name, ids)` and (for a
  hashed item-id table) `id_rows(ids)` gathers.

  Per-item tables are row-sharded over `sharding.table_axis` exactly like the embedding tables
  (rows padded to a multiple of the shard count, padding never addressed), so on a mesh with
  `model = S` each device holds 1/S of them. Hashed side fields and item ids are hashed when
  the catalog loads (the stored tables hold rows). `vector_dtype='bfloat16'` halves the
  vectors' memory; lookups return float32 either way.

  With `pairwise=True` it also holds each modality's all-pairs cosine matrix [V, V] (derived
  from the vectors whenever they load; replicated, so only for catalogs within the model's
  budget), making the frozen target-behaviour similarity one scalar gather.
  """

  def __init__(
      self,
      schema: FeatureSchema,
      catalog: ItemCatalog | None = None,
      sharding: ShardingRules = NO_SHARDING,
      pairwise: bool = False,
      vector_dtype: str = "float32",
      pairwise_lookup: str = "gather",
      vectors: bool = True,
  ):
    """pairwise_lookup: how `pairwise_similarity` reads the matrix: 'gather' (one scalar gather
    per pair) or 'one_hot' (the targets' rows, then a one-hot matmul over the items: TPU's).
    vectors=False: the modality vectors (and what derives from them) are not held, for a
    model that never reads them (an ID-only model: 6.6 GB less at 1,000,000 items)."""
    if vector_dtype not in VECTOR_DTYPES:
      raise ValueError(f"vector_dtype {vector_dtype!r} is not one of {tuple(VECTOR_DTYPES)}")
    catalog = catalog or ItemCatalog.zeros(schema)
    catalog.validate(schema)
    self.num_items = schema.num_items
    self.sharding = sharding
    self.vector_dtype = vector_dtype
    self.pairwise_lookup = pairwise_lookup
    self.holds_vectors = vectors
    self.has_pairwise = pairwise and vectors and bool(catalog.modalities)
    self.hashed_ids = schema.item_id_spec.hashed
    tables = self._tables(schema, catalog)  # unpadded
    if self.has_pairwise:
      self.pairwise = nnx.Dict(
          {k: CatalogTable(jnp.asarray(cosine_matrix(v))) for k, v in catalog.modalities.items()}
      )
    self.side = nnx.Dict({k[5:]: self._variable(v) for k, v in tables.items()
                          if k.startswith("side/")})
    self.modalities = nnx.Dict({k[9:]: self._variable(v) for k, v in tables.items()
                                if k.startswith("modality/")})
    # 1 / max(|m|, eps) per item (0-vectors: 1/eps, their products are 0): the frozen cosine
    # is then one product of stored vectors, with no normalised copy per position.
    self.inv_norms = nnx.Dict({k[9:]: self._variable(v, float32=True) for k, v in tables.items()
                               if k.startswith("inv_norm/")})
    # Whether an item has the modality (its vector is not all zero: the missing marker), so a
    # Q-Former's key mask is one gather instead of a pass over the vectors.
    self.present = nnx.Dict({k[8:]: self._variable(v) for k, v in tables.items()
                             if k.startswith("present/")})
    if self.hashed_ids:
      self.item_id_rows = self._variable(tables["id_rows"])
    self.numeric = nnx.Dict({k[8:]: self._variable(v, float32=True) for k, v in tables.items()
                             if k.startswith("numeric/")})
    self.cosine_ranges = nnx.Dict(
        {k: CatalogTable(jnp.asarray(cosine_range(v))) for k, v in self._modalities(catalog)}
    )

  def _modalities(self, catalog: ItemCatalog):
    """(name, vectors) of the modalities this catalog holds (none without `vectors`)."""
    return list(catalog.modalities.items()) if self.holds_vectors else []

  def _tables(self, schema: FeatureSchema, catalog: ItemCatalog) -> dict[str, np.ndarray]:
    """The stored per-item tables by key (side/<field> with hashed fields as rows,
    modality/<name>, inv_norm/<name>, present/<name>, id_rows, numeric/<field>), unpadded."""
    tables = {}
    for spec in schema.item_features:
      value = np.asarray(catalog.side[spec.name])
      tables[f"side/{spec.name}"] = spec.rows(value) if spec.hashed else value.astype(np.int32)
    for name, value in self._modalities(catalog):
      tables[f"modality/{name}"] = np.asarray(value, np.float32)
      tables[f"inv_norm/{name}"], tables[f"present/{name}"] = norms_and_presence(value)
    if self.hashed_ids:
      tables["id_rows"] = schema.item_id_spec.rows(catalog.raw_ids)
    for name, value in catalog.numeric.items():
      tables[f"numeric/{name}"] = np.asarray(value, np.float32)
    return tables

  def _variable(self, value: np.ndarray, float32: bool = False) -> CatalogTable:
    """A padded, row-sharded variable; float arrays in `vector_dtype` unless `float32`, bool
    arrays bool, any other int32."""
    value = self._padded(value)
    if value.dtype == np.float32:
      dtype = jnp.float32 if float32 else VECTOR_DTYPES[self.vector_dtype]
    else:
      dtype = jnp.bool_ if value.dtype == np.bool_ else jnp.int32
    value = jnp.asarray(value, dtype)
    if self.sharding.table_axis is None:
      return CatalogTable(value)
    return CatalogTable(value, out_sharding=(self.sharding.table_axis,) + (None,) * (value.ndim - 1))

  def _padded(self, value: np.ndarray) -> np.ndarray:
    """Rows padded with zeros to a multiple of the shard count."""
    extra = self.sharding.padded_rows(self.num_items) - len(value)
    if not extra:
      return value  # no copy (a catalog of millions of vectors)
    return np.pad(value, [(0, extra)] + [(0, 0)] * (value.ndim - 1))

  def _stored(self, key: str) -> CatalogTable:
    """The variable of a `_tables` key (side/<field>, modality/<name>, ..., id_rows)."""
    kind, _, name = key.partition("/")
    return {"side": self.side, "modality": self.modalities, "inv_norm": self.inv_norms,
            "present": self.present, "numeric": self.numeric}[kind][
        name] if name else self.item_id_rows

  def load(self, schema: FeatureSchema, catalog: ItemCatalog) -> None:
    """Replaces the values in place after validating them (keeps each variable's sharding)."""
    catalog.validate(schema)
    for key, value in self._tables(schema, catalog).items():
      variable = self._stored(key)
      variable.set_value(jnp.asarray(self._padded(value), variable[...].dtype))
    for name, value in self._modalities(catalog):
      self.cosine_ranges[name].set_value(jnp.asarray(cosine_range(value)))
      if self.has_pairwise:
        self.pairwise[name].set_value(jnp.asarray(cosine_matrix(value)))

  def extended(self, schema: FeatureSchema, new: ItemCatalog) -> "CatalogTables":
    """These tables with n new items appended as ids [num_items, num_items + n) (serving).

    `new` holds the new items' catalog arrays (validated as a catalog of n items of `schema`:
    vocabulary side fields in range, raw ids for hashed ones, finite vectors, all-zero for a
    missing one). The catalog's cosine range (calibration) stays the trained one; a pairwise
    matrix is recomputed over all the items. Host-side (not under jit).
    """
    arrays = [*new.side.values(), *new.modalities.values(), *new.numeric.values()] + (
        [new.raw_ids] if new.raw_ids is not None else [])
    if not arrays:
      raise ValueError("new items: no side fields, vectors or raw ids given")
    n = len(arrays[0])
    new.validate(schema.replace(num_items=n))
    total = schema.replace(num_items=self.num_items + n)
    out = CatalogTables(total, sharding=self.sharding, vector_dtype=self.vector_dtype,
                        pairwise_lookup=self.pairwise_lookup, vectors=self.holds_vectors)
    for key, value in out._tables(schema.replace(num_items=n), new).items():
      old = np.asarray(jax.device_get(self._stored(key)[...]))[:self.num_items]
      merged = np.concatenate([old.astype(value.dtype), value])
      out._stored(key).set_value(jnp.asarray(out._padded(merged), out._stored(key)[...].dtype))
    for name in self.cosine_ranges:
      out.cosine_ranges[name].set_value(self.cosine_ranges[name][...])
    if self.has_pairwise:
      out.has_pairwise = True
      out.pairwise = nnx.Dict({
          name: CatalogTable(jnp.asarray(cosine_matrix(np.asarray(
              jax.device_get(out.modalities[name][...]), np.float32)[:out.num_items])))
          for name in schema.modality_names})
    return out

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
    """int [...] -> int32 [...] or [..., M] (a hashed field: its rows)."""
    return self._rows(self.side[name][...], item_ids)

  def numeric_values(self, name: str, item_ids: jax.Array) -> jax.Array:
    """An item numeric field: int [...] -> float32 [...] (NaN: missing)."""
    return self._rows(self.numeric[name][...], item_ids)

  def id_rows(self, item_ids: jax.Array) -> jax.Array:
    """The hashed item-id table's rows of the items: int [...] -> int32 [...] or [..., k]."""
    return self._rows(self.item_id_rows[...], item_ids)

  def vectors(self, name: str, item_ids: jax.Array) -> jax.Array:
    """int [...] -> float32 [..., D_k]."""
    return self.stored_vectors(name, item_ids).astype(jnp.float32)

  def stored_vectors(self, name: str, item_ids: jax.Array) -> jax.Array:
    """int [...] -> [..., D_k] in the stored dtype (`vector_dtype`)."""
    return self._rows(self.modalities[name][...], item_ids)

  def inverse_norms(self, name: str, item_ids: jax.Array) -> jax.Array:
    """1 / max(|m|, eps) of the items' vectors: int [...] -> float32 [...]."""
    return self._rows(self.inv_norms[name][...], item_ids)

  def has_vectors(self, name: str, item_ids: jax.Array) -> jax.Array:
    """Whether the items have modality `name` (a vector not all zero): int [...] -> bool [...]."""
    return self._rows(self.present[name][...], item_ids)

  @property
  def readable_whole(self) -> bool:
    """Whether `all_vectors` / `all_present` can read the tables whole (not row-sharded)."""
    return self.sharding.table_axis is None

  def all_vectors(self, name: str) -> jax.Array:
    """Every item's vectors, the stored table itself (no gather): float32 [V, D_k]. Only for
    tables that are not row-sharded (`readable_whole`)."""
    return self._whole(self.modalities[name]).astype(jnp.float32)

  def all_present(self, name: str) -> jax.Array:
    """`has_vectors` of every item: bool [V] (`readable_whole` tables only)."""
    return self._whole(self.present[name])

  def _whole(self, table: CatalogTable) -> jax.Array:
    """The items' rows of an unsharded table as stored: [V, ...]."""
    if not self.readable_whole:
      raise ValueError("the catalog's tables are row-sharded: gather them by id instead")
    return table[...][:self.num_items]

  def calibrate(self, name: str, similarity: jax.Array) -> jax.Array:
    """Maps the catalog's typical cosine range [low, high] (random pairs, 0.5-99.5 percentiles)
    linearly onto [-1, 1], clipped: uniform buckets then resolve the populated range."""
    low, high = self.cosine_ranges[name][...][0], self.cosine_ranges[name][...][1]
    return jnp.clip(2.0 * (similarity - low) / (high - low) - 1.0, -1.0, 1.0)

  def pairwise_similarity(self, name: str, target_ids: jax.Array, item_ids: jax.Array) -> jax.Array:
    """cos(m_t, m_j) from the precomputed matrix: target [...], items [..., L] (broadcast) -> [..., L]."""
    if self.pairwise_lookup == "one_hot":  # rows [..., V] . one_hot(items) [..., L, V]
      matrix = self.pairwise[name][...]
      rows = take_rows(matrix, self.safe_ids(target_ids), force=self.sharding.on_mesh)
      items = jax.nn.one_hot(self.safe_ids(item_ids), matrix.shape[1], dtype=rows.dtype)
      return jnp.einsum("...v,...lv->...l", rows, items)
    flat = self.safe_ids(target_ids)[..., None] * self.num_items + self.safe_ids(item_ids)
    return take_rows(self.pairwise[name][...].reshape(-1), flat, force=self.sharding.on_mesh)


def without_vectors(tables: Mapping, name: str, missing: np.ndarray,
                    flag_field: str | None = None) -> dict:
  """The catalog variables with modality `name` missing for some items (robustness checks).

  tables: a `CatalogTables`' variables as a nested dict ({'modalities': {name: CatalogTable},
    'side': ..., 'pairwise': ..., ...}; `dmf_jax.train.checkpointing.catalog_of(state)`).
  missing: bool [num_items]; those items lose modality `name`:
    modalities[name][i] = 0            (an all-zero vector: the catalog's missing marker, so
                                        every cosine with item i is 0 and a Q-Former masks it)
    present[name][i] = False           (the marker as a table)
    pairwise[name][i, :] = [:, i] = 0  (the precomputed cosines agree)
    side[flag_field][i] = 1            (a '<name>_missing' flag field, where the data has one)
  Everything else is kept, the cosine range (the trained calibration) included: the model
  sees the items as a catalog without their vectors looks at serving time. A catalog that
  holds no vectors (`vectors=False`) only gets the flag. Returns new
  variables with the same shardings; `tables` is left unchanged.
  """
  missing = np.asarray(missing, bool)
  if tables.get("modalities") and name not in tables["modalities"]:
    raise ValueError(f"catalog has no modality {name!r}; it has {sorted(tables['modalities'])}")
  if flag_field is not None and flag_field not in tables.get("side", {}):
    raise ValueError(f"catalog has no side field {flag_field!r}")

  def rows(length: int) -> np.ndarray:  # the mask padded to a table's (sharded) row count
    out = np.zeros(length, bool)
    out[:len(missing)] = missing
    return out

  def replaced(variable: CatalogTable, new_value) -> CatalogTable:
    old = variable[...]
    return variable.replace(jax.device_put(jnp.asarray(new_value, old.dtype), old.sharding))

  out = {group: dict(variables) for group, variables in tables.items()}
  if tables.get("modalities"):  # a catalog without vectors (an ID-only model): the flag only
    vectors = tables["modalities"][name]
    drop = rows(vectors.shape[0])
    out["modalities"][name] = replaced(vectors, jnp.where(drop[:, None], 0, vectors[...]))
    present = tables["present"][name]
    out["present"][name] = replaced(present, present[...] & ~rows(present.shape[0]))
  if name in tables.get("pairwise", {}):
    pair = tables["pairwise"][name]
    drop = rows(pair.shape[0])
    out["pairwise"][name] = replaced(pair, jnp.where(drop[:, None] | drop[None, :], 0, pair[...]))
  if flag_field is not None:
    flag = tables["side"][flag_field]
    out["side"][flag_field] = replaced(flag, jnp.where(rows(flag.shape[0]), 1, flag[...]))
  return out
