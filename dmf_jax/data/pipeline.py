"""Grain input pipelines over built datasets: shuffled training batches and padded eval batches.

Training: seeded shuffle of the record indices (a new permutation every epoch, from
(seed, epoch)) -> global batches of indices (drop_remainder, static shapes) -> this process's rows
of each global batch -> read + parse + pad/mask -> to_iter_dataset -> prefetch (threads, or
worker processes with `worker_count`).

Multi-host: every process follows the same global order and reads only its own rows of each
global batch (rows p*b .. (p+1)*b of a global batch of P*b), so the global batches, and hence the
training trajectory, are those of a single-process run with the same global batch size.

Two choices make it fast on 2 cores (BUILD_NOTES.md): the shuffled index batches come from a
random-access source that slices a numpy permutation (Grain's per-element shuffle/repeat/batch
layers cost ~10 ms per 512 examples here), and records are read and parsed per batch (one bulk
ArrayRecord read, one vectorized pad/mask) rather than per record. Training splits that fit in
memory can be parsed once up front (`in_memory`), so later batches are numpy gathers.

Evaluation: the split in order, padded to whole global batches with copies of a real row whose
weight is 0 (no example lost or counted twice); each process reads its rows of every global
batch, so all processes run the same number of steps.

Iterators are Grain `DatasetIterator`s: `get_state()` / `set_state()` resume at the exact next
batch (checkpointed with the model by the training loop).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import grain
import numpy as np

from dmf_jax.core import catalog as catalog_lib
from dmf_jax.core import rows
from dmf_jax.data.format import RawRecords, RecordParser

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


class StreamedSplit:
  """Reads and parses the records of each batch when it is needed: indices -> batch."""

  def __init__(self, records: RawRecords, parser: RecordParser):
    self._records = records
    self._parser = parser

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return self._parser(self._records.read(indices.tolist()))


class ParsedSplit:
  """A split read and parsed once into memory (chunk by chunk): indices -> a slice of it.

  For splits that fit in memory (a few hundred bytes per record): every batch then costs a
  numpy gather instead of a read and a parse.
  """

  def __init__(self, records: RawRecords, parser: RecordParser, chunk: int = 8192):
    n = len(records)
    parts = [parser(records.read(range(i, min(i + chunk, n)))) for i in range(0, n, chunk)]
    self._arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[indices] for k, v in self._arrays.items()}


class ReadBatch(grain.transforms.Map):
  """int64 [B] record indices (PAD_INDEX for padding) -> a parsed, padded batch."""

  def __init__(self, split: StreamedSplit | ParsedSplit):
    self._split = split

  def map(self, indices):
    indices = np.asarray(indices)
    real = indices != PAD_INDEX
    # Padding rows repeat a real record (record 0 when the whole part is padding), weight 0.
    safe = np.where(real, indices, indices[real][0] if real.any() else 0)
    batch = self._split(safe)
    batch["weight"] = batch["weight"] * real
    return batch


class UniqueRows(grain.transforms.Map):
  """Adds a batch's distinct items per data shard (`core.rows.batch_unique_rows`: unique_items
  [S, U], item_row [B], hist_item_row [B, L]), so the model's per-item work runs once per
  distinct item; vectorised numpy in the pipeline's workers."""

  def __init__(self, shards: int):
    self._shards = shards

  def map(self, batch):
    return batch | rows.batch_unique_rows(batch["item_id"], batch["hist_item_id"], self._shards)


class RecordSimilarities(grain.transforms.Map):
  """Adds each record's frozen cosines 'hist_similarity' float32 [B, L, K] (target against
  each behaviour, per modality in `names` order, 0 at masked positions), computed from the
  host catalog as the model computes them (`core.catalog.record_cosines`; the vectors rounded
  to the model's `vector_dtype` first), so the train and eval steps read no vectors.

  It holds the catalog's vectors: run it in the training process (`to_iterator(after=...)`),
  not in worker processes, which would each get a copy.
  """

  def __init__(self, catalog: catalog_lib.ItemCatalog, names, vector_dtype: str = "float32"):
    if vector_dtype not in catalog_lib.VECTOR_DTYPES:
      raise ValueError(f"vector_dtype {vector_dtype!r} is not one of "
                       f"{tuple(catalog_lib.VECTOR_DTYPES)}")
    stored = np.dtype(catalog_lib.VECTOR_DTYPES[vector_dtype])
    self._tables = []
    for name in names:
      value = np.asarray(catalog.modalities[name], np.float32)
      self._tables.append((value.astype(stored, copy=False).astype(np.float32, copy=False),
                           catalog_lib.inverse_norms(value)))

  def map(self, batch):
    item_id, hist, mask = batch["item_id"], batch["hist_item_id"], batch["hist_mask"]
    sims = [catalog_lib.record_cosines(v, inv, item_id, hist) for v, inv in self._tables]
    return batch | {"hist_similarity": np.stack(sims, axis=-1) * mask[..., None]}


def local_batch_size(global_batch_size: int, shard: ShardInfo) -> int:
  if global_batch_size < 1 or global_batch_size % shard.count:
    raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of the "
                     f"{shard.count} processes")
  return global_batch_size // shard.count


class ShuffledBatches:
  """Random-access source: item k is this process's part of global batch k.

  Global batch k of epoch e is a slice of the permutation np.random.default_rng((seed, e)) of
  range(num_records); the last partial batch of each epoch is dropped. `num_epochs=None` gives an
  (effectively) endless source.
  """

  ENDLESS_EPOCHS = 1 << 40

  def __init__(self, num_records: int, global_batch_size: int, seed: int,
               num_epochs: int | None, shard: ShardInfo):
    self._num_records = num_records
    self._global = global_batch_size
    self._local = local_batch_size(global_batch_size, shard)
    self._offset = shard.index * self._local
    self._seed = seed
    self._per_epoch = num_records // global_batch_size
    self._epochs = self.ENDLESS_EPOCHS if num_epochs is None else num_epochs

  def __len__(self) -> int:
    return self._per_epoch * self._epochs

  @functools.lru_cache(maxsize=2)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self._seed, epoch)).permutation(self._num_records)

  def __getitem__(self, k: int) -> np.ndarray:
    if not 0 <= k < len(self):
      raise IndexError(k)
    epoch, b = divmod(int(k), self._per_epoch)
    start = b * self._global + self._offset
    return self._permutation(epoch)[start:start + self._local]


def train_dataset(
    records: RawRecords,
    parser: RecordParser,
    *,
    global_batch_size: int,
    seed: int,
    shard: ShardInfo = ShardInfo(),
    num_epochs: int | None = None,
    in_memory: bool = False,
    unique_row_shards: int = 0,
) -> grain.MapDataset:
  """This process's part of shuffled full global batches; `num_epochs=None` repeats forever.

  in_memory: parse the whole split once now (`ParsedSplit`) instead of every batch as read.
  unique_row_shards: S > 0 adds each batch's distinct items per data shard (`UniqueRows`).
  """
  if len(records) < global_batch_size:
    raise ValueError(f"the split has {len(records)} examples, fewer than one batch of "
                     f"{global_batch_size}")
  source = ShuffledBatches(len(records), global_batch_size, seed, num_epochs, shard)
  split = ParsedSplit(records, parser) if in_memory else StreamedSplit(records, parser)
  ds = grain.MapDataset.source(source).map(ReadBatch(split))
  return ds.map(UniqueRows(unique_row_shards)) if unique_row_shards else ds


def eval_num_batches(num_records: int, global_batch_size: int) -> int:
  """Eval steps (the same for every process) covering the split."""
  return max(1, math.ceil(num_records / global_batch_size))


def eval_dataset(
    records: RawRecords,
    parser: RecordParser,
    *,
    global_batch_size: int,
    shard: ShardInfo = ShardInfo(),
) -> grain.MapDataset:
  """The split in order, padded to whole global batches with weight-0 rows; this process's part."""
  if len(records) == 0:
    raise ValueError("the split has no records")
  local = local_batch_size(global_batch_size, shard)
  steps = eval_num_batches(len(records), global_batch_size)
  indices = np.full(steps * global_batch_size, PAD_INDEX, np.int64)
  indices[:len(records)] = np.arange(len(records))
  mine = indices.reshape(steps, shard.count, local)[:, shard.index]
  return grain.MapDataset.source(mine).map(ReadBatch(StreamedSplit(records, parser)))


def to_iterator(
    ds: grain.MapDataset, *, worker_count: int = 0, prefetch: int = 4,
    after: grain.transforms.Map | None = None,
) -> grain.DatasetIterator:
  """A checkpointable iterator; `worker_count > 0` parses in that many worker processes.
  after: a transform run in this process on each batch the workers send (one that holds
  large host arrays, e.g. `RecordSimilarities`; the iterator's state is the same).

  Worker processes need absl flags parsed (run under `app.run`); tests use 0.
  """
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  if after is not None:
    it_ds = it_ds.map(after)
  return iter(it_ds)
