"""Numeric fields at build time: fitting their normalisation on the training split only.

A builder holds each numeric field's raw values per entity (item or user, NaN = missing) and
counts each entity's training examples (`train_counts`); `fit` then computes the statistics
of the chosen normalisation (`core.schema.NumericSpec`) over the training examples: every
training example contributes its target item's (or its user's) value, so validation and test
never inform them. A field with no training value keeps center 0, scale 1 (z = t(x)) and no
boundaries (a single bucket).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dmf_jax.core.schema import NumericSpec
from dmf_jax.data import sequences


def train_counts(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, num_users: int,
                 num_items: int, split: np.ndarray | str = "per_user"
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Training examples per user and per item (int64 [num_users], [num_items]) of the events
  (any order), with `split` as in `sequences.examples_from_events`: every event is one example,
  and its split is the one that function gives it."""
  if isinstance(split, str) and split == "per_user":
    order = sequences.order_events(user, item, timestamp)
    train = np.zeros(len(user), bool)
    train[order] = sequences.per_user_split(user[order]) == 0
  elif isinstance(split, str):
    train = sequences.global_time_split(timestamp) == 0
  else:
    train = np.asarray(split) == 0
  return (np.bincount(user[train], minlength=num_users).astype(np.int64),
          np.bincount(item[train], minlength=num_items).astype(np.int64))


def _transform(spec: NumericSpec, x: np.ndarray) -> np.ndarray:
  if spec.normalization == "log1p":
    return np.sign(x) * np.log1p(np.abs(x))
  return x


def weighted_quantiles(values: np.ndarray, weights: np.ndarray, qs) -> np.ndarray:
  """The smallest value v with (weight of values <= v) >= q * total, per q (the inverse
  CDF of the weighted sample, as np.quantile(method='inverted_cdf') for unit weights)."""
  order = np.argsort(values, kind="stable")
  cum = np.cumsum(weights[order])
  index = np.searchsorted(cum, np.asarray(qs) * cum[-1], side="left")
  return values[order][np.minimum(index, len(values) - 1)]


def fit(spec: NumericSpec, values: np.ndarray, counts: np.ndarray) -> NumericSpec:
  """`spec` with its statistics fitted on the training examples: values float [n] per entity
  (NaN: missing), counts int [n] training examples per entity."""
  values = np.asarray(values, np.float64)
  weights = np.asarray(counts, np.float64)
  keep = ~np.isnan(values) & (weights > 0)
  if np.isinf(values[keep]).any():
    raise ValueError(f"numeric field {spec.name!r}: infinite values")
  x, w = values[keep], weights[keep]
  if not len(x):
    return dataclasses.replace(spec, center=0.0, scale=1.0, boundaries=())
  if spec.bucketized:
    qs = np.arange(1, spec.num_buckets) / spec.num_buckets
    bounds = np.unique(weighted_quantiles(x, w, qs)) if len(qs) else np.zeros(0)
    return dataclasses.replace(spec, center=0.0, scale=1.0,
                               boundaries=tuple(float(b) for b in bounds))
  if spec.normalization == "minmax":
    center, spread = float(x.min()), float(x.max() - x.min())
  else:
    t = _transform(spec, x)
    center = float(np.average(t, weights=w))
    spread = float(np.sqrt(np.average((t - center) ** 2, weights=w)))
  return dataclasses.replace(spec, center=center, scale=spread if spread > 0 else 1.0,
                             boundaries=())
