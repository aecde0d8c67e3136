"""generated_ctr: the seeded synthetic multimodal CTR dataset (planted structure, cold items).

The default config is the main job's data (builds in well under a minute on 2 cores); 'tiny' is
for tests. Any size: `GeneratedCtr(config=GeneratedConfig(name=..., synthetic=SyntheticConfig(...)))`.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from dmf_jax.data.common import CtrBuilder
from dmf_jax.data import sequences
from dmf_jax.data import synthetic


@dataclasses.dataclass(kw_only=True)
class GeneratedConfig(tfds.core.BuilderConfig):
  synthetic: synthetic.SyntheticConfig = dataclasses.field(
      default_factory=synthetic.SyntheticConfig
  )


TINY = synthetic.SyntheticConfig(
    num_users=150, num_items=120, num_topics=4, latent_dim=8, events_per_user=24, seq_len=12,
    modalities=(("text", 8, 0.3), ("image", 12, 0.6)), num_categories=5, num_tags=6, seed=3,
)


# The default problem over a catalog too large for an all-pairs similarity matrix.
ITEMS_10K = synthetic.SyntheticConfig(num_items=10_000)


class GeneratedCtr(CtrBuilder):
  """Synthetic multimodal CTR data with planted topic structure (dmf_jax.data.synthetic)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      GeneratedConfig(name="default", description="Main-job size."),
      GeneratedConfig(name="tiny", description="Tests.", synthetic=TINY),
      GeneratedConfig(name="items10k", description="The default's dims over a 10,000-item "
                      "catalog (the large-catalog speed benchmark).", synthetic=ITEMS_10K),
  ]

  def build_parameters(self) -> dict:
    return {"synthetic": dataclasses.asdict(self.builder_config.synthetic)}

  def _prepare(self, dl_manager):
    config = self.builder_config.synthetic
    catalog, users, events = synthetic.generate(config)
    splits = sequences.examples_from_events(
        events["user"], events["item"], events["timestamp"], events["label"], users,
        config.seq_len, split=events["split"],
    )
    return synthetic.schema_for(config), catalog, splits
