"""Target-aware similarity features: cosine of multimodal vectors, buckets, bucket embeddings.

For modality k, s_tj^k = cos(m_t^k, m_j^k) in [-1, 1] between the candidate t and each behaviour
j, computed on the frozen vectors or on a learned projection P_k m. The bucket of s is
b = clip(floor((s + 1) / 2 * B), 0, B - 1), looked up in a learned [B, bucket_dim] table.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.sharding import take_rows

SIMILARITY_MODES = ("frozen", "projected")
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
          [nnx.Linear(d, projection_dim, use_bias=False, rngs=rngs) for d in self.modality_dims]
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
