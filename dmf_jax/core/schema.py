"""Feature schema: the declared features from which embedding tables and batches are derived.

A dataset publishes a `FeatureSchema`; models build their tables from it, and the input
pipeline produces batches with the keys it names (see `batch_keys`).

Batch layout (B examples, L behaviours):
  user/<name>    int32 [B] or [B, M]     user profile fields (M = max_values, padded with -1;
                                         a hashed field: its num_hashes rows, see `FeatureSpec`)
  item_id        int32 [B]               target item
  hist_item_id   int32 [B, L]            behaviour items, most recent last, padding where masked
  hist_mask      bool  [B, L]            True for real behaviours
  label          float32 [B]             1 click / 0 no click
  weight         float32 [B]             example weight (0 for padding rows in eval batches)

  user/<numeric>  float32 [B]            user numeric fields (`NumericSpec`), NaN = missing

Item side fields (category, genres, year, ...), item numeric fields and the frozen multimodal
vectors are per-item facts: they live in an `ItemCatalog` held by the model and are looked up
by item id, so batches carry ids only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dmf_jax.core import hashing

POOLINGS = ("mean", "sum")
NORMALIZATIONS = ("standard", "minmax", "log1p", "bucketize")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One categorical field.

  Attributes:
    name: field name; batch key `user/<name>` for user fields.
    vocab_size: number of valid ids, [0, vocab_size). The table gets one more row for OOV.
    dim: embedding width.
    max_values: 1 for a single-valued field; M > 1 for a multi-valued field given as [..., M]
      ids padded with -1, pooled over its valid values.
    pooling: 'mean' or 'sum' over the valid values of a multi-valued field.
    hash_buckets: 0 for a vocabulary field (ids are dense indices, checked against
      vocab_size); B > 0 for a hashed field: the records keep each value's raw 64-bit id
      (`dmf_jax.core.hashing`), hashed when read into one of B rows (vocab_size = B), so ids
      never seen at build time are valid. A hashed field holds one raw value; its model value
      is its `num_hashes` rows (max_values = num_hashes, pooled by sum when > 1).
    num_hashes: rows per value of a hashed field (1, or 2 to make full collisions rare).
    hash_seed: the hash's seed (documented in `dmf_jax.core.hashing`).
  """

  name: str
  vocab_size: int
  dim: int
  max_values: int = 1
  pooling: str = "mean"
  hash_buckets: int = 0
  num_hashes: int = 1
  hash_seed: int = 0

  def __post_init__(self):
    if not self.name or "/" in self.name:
      raise ValueError(f"FeatureSpec.name: invalid name {self.name!r}")
    for field in ("vocab_size", "dim", "max_values"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"FeatureSpec({self.name}).{field}: must be a positive int, got {value!r}")
    if self.pooling not in POOLINGS:
      raise ValueError(
          f"FeatureSpec({self.name}).pooling: {self.pooling!r} is not one of {POOLINGS}"
      )
    for field in ("hash_buckets", "hash_seed"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"FeatureSpec({self.name}).{field}: must be an int >= 0, got {value!r}")
    if not isinstance(self.num_hashes, (int, np.integer)) or not 1 <= self.num_hashes <= 4:
      raise ValueError(f"FeatureSpec({self.name}).num_hashes: must be 1..4, got "
                       f"{self.num_hashes!r}")
    if self.hashed:
      if (self.vocab_size, self.max_values) != (self.hash_buckets, self.num_hashes) or (
          self.num_hashes > 1 and self.pooling != "sum"):
        raise ValueError(
            f"FeatureSpec({self.name}): a hashed field has vocab_size = hash_buckets, "
            f"max_values = num_hashes and sum pooling; use FeatureSpec.hashed_field()")
    elif self.num_hashes != 1:
      raise ValueError(f"FeatureSpec({self.name}).num_hashes: only for hashed fields "
                       f"(hash_buckets > 0)")

  @classmethod
  def hashed_field(cls, name: str, buckets: int, dim: int, *, num_hashes: int = 1,
                   seed: int = 0) -> "FeatureSpec":
    """A hashed field of `buckets` rows (its value: num_hashes rows, summed)."""
    return cls(name, buckets, dim, max_values=num_hashes, pooling="sum", hash_buckets=buckets,
               num_hashes=num_hashes, hash_seed=seed)

  @property
  def hashed(self) -> bool:
    return self.hash_buckets > 0

  @property
  def multi_valued(self) -> bool:
    return self.max_values > 1

  @property
  def raw_width(self) -> int:
    """int32 slots of one value in a record: the raw 64-bit id (2) when hashed, else M."""
    return 2 if self.hashed else self.max_values

  def rows(self, raw: np.ndarray) -> np.ndarray:
    """A hashed field's raw ids int64 [...] -> its rows int32 [...] or [..., num_hashes]."""
    return hashing.hash_rows(raw, self.hash_buckets, seed=self.hash_seed,
                             num_hashes=self.num_hashes)


@dataclasses.dataclass(frozen=True)
class NumericSpec:
  """One numeric (dense) field, with its normalisation fitted on the training split.

  A value x (NaN = missing) becomes, for the scalar normalisations, two model inputs
  [z ; missing] with z = clip((t(x) - center) / scale, -CLIP, CLIP) (0 when missing):
    standard  t(x) = x,                      center = mean,  scale = std
    minmax    t(x) = x,                      center = min,   scale = max - min
    log1p     t(x) = sign(x) log1p(|x|),     center = mean of t, scale = std of t
  and for 'bucketize' the embedding [dim] of its bucket: searchsorted(boundaries, x, 'right')
  in [0, num_buckets), bucket num_buckets for a missing value; the boundaries are the training
  split's quantiles at 1/num_buckets, ..., (num_buckets-1)/num_buckets (repeats removed, so a
  field may have fewer buckets than asked).

  Attributes:
    name: field name; batch key `user/<name>` for user fields.
    normalization: one of NORMALIZATIONS.
    num_buckets, dim: the bucketize setting (bucket count asked; embedding width).
    center, scale, boundaries: the fitted statistics (`dmf_jax.data.numeric.fit`); scale > 0.
  """

  name: str
  normalization: str = "standard"
  num_buckets: int = 10
  dim: int = 8
  center: float = 0.0
  scale: float = 1.0
  boundaries: tuple[float, ...] = ()

  CLIP = 8.0

  def __post_init__(self):
    if not self.name or "/" in self.name:
      raise ValueError(f"NumericSpec.name: invalid name {self.name!r}")
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f"NumericSpec({self.name}).normalization: {self.normalization!r} is not "
                       f"one of {NORMALIZATIONS}")
    for field in ("num_buckets", "dim"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"NumericSpec({self.name}).{field}: must be a positive int, got "
                         f"{value!r}")
    if not (np.isfinite(self.center) and np.isfinite(self.scale) and self.scale > 0):
      raise ValueError(f"NumericSpec({self.name}): center and scale must be finite, scale > 0; "
                       f"got {self.center!r}, {self.scale!r}")
    bounds = np.asarray(self.boundaries, np.float64)
    if not np.isfinite(bounds).all() or (np.diff(bounds) <= 0).any():
      raise ValueError(f"NumericSpec({self.name}).boundaries: must be finite and increasing")
    object.__setattr__(self, "boundaries", tuple(float(b) for b in self.boundaries))

  @property
  def bucketized(self) -> bool:
    return self.normalization == "bucketize"

  @property
  def width(self) -> int:
    """Model inputs per value: [z ; missing] (2), or the bucket embedding (dim)."""
    return self.dim if self.bucketized else 2


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
  """A frozen multimodal vector per item (e.g. text 384-d, image 1280-d)."""

  name: str
  dim: int

  def __post_init__(self):
    if not isinstance(self.dim, (int, np.integer)) or self.dim < 1:
      raise ValueError(f"ModalitySpec({self.name}).dim: must be a positive int, got {self.dim!r}")


@dataclasses.dataclass(frozen=True)
class FeatureSchema:
  """All features of a dataset.

  Attributes:
    num_items: size of the item catalog; item ids (catalog rows) are in [0, num_items).
    item_id_dim: width of the item-id embedding.
    item_id_hash_buckets / item_id_num_hashes / item_id_hash_seed: a hashed item-id table
      (`FeatureSpec`): each item's raw id is kept in the catalog (`ItemCatalog.raw_ids`) and
      hashed into one of that many rows, so new items (at serving, or in a later build) get
      trained rows instead of a shared out-of-vocabulary one. 0: one row per catalog item.
    item_features: item side fields, looked up from the catalog by item id.
    user_features: user profile fields, read from the batch.
    item_numeric: item numeric fields, looked up from the catalog by item id.
    user_numeric: user numeric fields, read from the batch (`user/<name>` float32 [B]).
    modalities: frozen multimodal vectors per item.
    seq_len: L, the padded behaviour-sequence length.
  """

  num_items: int
  item_id_dim: int
  seq_len: int
  item_features: tuple[FeatureSpec, ...] = ()
  user_features: tuple[FeatureSpec, ...] = ()
  modalities: tuple[ModalitySpec, ...] = ()
  item_id_hash_buckets: int = 0
  item_id_num_hashes: int = 1
  item_id_hash_seed: int = 0
  item_numeric: tuple[NumericSpec, ...] = ()
  user_numeric: tuple[NumericSpec, ...] = ()

  def __post_init__(self):
    for field in ("num_items", "item_id_dim", "seq_len"):
      value = getattr(self, field)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"FeatureSchema.{field}: must be a positive int, got {value!r}")
    for group in ("item_features", "user_features", "modalities"):
      names = [f.name for f in getattr(self, group)]
      dupes = sorted({n for n in names if names.count(n) > 1})
      if dupes:
        raise ValueError(f"FeatureSchema.{group}: duplicate names {dupes}")
    for side in ("item", "user"):
      names = [f.name for f in getattr(self, f"{side}_features")]
      names += [f.name for f in getattr(self, f"{side}_numeric")]
      dupes = sorted({n for n in names if names.count(n) > 1})
      if dupes:
        raise ValueError(f"FeatureSchema: {side} field names {dupes} are used twice (as "
                         f"categorical and numeric fields, or twice)")

  @property
  def item_id_spec(self) -> FeatureSpec:
    if self.item_id_hash_buckets:
      return FeatureSpec.hashed_field("item_id", self.item_id_hash_buckets, self.item_id_dim,
                                      num_hashes=self.item_id_num_hashes,
                                      seed=self.item_id_hash_seed)
    return FeatureSpec("item_id", self.num_items, self.item_id_dim)

  @property
  def item_dim(self) -> int:
    """Width d of an item's ID-side embedding: item id, side fields and numeric fields,
    concatenated."""
    return (self.item_id_dim + sum(f.dim for f in self.item_features)
            + sum(f.width for f in self.item_numeric))

  @property
  def user_dim(self) -> int:
    return sum(f.dim for f in self.user_features) + sum(f.width for f in self.user_numeric)

  @property
  def modality_names(self) -> tuple[str, ...]:
    return tuple(m.name for m in self.modalities)

  def batch_keys(self) -> tuple[str, ...]:
    user = tuple(f"user/{f.name}" for f in (*self.user_features, *self.user_numeric))
    return user + ("item_id", "hist_item_id", "hist_mask", "label", "weight")

  def replace(self, **changes) -> "FeatureSchema":
    return dataclasses.replace(self, **changes)

  def with_modalities(self, names) -> "FeatureSchema":
    """The schema restricted to the modalities `names` (kept in schema order)."""
    names = tuple(names)
    unknown = sorted(set(names) - set(self.modality_names))
    if unknown:
      raise ValueError(f"unknown modalities {unknown}; the schema has {list(self.modality_names)}")
    return self.replace(modalities=tuple(m for m in self.modalities if m.name in names))
