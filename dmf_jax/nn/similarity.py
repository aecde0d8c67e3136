"""Target-aware similarity features: cosine of multimodal vectors, buckets, bucket embeddings.

For modality k, s_tj^k = cos(m_t^k, m_j^k) in [-1, 1] between the candidate t and each behaviour
j, computed on the frozen vectors or on a learned projection P_k m. The similarity bucket of s
is b = clip(floor((s + 1) / 2 * B), 0, B - 1), looked up in a learned [B, bucket_dim] table.

`CatalogSimilarity` is the feature the multimodal models hold: s between catalog items, split
like the models into a target-agnostic side per user (`history` -> `SimilarityHistory`) and
the per-candidate part (`score`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.catalog import CatalogTables
from dmf_jax.core.rows import Rows
from dmf_jax.core.sharding import take_rows
from dmf_jax.nn.layers import Linear

SIMILARITY_MODES = ("frozen", "projected")
# 'catalog_range': frozen cosines mapped from the catalog's typical range onto [-1, 1].
SIMILARITY_CALIBRATIONS = ("none", "catalog_range")
NORM_EPS = 1e-8
# How small lookups run (DTA's per-bucket scores and attention mass, SimTier's counts, the
# pairwise cosine matrix): 'gather' (scalar gathers and segment sums) or 'one_hot' (the same
# sums as one-hot matmuls: on a TPU a scalar gather or scatter costs a whole memory tile, a
# matmul the MXU); 'auto': one_hot on a TPU backend, gather elsewhere.
LOOKUP_MODES = ("auto", "gather", "one_hot")


def resolve_lookup_mode(lookup: str) -> str:
  """'auto' -> 'one_hot' on a TPU backend, else 'gather'; the others as they are."""
  if lookup not in LOOKUP_MODES:
    raise ValueError(f"lookup_mode {lookup!r} is not one of {LOOKUP_MODES}")
  if lookup == "auto":
    return "one_hot" if jax.default_backend() == "tpu" else "gather"
  return lookup


def l2_normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """[..., D] -> [..., D] with unit norm; an all-zero vector (missing modality) stays zero."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def cosine_similarity(target: jax.Array, behaviors: jax.Array) -> jax.Array:
  """Cosine between each target and its behaviours: [..., D], [..., L, D] -> [..., L]."""
  s = jnp.einsum("...d,...ld->...l", l2_normalize(target), l2_normalize(behaviors))
  return jnp.clip(s, -1.0, 1.0)


def bucketize(similarity: jax.Array, num_buckets: int) -> jax.Array:
  """Equal-width buckets over [-1, 1]: float [...] -> int32 [...] in [0, num_buckets).

  b = clip(floor((s + 1) / 2 * B), 0, B - 1): -1 is bucket 0, +1 is bucket B - 1, and a value
  on a border -1 + 2i/B belongs to bucket i. NaN is rejected when `similarity` is concrete;
  under jit (tracers) a NaN maps to bucket 0 — upstream inputs are validated where they enter
  (the item catalog rejects non-finite vectors), so no NaN reaches here in normal use.
  """
  checks.check_floating("similarity", similarity)
  checks.check_finite("similarity", similarity)
  scaled = jnp.floor((similarity + 1.0) * (num_buckets / 2.0))
  scaled = jnp.where(jnp.isnan(scaled), 0.0, scaled)
  return jnp.clip(scaled, 0, num_buckets - 1).astype(jnp.int32)


class TargetAwareSimilarity(nnx.Module):
  """Per-modality cosine similarity between candidates and behaviours, frozen or projected.

  `prepare` maps raw vectors [..., D_k] to unit vectors (after the learned projection in
  'projected' mode); it is target-agnostic, so serving applies it once per user sequence.
  `__call__` returns s [B, L, K] (masked positions set to 0).
  """

  def __init__(
      self,
      modality_dims: Sequence[int],
      *,
      mode: str = "frozen",
      projection_dim: int = 64,
      rngs: nnx.Rngs,
  ):
    if mode not in SIMILARITY_MODES:
      raise ValueError(f"similarity mode {mode!r} is not one of {SIMILARITY_MODES}")
    self.modality_dims = tuple(modality_dims)
    self.mode = mode
    if mode == "projected":
      self.projections = nnx.List(
          [Linear(d, projection_dim, use_bias=False, rngs=rngs) for d in self.modality_dims]
      )

  @property
  def num_modalities(self) -> int:
    return len(self.modality_dims)

  def prepare(self, k: int, vectors: jax.Array) -> jax.Array:
    """Modality k's raw vectors [..., D_k] -> unit vectors [..., D'] used in the cosine."""
    if self.mode == "projected":
      vectors = self.projections[k](vectors)
    return l2_normalize(vectors)

  def __call__(
      self,
      target_vectors: Sequence[jax.Array],
      behavior_vectors: Sequence[jax.Array],
      mask: jax.Array,
  ) -> jax.Array:
    """K x [B, D_k], K x [B, L, D_k], bool [B, L] -> float32 [B, L, K]."""
    self._validate(target_vectors, behavior_vectors, mask)
    sims = []
    for k, (t, b) in enumerate(zip(target_vectors, behavior_vectors)):
      s = jnp.einsum("bd,bld->bl", self.prepare(k, t), self.prepare(k, b))
      sims.append(jnp.clip(s, -1.0, 1.0))
    return jnp.stack(sims, axis=-1) * mask[..., None]

  def _validate(self, target_vectors, behavior_vectors, mask):
    if len(target_vectors) != self.num_modalities or len(behavior_vectors) != self.num_modalities:
      raise ValueError(
          f"expected {self.num_modalities} modalities, got {len(target_vectors)} target and "
          f"{len(behavior_vectors)} behaviour vector arrays"
      )
    checks.check_rank("mask", mask, 2)
    checks.check_bool("mask", mask)
    batch, seq_len = mask.shape
    for k, (t, b, dim) in enumerate(zip(target_vectors, behavior_vectors, self.modality_dims)):
      checks.check_shape(f"target_vectors[{k}]", t, (batch, dim))
      checks.check_shape(f"behavior_vectors[{k}]", b, (batch, seq_len, dim))
      checks.check_finite(f"target_vectors[{k}]", t)
      checks.check_finite(f"behavior_vectors[{k}]", b)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SimilarityHistory:
  """The target-agnostic side of s_tj for B users' histories of L items; one of:

    ids [B, L]                          the catalog's all-pairs cosine matrix: its rows
    vectors K x [B, L, D_k] and         frozen cosines: the stored vectors and their inverse
      inv_norms K x [B, L]              norms (the cosine is then one product, no normalised copy)
    vectors K x [B, L, D'_k]            projected: the prepared unit vectors
    record [B, L, K]                    the batch's own frozen cosines (`data.pipeline`), raw
  """

  ids: jax.Array | None = None
  vectors: tuple[jax.Array, ...] | None = None
  inv_norms: tuple[jax.Array, ...] | None = None
  record: jax.Array | None = None


class CatalogSimilarity(TargetAwareSimilarity):
  """Target-aware similarities between catalog items (`CatalogTables`), per modality.

  history = sim.history(catalog, rows)              # once per user: SimilarityHistory
  s = sim.score(catalog, history, candidates, mask)  # [B, N, L, K], 0 where masked

  Frozen cosines come from the catalog's all-pairs matrix when it has one, else from the
  stored vectors and inverse norms, or from the batch itself (`record`). calibration
  'catalog_range' maps frozen cosines from the catalog's typical range onto [-1, 1].
  Parameters (projected mode) are TargetAwareSimilarity's.
  """

  def __init__(self, modality_names: Sequence[str], modality_dims: Sequence[int], *,
               mode: str = "frozen", projection_dim: int = 64, calibration: str = "none",
               dtype=jnp.float32, rngs: nnx.Rngs):
    """dtype: the forward's dtype (projected mode prepares the vectors in it)."""
    super().__init__(modality_dims, mode=mode, projection_dim=projection_dim, rngs=rngs)
    if calibration not in SIMILARITY_CALIBRATIONS:
      raise ValueError(f"similarity calibration {calibration!r} is not one of "
                       f"{SIMILARITY_CALIBRATIONS}")
    self.modality_names = tuple(modality_names)
    self.calibration = calibration
    self.dtype = dtype

  def takes_records(self, catalog: CatalogTables) -> bool:
    """Whether batches may carry their own frozen cosines 'hist_similarity' [B, L, K]: frozen
    similarities over a catalog without the all-pairs matrix (the step then reads no vectors)."""
    return self.mode == "frozen" and not catalog.has_pairwise

  def record(self, catalog: CatalogTables, batch: Mapping[str, jax.Array]
             ) -> SimilarityHistory | None:
    """The history of a batch that carries its own cosines (the targets are the batch's
    items); None when it carries none or this feature does not take them."""
    record = batch.get("hist_similarity")
    if record is None or not self.takes_records(catalog):
      return None
    checks.check_floating("batch['hist_similarity']", record)
    checks.check_shape("batch['hist_similarity']", record,
                       batch["hist_mask"].shape + (self.num_modalities,))
    return SimilarityHistory(record=record)

  def history(self, catalog: CatalogTables, rows: Rows) -> SimilarityHistory:
    """The history side for the history Rows of ids [B, L] (projected: prepared on the rows)."""
    if catalog.has_pairwise:
      return SimilarityHistory(ids=rows.take())
    if self.mode == "frozen":
      if rows.shards:  # a batch's distinct items: a plain read per position moves fewer bytes
        rows = Rows(rows.take())  # than gathering the distinct rows and then the positions
      return SimilarityHistory(
          vectors=tuple(rows.map(lambda ids, n=n: catalog.stored_vectors(n, ids)).take()
                        for n in self.modality_names),
          inv_norms=tuple(rows.map(lambda ids, n=n: catalog.inverse_norms(n, ids)).take()
                          for n in self.modality_names))
    return SimilarityHistory(vectors=tuple(
        rows.map(lambda ids, k=k, n=n: self.prepare(k, self._vectors(catalog, n, ids))).take()
        for k, n in enumerate(self.modality_names)))

  def score(self, catalog: CatalogTables, history: SimilarityHistory, candidates: jax.Array,
            mask: jax.Array) -> jax.Array:
    """s [B, N, L, K] of candidates int [B, N] against the histories (0 where mask [B, L] is
    False), calibrated."""
    names = self.modality_names
    if history.record is not None:  # the batch's own targets
      checks.check_shape("candidates", candidates, (history.record.shape[0], 1))
      sims = [history.record[:, None, :, k] for k in range(len(names))]
    elif history.ids is not None:
      sims = [catalog.pairwise_similarity(name, candidates, history.ids[:, None])
              for name in names]
    elif history.inv_norms is not None:  # frozen: cos = (t . h) / (|t| |h|)
      sims = [jnp.clip(jnp.einsum("bnd,bld->bnl", catalog.stored_vectors(name, candidates), h,
                                  preferred_element_type=jnp.float32)
                       * catalog.inverse_norms(name, candidates)[..., None]
                       * inv[:, None, :], -1.0, 1.0)
              for name, h, inv in zip(names, history.vectors, history.inv_norms)]
    else:
      sims = [jnp.clip(jnp.einsum("bnd,bld->bnl",
                                  self.prepare(k, self._vectors(catalog, name, candidates)), h,
                                  preferred_element_type=jnp.float32), -1.0, 1.0)
              for k, (name, h) in enumerate(zip(names, history.vectors))]
    if self.calibration != "none":
      sims = [catalog.calibrate(name, s) for name, s in zip(names, sims)]
    return jnp.stack(sims, axis=-1) * mask[:, None, :, None]

  def _vectors(self, catalog: CatalogTables, name: str, item_ids: jax.Array) -> jax.Array:
    return catalog.vectors(name, item_ids).astype(self.dtype)


class SimilarityBucketEmbedding(nnx.Module):
  """K learned tables of [num_buckets, bucket_dim]: int [..., K] -> float32 [..., K * bucket_dim]."""

  def __init__(self, num_modalities: int, num_buckets: int, bucket_dim: int, *, rngs: nnx.Rngs):
    self.num_modalities = num_modalities
    self.num_buckets = num_buckets
    self.bucket_dim = bucket_dim
    init = jax.nn.initializers.normal(0.05)
    self.tables = nnx.Param(init(rngs.params(), (num_modalities, num_buckets, bucket_dim)))

  def __call__(self, bucket_ids: jax.Array) -> jax.Array:
    # One gather from the flattened tables: row k * num_buckets + bucket (keeps the ids' sharding).
    rows = bucket_ids + jnp.arange(self.num_modalities) * self.num_buckets
    z = take_rows(self.tables[...].reshape(-1, self.bucket_dim), rows)  # [..., K, bucket_dim]
    return z.reshape(*bucket_ids.shape[:-1], self.num_modalities * self.bucket_dim)
