"""Losses as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def bce_with_logits(
    logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
  """Weighted mean binary cross-entropy: logits, labels, weights [B] -> scalar.

  sum_i w_i * bce_i / sum_i w_i; a batch whose weights are all zero gives 0.
  """
  if logits.shape != labels.shape:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} must have the same shape")
  per_example = optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))
  if weights is None:
    return jnp.mean(per_example)
  if weights.shape != logits.shape:
    raise ValueError(f"weights {weights.shape} must have the shape of logits {logits.shape}")
  weights = weights.astype(logits.dtype)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1e-12)
