"""A seeded synthetic multimodal CTR problem with planted structure.

Items have latent topic vectors; each modality's frozen vector is a noisy random projection of
the item's latent vector; users have topic interests. A click's logit is

  topic_weight * cos(latent(target), mean latent(user's earlier clicks))   (the multimodal signal)
  + popularity_weight * popularity(target) + user_bias_weight * bias(user) + noise

so the modalities carry information the IDs alone learn slowly, and a share of items are cold:
they only occur in validation and test events, where only their side fields and modality
vectors describe them.

With `content_weight` w > 0 (the content-signal problem) each item also has two hidden content
scalars x, y ~ N(0, 1), x written into the first modality's vector and y into the second's
(each along a fixed random direction), and the logit gains

  w * s(user) * x(target) * y(target)        s = +1 for the lower half of the user groups, else -1

a cross-modal product that no cosine between the target's and the history's vectors expresses
(it is a property of the target alone, read from both modalities at once): a model gains from
it only by learning a function of the item's content (EM3's content tower), or per item id
from the item's own clicks (never for cold items).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dmf_jax.core import hashing
from dmf_jax.data import format as data_format
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
  # Hashed id tables (0: one row per id): user ids and item ids hashed into that many rows.
  user_id_hash_buckets: int = 0
  item_id_hash_buckets: int = 0
  num_hashes: int = 1
  # How often each item is shown: 'uniform' (every item alike) or 'zipf:A' (exposure
  # proportional to 1 / rank^A, the ranks a seeded permutation of the items; real catalogs are
  # skewed: MovieLens-100K's slope is 0.67 over its top half, large catalogs near 1). Draws
  # within a topic follow the same weights.
  item_exposure: str = "uniform"
  # > 0: the clicks also follow the cross-modal content term (module docstring); needs two
  # modalities. 0 leaves every draw of the problem as it was.
  content_weight: float = 0.0

  def __post_init__(self):
    for field in ("num_users", "num_items", "num_topics", "latent_dim", "events_per_user",
                  "seq_len", "num_categories", "max_tags", "num_tags", "num_user_groups"):
      if int(getattr(self, field)) < 1:
        raise ValueError(f"synthetic config: {field} must be >= 1, got {getattr(self, field)}")
    if not 0.0 <= self.cold_item_fraction < 1.0:
      raise ValueError("synthetic config: cold_item_fraction must be in [0, 1)")
    zipf_exponent_of(self.item_exposure)  # validates
    if self.content_weight < 0 or (self.content_weight and len(self.modalities) < 2):
      raise ValueError("synthetic config: content_weight must be >= 0, and > 0 only with two "
                       f"modalities (got {self.content_weight} with {len(self.modalities)})")


def zipf_exponent_of(exposure: str) -> float | None:
  """'uniform' -> None; 'zipf:A' -> A (> 0); anything else is an error naming the value."""
  if exposure == "uniform":
    return None
  kind, _, value = exposure.partition(":")
  try:
    exponent = float(value)
  except ValueError:
    exponent = -1.0
  if kind != "zipf" or not exponent > 0:
    raise ValueError(f"item exposure {exposure!r} is not 'uniform' or 'zipf:A' with A > 0")
  return exponent


def exposure_weights(exposure: str, num_items: int, seed: int) -> np.ndarray | None:
  """Each item's relative exposure, float64 [num_items] (None: uniform): 1 / rank^A with the
  ranks 1..V a permutation seeded by `seed` (its own stream: the uniform draws are unchanged)."""
  exponent = zipf_exponent_of(exposure)
  if exponent is None:
    return None
  rank = np.random.default_rng((seed, 11)).permutation(num_items) + 1
  return rank.astype(np.float64) ** -exponent


def fit_zipf_exponent(counts: np.ndarray, top: float = 0.5) -> float:
  """The rank-frequency slope A of exposure counts (count ~ rank^-A): least squares of
  log(count) on log(rank) over the `top` fraction of the items by count (the tail of
  single-digit counts is flat by discreteness)."""
  counts = np.sort(np.asarray(counts, np.float64))[::-1]
  counts = counts[:max(2, int(len(counts) * top))]
  counts = counts[counts > 0]
  rank = np.arange(1, len(counts) + 1, dtype=np.float64)
  slope = np.polyfit(np.log(rank), np.log(counts), 1)[0]
  return float(-slope)


class _WeightedPools:
  """Draws from fixed pools of item ids with the items' exposure weights (inverse CDF)."""

  def __init__(self, weights: np.ndarray):
    self.weights = weights
    self.cdfs: dict[int, np.ndarray] = {}

  def draw(self, rng, pool: np.ndarray) -> int:
    cdf = self.cdfs.get(id(pool))
    if cdf is None:
      cdf = self.cdfs[id(pool)] = np.cumsum(self.weights[pool])
    return int(pool[min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"),
                        len(pool) - 1)])


def schema_for(config: SyntheticConfig, item_id_dim: int = 16, field_dim: int = 8) -> FeatureSchema:
  if config.user_id_hash_buckets:
    user_id = FeatureSpec.hashed_field("user_id", config.user_id_hash_buckets, item_id_dim,
                                       num_hashes=config.num_hashes)
  else:
    user_id = FeatureSpec("user_id", config.num_users, item_id_dim)
  return FeatureSchema(
      num_items=config.num_items,
      item_id_dim=item_id_dim,
      seq_len=config.seq_len,
      item_features=(
          FeatureSpec("category", config.num_categories, field_dim),
          FeatureSpec("tags", config.num_tags, field_dim, max_values=config.max_tags),
      ),
      user_features=(user_id, FeatureSpec("group", config.num_user_groups, field_dim)),
      modalities=tuple(ModalitySpec(name, dim) for name, dim, _ in config.modalities),
      item_id_hash_buckets=config.item_id_hash_buckets,
      item_id_num_hashes=config.num_hashes if config.item_id_hash_buckets else 1,
  )


def user_table(config: SyntheticConfig, group: np.ndarray) -> dict[str, np.ndarray]:
  """The user fields by user index: user_id (the index, or its raw id when hashed), group."""
  ids = np.arange(config.num_users)
  return {"user_id": hashing.raw_ids(ids) if config.user_id_hash_buckets else ids.astype(np.int32),
          "group": group}


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class ContentSignal:
  """The hidden content scalars x, y [num_items] of the content-signal problem and the
  directions that write them into the first two modalities (their own random stream, so the
  rest of the problem is drawn as without them)."""

  x: np.ndarray
  y: np.ndarray
  directions: tuple[np.ndarray, np.ndarray]

  @classmethod
  def draw(cls, config: SyntheticConfig) -> "ContentSignal | None":
    if not config.content_weight:
      return None
    rng = np.random.default_rng((config.seed, 31))
    x, y = rng.standard_normal((2, config.num_items))
    # unit directions scaled to the latent part's norm, 0.25 sqrt(dim) (module docstring)
    directions = tuple(_unit(rng.normal(size=dim)) * 0.25 * np.sqrt(dim)
                       for _, dim, _ in config.modalities[:2])
    return cls(x, y, directions)

  def write(self, modalities: dict[str, np.ndarray], config: SyntheticConfig) -> None:
    """Adds x and y along their directions to the first two modalities' vectors."""
    for (name, _, _), value, direction in zip(config.modalities[:2], (self.x, self.y),
                                              self.directions):
      modalities[name] += (value[:, None] * direction).astype(np.float32)

  def term(self, config: SyntheticConfig, group: np.ndarray, item: np.ndarray) -> np.ndarray:
    """w * s(user) * x * y per event (user groups `group`, target items `item`)."""
    sign = np.where(np.asarray(group) < config.num_user_groups // 2, 1.0, -1.0)
    return config.content_weight * sign * self.x[item] * self.y[item]


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
  content = ContentSignal.draw(config)
  if content is not None:
    content.write(modalities, config)
  raw = hashing.raw_ids(range(n_items)) if config.item_id_hash_buckets else None
  catalog = ItemCatalog(side={"category": category, "tags": tags}, modalities=modalities,
                        raw_ids=raw)

  interests = rng.integers(0, config.num_topics, (n_users, 2))
  bias = rng.normal(size=n_users)
  group = (np.argsort(np.argsort(bias)) * config.num_user_groups // n_users).astype(np.int32)
  users = user_table(config, group)

  weights = exposure_weights(config.item_exposure, n_items, config.seed)
  weighted = _WeightedPools(weights) if weights is not None else None
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
      it = int(rng.choice(pool)) if weighted is None else weighted.draw(rng, pool)
      if clicked:
        ref = _unit(latent[clicked[-config.seq_len:]].mean(axis=0))
      else:
        ref = centroids[interests[u, 0]]
      logit = (config.topic_weight * float(latent[it] @ ref)
               + config.popularity_weight * popularity[it]
               + config.user_bias_weight * bias[u]
               + config.noise * rng.normal() - offset)
      if content is not None:
        logit += float(content.term(config, group[u], it))
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
  schema = schema_for(config)
  out = {k: sequences.to_batch(v) for k, v in splits.items()}
  for batch in out.values():  # what the record parser makes of them: hashed fields as rows
    batch.update(data_format.model_user_fields(schema, batch, len(batch["label"])))
  return schema, catalog, out


# ---------------------------------------------------------------------------------------------
# Large problems: generated in user chunks, vectorised, in bounded memory
# ---------------------------------------------------------------------------------------------
#
# `generate` above walks every event in Python (the click logit depends on the running mean of
# the user's earlier clicks). At millions of users that is hours; `StreamedProblem` draws the
# same kind of problem vectorised, one chunk of users at a time from its own seed, so any chunk
# can be regenerated independently and memory does not grow with the number of impressions.
# The one simplification: the click logit's reference is the mean of the user's two interest
# centroids, not the running mean of its earlier clicks.


@dataclasses.dataclass(frozen=True)
class Window:
  """A window of a problem (the two-window incremental-training experiment): the first
  `users` users and `items` items (0: all), the events before timestamp `end` (0: all);
  splits and histories are those of the kept events."""

  users: int = 0
  items: int = 0
  end: int = 0


class StreamedProblem:
  """Items once (latent vectors, catalog), users and events per chunk of `chunk_users`."""

  def __init__(self, config: SyntheticConfig, chunk_users: int = 50_000,
               window: Window = Window()):
    self.config = config
    self.chunk_users = chunk_users
    self.window = window
    self.num_users = min(window.users or config.num_users, config.num_users)
    self.num_items = min(window.items or config.num_items, config.num_items)
    rng = np.random.default_rng((config.seed, 0))
    n_items, dim = config.num_items, config.latent_dim
    self.centroids = _unit(rng.normal(size=(config.num_topics, dim))).astype(np.float32)
    self.topic = rng.integers(0, config.num_topics, n_items).astype(np.int32)
    noise = rng.standard_normal((n_items, dim), dtype=np.float32)
    self.latent = _unit(self.centroids[self.topic] + np.float32(0.35) * noise)
    self.popularity = rng.standard_normal(n_items, dtype=np.float32)
    self.cold = rng.random(n_items, dtype=np.float32) < config.cold_item_fraction
    order = np.lexsort((np.arange(n_items), self.topic))  # items grouped by topic
    self.by_topic = order
    self.topic_start = np.searchsorted(self.topic[order], np.arange(config.num_topics + 1))
    warm = order[~self.cold[order]]
    self.warm_by_topic = warm
    self.warm_topic_start = np.searchsorted(self.topic[warm], np.arange(config.num_topics + 1))
    self.warm_items = np.flatnonzero(~self.cold)
    self.offset = float(np.quantile(self.popularity, 0.5)) * config.popularity_weight + 1.0
    self.content = ContentSignal.draw(config)
    # Zipf exposure: cumulative weights along each array that draws index (inverse CDF).
    weights = exposure_weights(config.item_exposure, n_items, config.seed)
    self.cdf = None if weights is None else {
        "by_topic": np.cumsum(weights[self.by_topic]),
        "warm_by_topic": np.cumsum(weights[self.warm_by_topic]),
        "items": np.cumsum(weights), "warm_items": np.cumsum(weights[self.warm_items])}

  @property
  def num_chunks(self) -> int:
    return -(-self.num_users // self.chunk_users)

  def schema(self) -> FeatureSchema:
    """The window's schema (vocabulary sizes of its users and items)."""
    return schema_for(dataclasses.replace(self.config, num_users=self.num_users,
                                          num_items=self.num_items))

  def catalog(self) -> ItemCatalog:
    """Side fields and modality vectors (projections of the latent vectors plus noise),
    computed in item chunks in float32."""
    config, n = self.config, self.config.num_items
    rng = np.random.default_rng((config.seed, 1))
    category = np.where(rng.random(n) < 0.5, self.topic % config.num_categories,
                        rng.integers(0, config.num_categories, n)).astype(np.int32)
    n_tags = rng.integers(1, config.max_tags + 1, n)
    tags = rng.integers(0, config.num_tags, (n, config.max_tags)).astype(np.int32)
    tags[np.arange(config.max_tags)[None, :] >= n_tags[:, None]] = -1
    modalities = {}
    for name, dim, noise in config.modalities:
      proj = (rng.normal(size=(config.latent_dim, dim)) / np.sqrt(config.latent_dim)
              ).astype(np.float32)
      out = np.empty((n, dim), np.float32)
      scale = np.float32(noise * np.sqrt(config.latent_dim) / np.sqrt(dim))
      for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = self.latent[start:stop] @ proj
        out[start:stop] += scale * rng.standard_normal((stop - start, dim), dtype=np.float32)
      modalities[name] = out
    if self.content is not None:
      self.content.write(modalities, config)
    raw = hashing.raw_ids(range(n)) if config.item_id_hash_buckets else None
    catalog = ItemCatalog({"category": category, "tags": tags}, modalities, raw)
    if self.num_items < n:
      keep = slice(0, self.num_items)
      catalog = ItemCatalog({k: v[keep] for k, v in catalog.side.items()},
                            {k: v[keep] for k, v in catalog.modalities.items()},
                            None if raw is None else raw[keep])
    return catalog

  def chunk(self, index: int) -> dict[str, np.ndarray]:
    """Events of users [index * chunk_users, ...) ordered by (user, timestamp, item), with
    their split (0/1/2), strict histories and user fields (`examples_from_events` rows plus
    'split')."""
    config = self.config
    rng = np.random.default_rng((config.seed, 2, index))
    first = index * self.chunk_users
    users = np.arange(first, min(self.num_users, first + self.chunk_users))
    interests = rng.integers(0, config.num_topics, (len(users), 2))
    bias = rng.normal(size=len(users)).astype(np.float32)
    group = np.clip(((bias + 3.0) / 6.0 * config.num_user_groups).astype(np.int32), 0,
                    config.num_user_groups - 1)
    counts = np.maximum(5, rng.poisson(config.events_per_user, len(users)))
    user = np.repeat(np.arange(len(users)), counts)  # local user index per event
    start = np.r_[0, np.cumsum(counts)[:-1]]
    split = sequences.per_user_split(user)  # of the whole problem: decides cold-item draws
    item = self._draw_items(rng, interests, user, split)
    ref = _unit(self.centroids[interests[:, 0]] + self.centroids[interests[:, 1]])[user]
    logit = (config.topic_weight * np.einsum("nd,nd->n", self.latent[item], ref)
             + config.popularity_weight * self.popularity[item]
             + config.user_bias_weight * bias[user]
             + config.noise * rng.standard_normal(len(user), dtype=np.float32) - self.offset)
    if self.content is not None:
      logit = logit + self.content.term(config, group[user], item).astype(np.float32)
    label = (rng.random(len(user)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int32)
    gaps = rng.integers(1, 1000, len(user))
    elapsed = np.cumsum(gaps)
    ts = elapsed - np.repeat(elapsed[start] - gaps[start], counts) + 10_000  # per user
    order = np.lexsort((item, ts, user))  # already by user; ties of (ts) by item
    user, item, ts, label, split = user[order], item[order], ts[order], label[order], split[order]
    if self.window != Window():
      keep = (item < self.num_items) & ((ts < self.window.end) if self.window.end else True)
      user, item, ts, label = user[keep], item[keep], ts[keep], label[keep]
      split = sequences.per_user_split(user)
    hist, hist_len = sequences.strict_histories(user, item, ts, label, config.seq_len)
    user_ids = (hashing.raw_ids(users.tolist()) if config.user_id_hash_buckets
                else users.astype(np.int32))
    return {"user/user_id": user_ids[user], "user/group": group[user], "item_id": item.astype(np.int32),
            "timestamp": ts.astype(np.int64), "label": label.astype(np.float32),
            "hist_item_id": hist, "hist_len": hist_len, "split": split}

  def _draw_items(self, rng, interests, user, split):
    """Per event: an item of one of the user's two topics (interest_share of the time) or any
    item; cold items only in validation and test events."""
    config, n = self.config, len(user)
    held_out = split > 0
    topic = interests[user, rng.integers(0, 2, n)]
    lo = np.where(held_out, self.topic_start[topic], self.warm_topic_start[topic])
    hi = np.where(held_out, self.topic_start[topic + 1], self.warm_topic_start[topic + 1])
    if self.cdf is None:
      pick = lo + (rng.random(n) * np.maximum(hi - lo, 1)).astype(np.int64)
    else:  # by weight within [lo, hi) of the held-out or warm topic-ordered array
      u, pick = rng.random(n), np.empty(n, np.int64)
      for rows, cdf in ((held_out, self.cdf["by_topic"]), (~held_out, self.cdf["warm_by_topic"])):
        pick[rows] = _weighted_pick(cdf, lo[rows], hi[rows], u[rows])
    by_topic = np.where(held_out, self.by_topic[np.minimum(pick, len(self.by_topic) - 1)],
                        self.warm_by_topic[np.minimum(pick, len(self.warm_by_topic) - 1)])
    if self.cdf is None:
      anywhere = np.where(held_out, rng.integers(0, config.num_items, n),
                          self.warm_items[rng.integers(0, len(self.warm_items), n)])
    else:
      every = _weighted_pick(self.cdf["items"], 0, config.num_items, rng.random(n))
      warm = _weighted_pick(self.cdf["warm_items"], 0, len(self.warm_items), rng.random(n))
      anywhere = np.where(held_out, every, self.warm_items[warm])
    use_topic = (rng.random(n) < config.interest_share) & (hi > lo)
    return np.where(use_topic, by_topic, anywhere).astype(np.int32)


def _weighted_pick(cdf: np.ndarray, lo, hi, u: np.ndarray) -> np.ndarray:
  """Indices in [lo, hi) drawn by weight: cdf the cumulative weights of the whole array, u
  uniform [n] (empty ranges give lo)."""
  lo, hi = np.broadcast_to(lo, u.shape), np.broadcast_to(hi, u.shape)
  if not len(cdf):
    return lo.astype(np.int64)
  start = np.where(lo > 0, cdf[np.clip(lo - 1, 0, len(cdf) - 1)], 0.0)
  end = np.where(hi > 0, cdf[np.clip(hi - 1, 0, len(cdf) - 1)], 0.0)
  pick = np.searchsorted(cdf, start + u * (end - start), side="right")
  return np.clip(pick, lo, np.maximum(hi - 1, lo))
