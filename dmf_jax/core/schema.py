"""Feature schema: the declared features from which embedding tables and batches are derived.

A dataset publishes a `FeatureSchema`; models build their tables from it, and the input
pipeline produces batches with the keys it names (see `batch_keys`).

Batch layout (B examples, L behaviours):
  user/<name>    int32 [B] or [B, M]     user profile fields (M = max_values, padded with -1)
  item_id        int32 [B]               target item
  hist_item_id   int32 [B, L]            behaviour items, most recent last, padding where masked
  hist_mask      bool  [B, L]            True for real behaviours
  label          float32 [B]             1 click / 0 no click
  weight         float32 [B]             example weight (0 for padding rows in eval batches)

Item side fields (category, genres, year, ...) and the frozen multimodal vectors are per-item
facts: they live in an `ItemCatalog` held by the model and are looked up by item id, so batches
carry ids only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

POOLINGS = ("mean", "sum")


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
  """

  name: str
  vocab_size: int
  dim: int
  max_values: int = 1
  pooling: str = "mean"

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

  @property
  def multi_valued(self) -> bool:
    return self.max_values > 1


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
    num_items: size of the item vocabulary; item ids are in [0, num_items).
    item_id_dim: width of the item-id embedding.
    item_features: item side fields, looked up from the catalog by item id.
    user_features: user profile fields, read from the batch.
    modalities: frozen multimodal vectors per item.
    seq_len: L, the padded behaviour-sequence length.
  """

  num_items: int
  item_id_dim: int
  seq_len: int
  item_features: tuple[FeatureSpec, ...] = ()
  user_features: tuple[FeatureSpec, ...] = ()
  modalities: tuple[ModalitySpec, ...] = ()

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

  @property
  def item_id_spec(self) -> FeatureSpec:
    return FeatureSpec("item_id", self.num_items, self.item_id_dim)

  @property
  def item_dim(self) -> int:
    """Width d of an item's ID-side embedding: item id plus its side fields, concatenated."""
    return self.item_id_dim + sum(f.dim for f in self.item_features)

  @property
  def user_dim(self) -> int:
    return sum(f.dim for f in self.user_features)

  @property
  def modality_names(self) -> tuple[str, ...]:
    return tuple(m.name for m in self.modalities)

  def batch_keys(self) -> tuple[str, ...]:
    user = tuple(f"user/{f.name}" for f in self.user_features)
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
