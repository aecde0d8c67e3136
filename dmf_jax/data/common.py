"""Shared base of the CTR dataset builders: one record per impression, side files beside them."""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds

from etils import epath

from dmf_jax.data import format as data_format
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.data import sources
from dmf_jax.core.schema import FeatureSchema

SCRATCH_DIR = "scratch"  # in the build's (incomplete) folder; removed once the records exist


@dataclasses.dataclass(frozen=True)
class Parts:
  """A split's examples as `count` independent parts (a streamed build).

  rows(p): part p's examples, a dict as from `sequences.examples_from_events`.
  offsets: each part's first key, so that keys equal those of one sequential pass (builds
  that TFDS shuffles by key); None: key (p << 32) + i (ordered builds, `disable_shuffling`,
  where only the keys' order matters). Parts run in order locally, or in parallel as an
  Apache Beam pipeline (`CtrBuilder(beam=True)`) with the same keys, hence the same records
  in the same order.
  """

  count: int
  rows: Callable[[int], dict]
  offsets: tuple[int, ...] | None = None

  def key(self, part: int, index: int) -> int:
    return (self.offsets[part] if self.offsets is not None else part << 32) + index


def examples(schema: FeatureSchema, rows: dict):
  """The TFDS examples of a dict of rows, in order."""
  for i in range(len(rows["label"])):
    length = int(rows["hist_len"][i])
    yield {
        "user_features": data_format.pack_user_features(schema, rows, i),
        "item_id": int(rows["item_id"][i]),
        "timestamp": int(rows["timestamp"][i]),
        "hist_item_id": np.ascontiguousarray(rows["hist_item_id"][i, :length], np.int32),
        "label": float(rows["label"][i]),
    }


def part_examples(part: int, schema: FeatureSchema, parts: Parts):
  """(key, example) of one part (a Beam worker's unit of work)."""
  for i, example in enumerate(examples(schema, parts.rows(part))):
    yield parts.key(part, i), example


class CtrBuilder(tfds.core.GeneratorBasedBuilder, abc.ABC):
  """Subclasses implement `_prepare`.

  `_prepare` returns (schema, catalog, {split: examples}) with examples as produced by
  `dmf_jax.data.sequences.examples_from_events`, or (streamed builds, bounded memory) as
  `Parts`. The base writes the schema, the catalog and the build record (`sources.BUILD_FILE`:
  fingerprints of `source_files` and `build_parameters`) into the (still incomplete) dataset
  directory, then yields the records; TFDS moves everything into place only when the whole
  build succeeded. `beam=True`: the records are made and written by an Apache Beam pipeline
  (TFDS's Beam support; the runner and options come from the DownloadConfig), with exactly
  the records of the local build. Scratch files (`scratch_dir`) live in the incomplete folder
  and are removed before TFDS moves it into place.
  """

  partition_events = 500_000  # streamed builds: events per part held in memory at once

  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls):
    """Nothing is downloaded (data is generated or read from `manual_dir`): no checksums file."""
    return None

  def __init__(self, *args, file_format="array_record", beam: bool = False, **kwargs):
    super().__init__(*args, file_format=file_format, **kwargs)
    self.beam = beam

  def scratch_dir(self) -> epath.Path:
    """A folder for intermediate files of the build in progress."""
    path = epath.Path(self.data_path) / SCRATCH_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path

  def _download_and_prepare(self, dl_manager, download_config=None):
    try:
      return super()._download_and_prepare(dl_manager, download_config)
    finally:
      scratch = epath.Path(self.data_path) / SCRATCH_DIR
      if scratch.exists():
        scratch.rmtree()

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
    if getattr(self, "vocabularies", None) is not None:  # set by _prepare (byod_ctr)
      data_format.write_vocabularies(self.data_path, self.vocabularies)
    sources.write_build_record(self.data_path, record)
    return {name: self._generate_examples(schema, rows) for name, rows in splits.items()}

  def _generate_examples(self, schema: FeatureSchema, rows):
    """rows: one dict of a split's examples, or `Parts`. Locally a generator of (key,
    example); with `beam`, a PTransform making the same (key, example) pairs part by part."""
    if self.beam:
      beam = tfds.core.lazy_imports.apache_beam
      parts = rows if isinstance(rows, Parts) else Parts(1, _Constant(rows), (0,))
      return (beam.Create(list(range(parts.count)))
              | beam.Reshuffle()  # spread the parts over the workers
              | beam.FlatMap(part_examples, schema, parts))
    return self._local_examples(schema, rows)

  def _local_examples(self, schema: FeatureSchema, rows):
    if not isinstance(rows, Parts):
      yield from enumerate(examples(schema, rows))
      return
    key = 0
    for part in range(rows.count):
      for example in examples(schema, rows.rows(part)):
        yield key, example
        key += 1


@dataclasses.dataclass(frozen=True)
class _Constant:
  """Parts of one in-memory dict (a non-streamed build run as a Beam pipeline)."""

  rows: dict

  def __call__(self, part: int) -> dict:
    del part
    return self.rows
