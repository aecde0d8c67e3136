"""generated_ctr: the seeded synthetic multimodal CTR dataset (planted structure, cold items).

The default config is the main job's data (builds in well under a minute on 2 cores); 'tiny' is
for tests. Any size: `GeneratedCtr(config=GeneratedConfig(name=..., synthetic=SyntheticConfig(...)))`.
"""

from __future__ import annotations

import dataclasses
import functools

import tensorflow_datasets as tfds

from dmf_jax.data.common import CtrBuilder, Parts
from dmf_jax.data import sequences
from dmf_jax.data import synthetic
from dmf_jax.data.synthetic import Window


@dataclasses.dataclass(kw_only=True)
class GeneratedConfig(tfds.core.BuilderConfig):
  """streamed: generate chunk by chunk (`synthetic.StreamedProblem`, vectorised, bounded
  memory) and write the records in that order, for problems of millions of users."""

  synthetic: synthetic.SyntheticConfig = dataclasses.field(
      default_factory=synthetic.SyntheticConfig
  )
  streamed: bool = False
  chunk_users: int = 50_000
  window: Window = Window()  # streamed only: a window of the problem


TINY = synthetic.SyntheticConfig(
    num_users=150, num_items=120, num_topics=4, latent_dim=8, events_per_user=24, seq_len=12,
    modalities=(("text", 8, 0.3), ("image", 12, 0.6)), num_categories=5, num_tags=6, seed=3,
)


# TINY with hashed user and item ids (two hashes each, fewer rows than ids): hashing tests.
TINY_HASHED = dataclasses.replace(TINY, user_id_hash_buckets=64, item_id_hash_buckets=64,
                                  num_hashes=2)


# A million items and users, ten million impressions, a 384-d text-like modality; user ids
# hashed (2^19 rows, two hashes). Built streamed (benchmark_scale).
LARGE = synthetic.SyntheticConfig(
    num_users=1_000_000, num_items=1_000_000, num_topics=64, latent_dim=16, events_per_user=10,
    seq_len=50, modalities=(("text", 384, 0.6),), num_categories=1000, max_tags=3,
    num_tags=5000, user_id_hash_buckets=1 << 19, num_hashes=2, seed=0, item_exposure="zipf:1.0",
)


# The two-window incremental-training experiment (experiments/two_windows.py): window 1 holds
# the first 14,000 users and 4,000 items and the events before t = 16,000 (about 60% of each
# user's); window 2 is all of it.
WINDOWS = synthetic.SyntheticConfig(num_users=20_000, num_items=5_000, events_per_user=20)


# The default problem over a catalog too large for an all-pairs similarity matrix.
ITEMS_10K = synthetic.SyntheticConfig(num_items=10_000)


# The content-signal problem (issue 31): clicks also follow a cross-modal product of hidden
# item content (`synthetic.ContentSignal`), which training a content tower end to end can learn
# and the frozen cosine cannot express; more items than the default (about 27 impressions per
# item), so per-id learning alone is slow.
CONTENT_SIGNAL = synthetic.SyntheticConfig(num_items=3_000, content_weight=2.0)


class GeneratedCtr(CtrBuilder):
  """Synthetic multimodal CTR data with planted topic structure (dmf_jax.data.synthetic)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      GeneratedConfig(name="default", description="Main-job size."),
      GeneratedConfig(name="tiny", description="Tests.", synthetic=TINY),
      GeneratedConfig(name="tiny_hashed", description="Tests of hashed id tables.",
                      synthetic=TINY_HASHED),
      GeneratedConfig(name="content_signal", description="Clicks also follow a cross-modal "
                      "function of hidden item content (EM3's end-to-end case).",
                      synthetic=CONTENT_SIGNAL),
      GeneratedConfig(name="items10k", description="The default's dims over a 10,000-item "
                      "catalog (the large-catalog speed benchmark).", synthetic=ITEMS_10K),
      GeneratedConfig(name="tiny_streamed", description="Tests of streamed builds.",
                      synthetic=TINY_HASHED, streamed=True, chunk_users=40),
      GeneratedConfig(name="large", description="1M items, 1M users, ~10M impressions, "
                      "streamed (benchmark_scale).", synthetic=LARGE, streamed=True),
      GeneratedConfig(name="tiny_window1", description="Tests of warm starts.",
                      synthetic=TINY, streamed=True, chunk_users=60,
                      window=Window(users=90, items=100, end=16_000)),
      GeneratedConfig(name="tiny_window2", description="Tests of warm starts.",
                      synthetic=TINY, streamed=True, chunk_users=60),
      GeneratedConfig(name="window1", description="The first window of the two-window "
                      "incremental-training experiment.", synthetic=WINDOWS, streamed=True,
                      window=Window(users=14_000, items=4_000, end=16_000)),
      GeneratedConfig(name="window2", description="All of it: more users, items, events.",
                      synthetic=WINDOWS, streamed=True),
  ]

  def build_parameters(self) -> dict:
    params = {"synthetic": dataclasses.asdict(self.builder_config.synthetic)}
    for field, default in (("item_exposure", "uniform"), ("content_weight", 0.0)):
      if params["synthetic"][field] == default:  # builds before the option: the same records
        del params["synthetic"][field]
    if self.builder_config.streamed:
      params["streamed"] = {"chunk_users": self.builder_config.chunk_users,
                            "window": dataclasses.asdict(self.builder_config.window)}
    return params

  def _prepare(self, dl_manager):
    config = self.builder_config.synthetic
    if self.builder_config.streamed:
      problem = synthetic.StreamedProblem(config, self.builder_config.chunk_users,
                                          self.builder_config.window)
      splits = {name: Parts(problem.num_chunks, functools.partial(_chunk_split, problem, i))
                for i, name in enumerate(sequences.SPLITS)}
      return problem.schema(), problem.catalog(), splits
    catalog, users, events = synthetic.generate(config)
    splits = sequences.examples_from_events(
        events["user"], events["item"], events["timestamp"], events["label"], users,
        config.seq_len, split=events["split"],
    )
    return synthetic.schema_for(config), catalog, splits


def _chunk_split(problem: synthetic.StreamedProblem, split: int, chunk: int) -> dict:
  """One split's rows of one chunk of users."""
  rows = problem.chunk(chunk)
  keep = rows.pop("split") == split
  return {k: v[keep] for k, v in rows.items()}
