"""Shared base of the CTR dataset builders: one record per impression, side files beside them."""

from __future__ import annotations

import abc

import numpy as np
import tensorflow_datasets as tfds

from etils import epath

from dmf_jax.data import format as data_format
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.data import sources
from dmf_jax.core.schema import FeatureSchema


class CtrBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """Subclasses implement `_prepare`.

  `_prepare` returns (schema, catalog, {split: examples}) with examples as produced by
  `dmf_jax.data.sequences.examples_from_events`, or (streamed builds, bounded memory) a
  callable yielding them chunk by chunk. The base writes the schema, the catalog and the
  build record (`sources.BUILD_FILE`: fingerprints of `source_files` and `build_parameters`)
  into the (still incomplete) dataset directory, then yields the records; TFDS moves
  everything into place only when the whole build succeeded.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    """Nothing is downloaded (data is generated or read from `manual_dir`): no checksums file."""
    return None

  def __init__(self, *args, file_format="array_record", **kwargs):
    super().__init__(*args, file_format=file_format, **kwargs)

  def source_files(self, manual_dir: epath.Path | None) -> dict[str, epath.Path]:
    """The raw files a build reads, by role (fingerprinted into the build record)."""
    del manual_dir
    return {}

  def build_parameters(self) -> dict:
    """What else determines the build's content (e.g. a generator's settings)."""
    return {}

  @abc.abstractmethod
  def _prepare(self, dl_manager) -> tuple[FeatureSchema, ItemCatalog, dict]:
    """Reads the raw data and returns (schema, catalog, examples per split)."""

  def _info(self) -> tfds.core.DatasetInfo:
    # Streamed builds write records in generation order (the training pipeline shuffles
    # anyway); TFDS's shuffle would hold or spill every record once more.
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=data_format.example_features(),
        disable_shuffling=bool(getattr(self.builder_config, "streamed", False)),
    )

  def _split_generators(self, dl_manager):
    manual_dir = epath.Path(dl_manager.manual_dir) if self.MANUAL_DOWNLOAD_INSTRUCTIONS else None
    record = sources.build_record(
        self.name, self.builder_config.name if self.builder_config else None, str(self.version),
        self.source_files(manual_dir), self.build_parameters())
    schema, catalog, splits = self._prepare(dl_manager)
    data_format.write_side_files(self.data_path, schema, catalog)
    sources.write_build_record(self.data_path, record)
    return {name: self._generate_examples(schema, rows) for name, rows in splits.items()}

  def _generate_examples(self, schema: FeatureSchema, rows):
    """rows: one dict of a split's examples, or (a streamed build) a callable returning an
    iterator of such dicts, chunk by chunk."""
    key = 0
    for chunk in (rows() if callable(rows) else [rows]):
      for i in range(len(chunk["label"])):
        length = int(chunk["hist_len"][i])
        yield key, {
            "user_features": data_format.pack_user_features(schema, chunk, i),
            "item_id": int(chunk["item_id"][i]),
            "timestamp": int(chunk["timestamp"][i]),
            "hist_item_id": np.ascontiguousarray(chunk["hist_item_id"][i, :length], np.int32),
            "label": float(chunk["label"][i]),
        }
        key += 1
