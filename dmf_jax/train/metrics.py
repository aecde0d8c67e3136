"""Exact evaluation metrics over a whole split, computed on the host.

AUC is the weighted Mann-Whitney statistic (ties count one half); GAUC averages per-user AUC
weighted by the user's impressions (sum of example weights), skipping users with one class;
logloss is the weighted mean binary cross-entropy. Rows of weight 0 (padding) never count.
`EvalAccumulator` gathers predictions batch by batch and merges across workers.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
  """Weighted ROC AUC; NaN when one class is absent."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  weights = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
  keep = weights > 0
  labels, scores, weights = labels[keep], scores[keep], weights[keep]
  w_pos, w_neg = weights[labels].sum(), weights[~labels].sum()
  if w_pos == 0 or w_neg == 0:
    return float("nan")
  uniq, group = np.unique(scores, return_inverse=True)
  pos = np.bincount(group, weights * labels, minlength=len(uniq))
  neg = np.bincount(group, weights * ~labels, minlength=len(uniq))
  neg_below = np.cumsum(neg) - neg
  return float(np.sum(pos * (neg_below + 0.5 * neg)) / (w_pos * w_neg))


def gauc(
    users: np.ndarray, labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
) -> float:
  """Impression-weighted mean of per-user AUC over users with both classes; NaN if none."""
  users = np.asarray(users)
  weights = np.ones(len(users)) if weights is None else np.asarray(weights, np.float64)
  order = np.argsort(users, kind="stable")
  users, labels, scores, weights = users[order], labels[order], scores[order], weights[order]
  starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
  ends = np.r_[starts[1:], len(users)]
  total, weight_sum = 0.0, 0.0
  for s, e in zip(starts, ends):
    value = auc(labels[s:e], scores[s:e], weights[s:e])
    if not np.isnan(value):
      w = weights[s:e].sum()
      total += w * value
      weight_sum += w
  return total / weight_sum if weight_sum > 0 else float("nan")


def logloss(labels: np.ndarray, logits: np.ndarray, weights: np.ndarray | None = None) -> float:
  """Weighted mean binary cross-entropy from logits (numerically stable)."""
  labels = np.asarray(labels, np.float64)
  logits = np.asarray(logits, np.float64)
  weights = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
  per = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
  return float(np.sum(per * weights) / np.sum(weights))


@dataclasses.dataclass
class EvalAccumulator:
  """Collects (user, label, logit, weight) rows; `merge` joins accumulators of several workers."""

  users: list = dataclasses.field(default_factory=list)
  labels: list = dataclasses.field(default_factory=list)
  logits: list = dataclasses.field(default_factory=list)
  weights: list = dataclasses.field(default_factory=list)

  def update(self, users, labels, logits, weights) -> None:
    keep = np.asarray(weights) > 0
    self.users.append(np.asarray(users)[keep])
    self.labels.append(np.asarray(labels)[keep])
    self.logits.append(np.asarray(logits, np.float64)[keep])
    self.weights.append(np.asarray(weights, np.float64)[keep])

  def merge(self, other: "EvalAccumulator") -> "EvalAccumulator":
    return EvalAccumulator(
        self.users + other.users, self.labels + other.labels,
        self.logits + other.logits, self.weights + other.weights,
    )

  @property
  def count(self) -> int:
    return int(sum(len(x) for x in self.labels))

  def compute(self) -> dict[str, float]:
    """{'auc', 'gauc', 'logloss', 'count'} over everything collected."""
    if not self.labels:
      raise ValueError("EvalAccumulator.compute: no predictions were collected")
    users, labels, logits, weights = (
        np.concatenate(x) for x in (self.users, self.labels, self.logits, self.weights)
    )
    return dict(
        auc=auc(labels, logits, weights),
        gauc=gauc(users, labels, logits, weights),
        logloss=logloss(labels, logits, weights),
        count=float(len(labels)),
    )
