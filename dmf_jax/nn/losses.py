"""Losses as pure functions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dmf_jax.core.sharding import replicated


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


def info_nce(
    anchors: jax.Array,
    positives: jax.Array,
    candidates: jax.Array,
    anchor_ids: jax.Array,
    candidate_ids: jax.Array,
    temperature: float,
) -> jax.Array:
  """One-direction InfoNCE, mean over anchors (scalar).

  anchors, positives [B, d] (row i's positive is positives[i]); candidates [C, d] the other
  items competing in the softmax; all L2-normalized; ids int [B] and [C]. Candidates with the
  anchor's own item id (its positive again, a duplicate, a sampled copy) are left out, so each
  softmax holds the positive once: loss_i = logsumexp([p_i ; n_i]) - p_i.
  """
  positive = jnp.sum(anchors * positives, axis=-1) / temperature  # [B]
  logits = anchors @ candidates.T / temperature  # [B, C]
  logits = jnp.where(anchor_ids[:, None] == candidate_ids[None, :], -jnp.inf, logits)
  both = jnp.concatenate([positive[:, None], logits], axis=-1)
  return jnp.mean(jax.nn.logsumexp(both, axis=-1) - positive)


def symmetric_info_nce(
    content: jax.Array,
    ids: jax.Array,
    item_ids: jax.Array,
    temperature: float,
    negative_content: jax.Array | None = None,
    negative_ids: jax.Array | None = None,
    negative_item_ids: jax.Array | None = None,
) -> jax.Array:
  """0.5 (content -> id + id -> content) InfoNCE over the batch's items (EM3's Content-ID loss).

  content, ids: L2-normalized [B, d] embeddings of the same items item_ids [B]; the other
  items of the batch are negatives, plus M sampled items' negative_content / negative_ids
  [M, d] (negative_item_ids [M]) when given. On a mesh the candidate sets are replicated.
  """
  c_cand, e_cand, cand_ids = (replicated(x) for x in (content, ids, item_ids))
  if negative_content is not None:
    c_cand = jnp.concatenate([c_cand, replicated(negative_content)])
    e_cand = jnp.concatenate([e_cand, replicated(negative_ids)])
    cand_ids = jnp.concatenate([cand_ids, replicated(negative_item_ids)])
  return 0.5 * (info_nce(content, ids, e_cand, item_ids, cand_ids, temperature)
                + info_nce(ids, content, c_cand, item_ids, cand_ids, temperature))
