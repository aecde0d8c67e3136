"""A seeded synthetic multimodal CTR problem with planted structure.

Items have latent topic vectors; each modality's frozen vector is a noisy random projection of
the item's latent vector; users have topic interests. A click's logit is

  topic_weight * cos(latent(target), mean latent(user's earlier clicks))   (the multimodal signal)
  + popularity_weight * popularity(target) + user_bias_weight * bias(user) + noise

so the modalities carry information the IDs alone learn slowly, and a share of items are cold:
they only occur in validation and test events, where only their side fields and modality
vectors describe them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dmf_jax.data import sequences
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.core.schema import FeatureSchema, FeatureSpec, ModalitySpec


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Sizes and signal strengths of the generated problem."""

  num_users: int = 2000
  num_items: int = 1500
  num_topics: int = 12
  latent_dim: int = 16
  events_per_user: int = 40
  seq_len: int = 50
  modalities: tuple[tuple[str, int, float], ...] = (("text", 32, 0.6), ("image", 64, 1.0))
  num_categories: int = 24
  max_tags: int = 3
  num_tags: int = 40
  num_user_groups: int = 8
  cold_item_fraction: float = 0.1
  interest_share: float = 0.5
  topic_weight: float = 6.0
  popularity_weight: float = 0.8
  user_bias_weight: float = 0.5
  noise: float = 0.5
  seed: int = 0

  def __post_init__(self):
    for field in ("num_users", "num_items", "num_topics", "latent_dim", "events_per_user",
                  "seq_len", "num_categories", "max_tags", "num_tags", "num_user_groups"):
      if int(getattr(self, field)) < 1:
        raise ValueError(f"synthetic config: {field} must be >= 1, got {getattr(self, field)}")
    if not 0.0 <= self.cold_item_fraction < 1.0:
      raise ValueError("synthetic config: cold_item_fraction must be in [0, 1)")


def schema_for(config: SyntheticConfig, item_id_dim: int = 16, field_dim: int = 8) -> FeatureSchema:
  return FeatureSchema(
      num_items=config.num_items,
      item_id_dim=item_id_dim,
      seq_len=config.seq_len,
      item_features=(
          FeatureSpec("category", config.num_categories, field_dim),
          FeatureSpec("tags", config.num_tags, field_dim, max_values=config.max_tags),
      ),
      user_features=(
          FeatureSpec("user_id", config.num_users, item_id_dim),
          FeatureSpec("group", config.num_user_groups, field_dim),
      ),
      modalities=tuple(ModalitySpec(name, dim) for name, dim, _ in config.modalities),
  )


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(config: SyntheticConfig):
  """Returns (catalog, users, events): host arrays of the whole problem.

  users: dict of int32 [num_users] fields; events: dict with user, item, timestamp, label,
  split (0/1/2), ordered by (user, timestamp, item).
  """
  rng = np.random.default_rng(config.seed)
  n_items, n_users = config.num_items, config.num_users

  centroids = _unit(rng.normal(size=(config.num_topics, config.latent_dim)))
  topic = rng.integers(0, config.num_topics, n_items)
  latent = _unit(centroids[topic] + 0.35 * rng.normal(size=(n_items, config.latent_dim)))
  popularity = rng.normal(size=n_items)
  cold = rng.random(n_items) < config.cold_item_fraction

  category = np.where(
      rng.random(n_items) < 0.5, topic % config.num_categories,
      rng.integers(0, config.num_categories, n_items),
  ).astype(np.int32)
  n_tags = rng.integers(1, config.max_tags + 1, n_items)
  tags = rng.integers(0, config.num_tags, (n_items, config.max_tags)).astype(np.int32)
  tags[np.arange(config.max_tags)[None, :] >= n_tags[:, None]] = -1
  modalities = {}
  for name, dim, noise in config.modalities:
    proj = rng.normal(size=(config.latent_dim, dim)) / np.sqrt(config.latent_dim)
    modalities[name] = (latent @ proj + noise * rng.normal(size=(n_items, dim)) / np.sqrt(dim)
                        * np.sqrt(config.latent_dim)).astype(np.float32)
  catalog = ItemCatalog(side={"category": category, "tags": tags}, modalities=modalities)

  interests = rng.integers(0, config.num_topics, (n_users, 2))
  bias = rng.normal(size=n_users)
  group = (np.argsort(np.argsort(bias)) * config.num_user_groups // n_users).astype(np.int32)
  users = {"user_id": np.arange(n_users, dtype=np.int32), "group": group}

  warm_items, all_items = np.flatnonzero(~cold), np.arange(n_items)
  by_topic = [np.flatnonzero((topic == t) & ~cold) for t in range(config.num_topics)]
  by_topic_all = [np.flatnonzero(topic == t) for t in range(config.num_topics)]
  offset = np.quantile(popularity, 0.5) * config.popularity_weight + 1.0
  ev_user, ev_item, ev_ts, ev_label, ev_split = [], [], [], [], []
  for u in range(n_users):
    n = max(5, int(rng.poisson(config.events_per_user)))
    n_test, n_val = sequences.split_sizes(n)
    split = np.zeros(n, np.int8)
    split[n - n_test:] = 2
    split[n - n_test - n_val:n - n_test] = 1
    clicked: list[int] = []
    ts = np.cumsum(rng.integers(1, 1000, n)) + 10_000
    for i in range(n):
      pools = (by_topic_all if split[i] else by_topic)
      if rng.random() < config.interest_share:
        pool = pools[interests[u, rng.integers(0, 2)]]
      else:
        pool = all_items if split[i] else warm_items
      if len(pool) == 0:
        pool = all_items if split[i] else warm_items
      it = int(rng.choice(pool))
      if clicked:
        ref = _unit(latent[clicked[-config.seq_len:]].mean(axis=0))
      else:
        ref = centroids[interests[u, 0]]
      logit = (config.topic_weight * float(latent[it] @ ref)
               + config.popularity_weight * popularity[it]
               + config.user_bias_weight * bias[u]
               + config.noise * rng.normal() - offset)
      label = int(rng.random() < 1.0 / (1.0 + np.exp(-logit)))
      if label:
        clicked.append(it)
      ev_user.append(u); ev_item.append(it); ev_ts.append(ts[i])
      ev_label.append(label); ev_split.append(split[i])
  events = dict(
      user=np.asarray(ev_user, np.int32), item=np.asarray(ev_item, np.int32),
      timestamp=np.asarray(ev_ts, np.int64), label=np.asarray(ev_label, np.int32),
      split=np.asarray(ev_split, np.int8),
  )
  return catalog, users, events


def make_examples(config: SyntheticConfig):
  """(schema, catalog, {split: batch}) with each split as one in-memory batch of numpy arrays."""
  catalog, users, events = generate(config)
  splits = sequences.examples_from_events(
      events["user"], events["item"], events["timestamp"], events["label"], users,
      config.seq_len, split=events["split"],
  )
  return schema_for(config), catalog, {k: sequences.to_batch(v) for k, v in splits.items()}
