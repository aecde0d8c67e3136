"""Grain input pipelines over built datasets: shuffled training batches and padded eval batches.

Training: per-process shard of the record indices -> seeded shuffle (a new permutation every
epoch, from (seed, epoch)) -> batches of indices (drop_remainder, static shapes) -> read + parse +
pad/mask each batch -> to_iter_dataset -> prefetch (threads, or worker processes with
`worker_count`).

Two choices make it fast on 2 cores (BUILD_NOTES.md): the shuffled index batches come from a
random-access source that slices a numpy permutation (Grain's per-element shuffle/repeat/batch
layers cost ~10 ms per 512 examples here), and records are read and parsed per batch (one bulk
ArrayRecord read, one vectorized pad/mask) rather than per record.

Evaluation: every process yields the same number of batches (collective steps stay in lockstep);
the tail is padded with copies of a real row whose weight is 0, so no example is lost or counted
twice.

Iterators are Grain `DatasetIterator`s: `get_state()` / `set_state()` resume at the exact next
batch (checkpointed with the model by the training loop).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import grain
import numpy as np

from dmf_jax.data_format import RawRecords, RecordParser

PAD_INDEX = -1


@dataclasses.dataclass(frozen=True)
class ShardInfo:
  """This process's slice of the data: examples index::count."""

  index: int = 0
  count: int = 1

  def __post_init__(self):
    if not 0 <= self.index < self.count:
      raise ValueError(f"shard index {self.index} is not in [0, {self.count})")

  @classmethod
  def from_jax(cls) -> "ShardInfo":
    import jax  # pylint: disable=g-import-not-at-top

    return cls(jax.process_index(), jax.process_count())


class ReadBatch(grain.transforms.Map):
  """int64 [B] record indices (PAD_INDEX for padding) -> a parsed, padded batch."""

  def __init__(self, records: RawRecords, parser: RecordParser):
    self._records = records
    self._parser = parser

  def map(self, indices):
    indices = np.asarray(indices)
    real = indices != PAD_INDEX
    if not real.any():
      raise ValueError("ReadBatch: a batch with no real example")
    safe = np.where(real, indices, indices[real][0])
    batch = self._parser(self._records.read(safe.tolist()))
    batch["weight"] = batch["weight"] * real
    return batch


def _shard_indices(num_records: int, shard: ShardInfo) -> np.ndarray:
  if num_records == 0:
    raise ValueError("the split has no records")
  return np.arange(shard.index, num_records, shard.count, dtype=np.int64)


class ShuffledBatches:
  """Random-access source: item k is batch k of the epoch-long shuffled sequence of `indices`.

  Epoch e uses the permutation of np.random.default_rng((seed, e)); the last partial batch of
  each epoch is dropped. `num_epochs=None` gives an (effectively) endless source.
  """

  ENDLESS_EPOCHS = 1 << 40

  def __init__(self, indices: np.ndarray, batch_size: int, seed: int, num_epochs: int | None):
    self._indices = indices
    self._batch_size = batch_size
    self._seed = seed
    self._per_epoch = len(indices) // batch_size
    self._epochs = self.ENDLESS_EPOCHS if num_epochs is None else num_epochs

  def __len__(self) -> int:
    return self._per_epoch * self._epochs

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self._seed, epoch)).permutation(len(self._indices))

  def __getitem__(self, k: int) -> np.ndarray:
    if not 0 <= k < len(self):
      raise IndexError(k)
    epoch, b = divmod(int(k), self._per_epoch)
    return self._indices[self._permutation(epoch)[b * self._batch_size:(b + 1) * self._batch_size]]


def train_dataset(
    records: RawRecords,
    parser: RecordParser,
    *,
    batch_size: int,
    seed: int,
    shard: ShardInfo = ShardInfo(),
    num_epochs: int | None = None,
) -> grain.MapDataset:
  """Shuffled full batches of this process's shard; `num_epochs=None` repeats forever."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  indices = _shard_indices(len(records), shard)
  if len(indices) < batch_size:
    raise ValueError(f"shard of {len(indices)} examples is smaller than one batch of {batch_size}")
  source = ShuffledBatches(indices, batch_size, seed, num_epochs)
  return grain.MapDataset.source(source).map(ReadBatch(records, parser))


def eval_num_batches(num_records: int, batch_size: int, shard_count: int = 1) -> int:
  """Batches each process yields so that every process runs the same number of steps."""
  return max(1, math.ceil(math.ceil(num_records / shard_count) / batch_size))


def eval_dataset(
    records: RawRecords,
    parser: RecordParser,
    *,
    batch_size: int,
    shard: ShardInfo = ShardInfo(),
) -> grain.MapDataset:
  """All of this shard's examples in order, padded to full batches with weight-0 rows."""
  shard_indices = _shard_indices(len(records), shard)
  steps = eval_num_batches(len(records), batch_size, shard.count)
  indices = np.full(steps * batch_size, PAD_INDEX, np.int64)
  indices[:len(shard_indices)] = shard_indices
  index_ds = grain.MapDataset.source(indices.reshape(steps, batch_size))
  return index_ds.map(ReadBatch(records, parser))


def to_iterator(
    ds: grain.MapDataset, *, worker_count: int = 0, prefetch: int = 4
) -> grain.DatasetIterator:
  """A checkpointable iterator; `worker_count > 0` parses in that many worker processes.

  Worker processes need absl flags parsed (run under `app.run`); tests use 0.
  """
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)
