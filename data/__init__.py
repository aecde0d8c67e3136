"""TFDS dataset builders (ArrayRecord, no TensorFlow). Importing registers them with TFDS.

  generated_ctr      seeded synthetic data (configs: default, tiny)
  movielens_100k_mm  MovieLens-100K + TMDB text + posters (configs: text_image, text, ids)
  byod_ctr           your own files, described by dataset.json in manual_dir
"""

from __future__ import annotations

import tensorflow_datasets as tfds

from data.byod import ByodCtr
from data.generated import GeneratedCtr
from data.movielens_100k_mm.builder import Movielens100kMm
from dmf_jax import data_format

BUILDERS = {
    "generated_ctr": GeneratedCtr,
    "movielens_100k_mm": Movielens100kMm,
    "byod_ctr": ByodCtr,
}


def get_builder(name: str, config: str | None, data_dir: str) -> tfds.core.DatasetBuilder:
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(sorted(BUILDERS))}")
  cls = BUILDERS[name]
  valid = [c.name for c in cls.BUILDER_CONFIGS]
  if valid and config is not None and config not in valid:
    raise ValueError(f"dataset {name!r} has no config {config!r}; valid: {', '.join(valid)}")
  return cls(config=config, data_dir=data_dir) if valid else cls(data_dir=data_dir)


def prepare(
    name: str, config: str | None, data_dir: str, manual_dir: str | None = None
) -> data_format.BuiltDataset:
  """Builds the dataset if it is not built yet, then opens it for reading."""
  builder = get_builder(name, config, data_dir)
  if not builder.is_prepared():
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    builder.download_and_prepare(download_config=download_config)
  return data_format.load_built_dataset(builder)
