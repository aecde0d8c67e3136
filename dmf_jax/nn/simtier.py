"""SimTier: the modality-centric path, a histogram of target-behaviour similarities per modality."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.nn.layers import MLP
from dmf_jax.core.sharding import merge_leading, segment_sum_rows, split_leading
from dmf_jax.nn.similarity import bucketize, resolve_lookup_mode

SIMTIER_NORMALIZATIONS = ("count", "normalized", "log1p")


def simtier_histogram(
    similarity: jax.Array, mask: jax.Array, num_tiers: int, normalization: str = "log1p",
    lookup: str = "gather",
) -> jax.Array:
  """Counts of similarities in T equal-width tiers over [-1, 1], padding not counted.

  similarity [B, L, K], mask bool [B, L] -> [B, K, T]. 'count' gives raw counts, 'normalized'
  divides by the number of unmasked behaviours (all-masked rows stay zero), 'log1p' is
  log(1 + count).
  """
  if normalization not in SIMTIER_NORMALIZATIONS:
    raise ValueError(
        f"SimTier normalization {normalization!r} is not one of {SIMTIER_NORMALIZATIONS}"
    )
  checks.check_rank("similarity", similarity, 3)
  checks.check_shape("mask", mask, similarity.shape[:2])
  checks.check_bool("mask", mask)
  # Padding positions may hold anything (even NaN from an unfilled buffer): neutralize first.
  similarity = jnp.where(mask[..., None], similarity, 0.0)
  batch, seq_len, k = similarity.shape
  tiers = bucketize(similarity, num_tiers)  # [B, L, K]
  if resolve_lookup_mode(lookup) == "one_hot":  # counts[b,k,t] = sum_l mask[b,l] [tier = t]
    counts = jnp.einsum("bl,blkt->bkt", mask.astype(jnp.float32),
                        jax.nn.one_hot(tiers, num_tiers, dtype=jnp.float32))
  else:
    segment = (jnp.arange(batch)[:, None, None] * k + jnp.arange(k)[None, None, :]) * num_tiers
    weights = jnp.broadcast_to(mask[..., None], tiers.shape).astype(jnp.float32)
    counts = segment_sum_rows(weights.reshape(-1), (segment + tiers).reshape(-1),
                              batch * k * num_tiers).reshape(batch, k, num_tiers)
  if normalization == "normalized":
    valid = jnp.sum(mask, axis=-1).astype(counts.dtype)[:, None, None]
    return counts / jnp.maximum(valid, 1.0)
  if normalization == "log1p":
    return jnp.log1p(counts)
  return counts


class SimTier(nnx.Module):
  """Histogram [B, K, T] flattened and passed through a small MLP: -> [B, hidden[-1]]."""

  def __init__(
      self,
      num_modalities: int,
      *,
      num_tiers: int = 20,
      normalization: str = "log1p",
      hidden: Sequence[int] = (64, 32),
      activation: str = "relu",
      lookup_mode: str = "gather",
      rngs: nnx.Rngs,
  ):
    """lookup_mode: how the histogram is counted (`nn.similarity.LOOKUP_MODES`)."""
    if normalization not in SIMTIER_NORMALIZATIONS:
      raise ValueError(
          f"SimTier normalization {normalization!r} is not one of {SIMTIER_NORMALIZATIONS}"
      )
    self.num_tiers = num_tiers
    self.normalization = normalization
    self.lookup_mode = resolve_lookup_mode(lookup_mode)
    self.mlp = MLP(num_modalities * num_tiers, hidden, activation=activation, rngs=rngs)

  @property
  def out_dim(self) -> int:
    return self.mlp.out_dim

  def __call__(self, similarity: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
    """similarity [B, L, K] (or [B, N, L, K]: N candidates per user), mask [B, L] -> [B, (N,) out]."""
    if similarity.ndim == 4:  # N candidates per user: the users' masks, one histogram each
      batch, n = similarity.shape[:2]
      mask = merge_leading(jnp.broadcast_to(mask[:, None], similarity.shape[:3]))
      return split_leading(self(merge_leading(similarity), mask, train=train), batch, n)
    hist = simtier_histogram(similarity, mask, self.num_tiers, self.normalization,
                             self.lookup_mode)
    # The histogram (counted in float32) enters the MLP in its parameters' (compute) dtype.
    hist = hist.astype(self.mlp.layers[0].kernel.dtype)
    return self.mlp(hist.reshape(hist.shape[0], -1), train=train)
