"""Exact metrics against brute-force pair-counting references."""

import numpy as np
import pytest

from dmf_jax.train import metrics


def brute_auc(labels, scores, weights):
  num, den = 0.0, 0.0
  for i in np.flatnonzero(labels == 1):
    for j in np.flatnonzero(labels == 0):
      w = weights[i] * weights[j]
      den += w
      num += w * (1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0)
  return num / den


def test_auc_with_ties_and_weights_matches_pair_counting():
  rng = np.random.default_rng(0)
  labels = (rng.random(60) < 0.4).astype(int)
  scores = np.round(rng.normal(size=60), 1)  # many ties
  weights = rng.random(60)
  weights[:5] = 0.0
  np.testing.assert_allclose(metrics.auc(labels, scores, weights),
                             brute_auc(labels, scores, weights), rtol=1e-12)
  assert metrics.auc([1, 0], [0.3, 0.3]) == 0.5
  assert metrics.auc([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
  assert np.isnan(metrics.auc([1, 1], [0.1, 0.2]))


def test_gauc_skips_single_class_users_and_weights_by_impressions():
  users = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
  labels = np.array([1, 0, 0, 1, 1, 0, 1, 1, 0])
  scores = np.array([0.9, 0.1, 0.95, 0.5, 0.4, 0.2, 0.8, 0.1, 0.3])
  u0 = brute_auc(labels[:3], scores[:3], np.ones(3))
  u2 = brute_auc(labels[5:], scores[5:], np.ones(4))
  np.testing.assert_allclose(metrics.gauc(users, labels, scores), (3 * u0 + 4 * u2) / 7)


def test_logloss_and_accumulator_merge():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=20) * 4
  labels = (rng.random(20) < 0.5).astype(float)
  p = 1 / (1 + np.exp(-logits))
  want = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  np.testing.assert_allclose(metrics.logloss(labels, logits), want, rtol=1e-10)
  users = rng.integers(0, 4, 20)
  weights = np.r_[np.ones(18), 0.0, 0.0]  # two padding rows
  a, b = metrics.EvalAccumulator(), metrics.EvalAccumulator()
  a.update(users[:10], labels[:10], logits[:10], weights[:10])
  b.update(users[10:], labels[10:], logits[10:], weights[10:])
  merged = a.merge(b).compute()
  assert merged["count"] == 18
  np.testing.assert_allclose(merged["auc"], metrics.auc(labels[:18], logits[:18]))
  np.testing.assert_allclose(merged["logloss"], metrics.logloss(labels[:18], logits[:18]))
  with pytest.raises(ValueError, match="no predictions were collected"):
    metrics.EvalAccumulator().compute()
