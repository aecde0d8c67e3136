"""Losses (`nn.losses`) against numpy: weighted BCE, the symmetric Content-ID InfoNCE."""

import jax.numpy as jnp
import numpy as np
import pytest

from dmf_jax.nn import losses
from dmf_jax.nn.losses import bce_with_logits

RNG = np.random.default_rng(0)


def test_bce_matches_numpy_with_weights():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=10).astype(np.float32) * 3
  labels = (rng.random(10) < 0.5).astype(np.float32)
  weights = rng.random(10).astype(np.float32)
  weights[3] = 0.0
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  per = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  got = bce_with_logits(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  np.testing.assert_allclose(float(got), (per * weights).sum() / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(bce_with_logits(jnp.asarray(logits), jnp.asarray(labels))),
                             per.mean(), rtol=1e-5)
  assert float(bce_with_logits(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros(10))) == 0.0
  with pytest.raises(ValueError, match="logits .* and labels .* must have the same shape"):
    bce_with_logits(jnp.zeros(3), jnp.zeros(4))


def numpy_info_nce(a, cand, ids, cand_ids, t):
  a, cand = np.asarray(a, np.float64), np.asarray(cand, np.float64)
  total = 0.0
  for i in range(len(a)):
    logits = a[i] @ cand.T / t
    keep = [j for j in range(len(cand)) if j == i or cand_ids[j] != ids[i]]
    z = logits[keep]
    total += np.log(np.sum(np.exp(z - z.max()))) + z.max() - logits[i]
  return total / len(a)


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contrastive_loss_matches_numpy_and_is_symmetric():
  b, m, d, t = 9, 6, 5, 0.1
  ids = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5])  # duplicates: 1 and 5
  neg_ids = np.array([7, 3, 8, 4, 0, 11])  # sampled negatives 3 and 4 equal batch items
  c, e = unit(RNG.normal(size=(b, d))), unit(RNG.normal(size=(b, d)))
  nc, ne = unit(RNG.normal(size=(m, d))), unit(RNG.normal(size=(m, d)))
  got = losses.symmetric_info_nce(jnp.asarray(c), jnp.asarray(e), jnp.asarray(ids), t,
                                   jnp.asarray(nc), jnp.asarray(ne), jnp.asarray(neg_ids))
  all_ids = np.concatenate([ids, neg_ids])
  want = 0.5 * (numpy_info_nce(c, np.concatenate([e, ne]), ids, all_ids, t)
                + numpy_info_nce(e, np.concatenate([c, nc]), ids, all_ids, t))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  swapped = losses.symmetric_info_nce(jnp.asarray(e), jnp.asarray(c), jnp.asarray(ids), t,
                                       jnp.asarray(ne), jnp.asarray(nc), jnp.asarray(neg_ids))
  np.testing.assert_allclose(float(swapped), float(got), rtol=1e-6)
  in_batch = losses.symmetric_info_nce(jnp.asarray(c), jnp.asarray(e), jnp.asarray(ids), t)
  want = 0.5 * (numpy_info_nce(c, e, ids, ids, t) + numpy_info_nce(e, c, ids, ids, t))
  np.testing.assert_allclose(float(in_batch), want, rtol=1e-5)
  # Aligned embeddings give a lower loss than random ones.
  assert float(losses.symmetric_info_nce(jnp.asarray(c), jnp.asarray(c), jnp.asarray(ids), t)) \
      < float(in_batch)
