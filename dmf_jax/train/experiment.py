"""The experiment of a config: the config validated, the dataset opened (built if needed), the
model and its sharded train state created on the partitioner's mesh, and the input pipeline of
that dataset for that mesh. `train.loop` trains and evaluates it; the binaries and benchmarks
build one to time or compile its steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import grain
import jax
import ml_collections
import numpy as np
from flax import nnx

from dmf_jax.core.rows import catalog_exceeds_positions, pad_unique_rows
from dmf_jax.core.sharding import ShardingRules, agree_across_processes
from dmf_jax.data import format as data_format
from dmf_jax.data import pipeline
from dmf_jax.models.registry import build_model
from dmf_jax.train import config as config_lib
from dmf_jax.train import eval_batch
from dmf_jax.train import optimizers
from dmf_jax.train.partitioner import Partitioner
from dmf_jax.train.restore import open_dataset, select_modalities




@dataclasses.dataclass
class Experiment:
  """Everything built from a config, shared by training and evaluation."""

  config: ml_collections.ConfigDict
  dataset: data_format.BuiltDataset
  partitioner: Partitioner
  graphdef: object
  state: object
  shardings: object
  tx: object
  total_steps: int
  shard: pipeline.ShardInfo
  model_config: object = None
  pretrain_steps: int = 0  # the first steps run the model's 'pretrain' phase (MAKE)
  eval_sizing: dict | None = None  # how the evaluation batch was chosen (`eval_batch_size`)

  def phase(self, step: int) -> str:
    """The training phase of the step after `step` steps."""
    return "pretrain" if step < self.pretrain_steps else "main"

  def records(self, split: str) -> data_format.RawRecords:
    if split not in self.dataset.sources:
      raise ValueError(f"unknown split {split!r}; the dataset has {list(self.dataset.sources)}")
    return data_format.raw_records(self.dataset.sources[split])

  @functools.cached_property
  def catalog_fingerprint(self) -> str:
    """The fingerprint of the catalog the model sees (recorded in its checkpoints)."""
    return self.dataset.catalog.fingerprint()

  @property
  def parser(self) -> data_format.RecordParser:
    return data_format.RecordParser(self.dataset.schema)

  @property
  def train_in_memory(self) -> bool:
    """Whether the training split is small enough to be parsed into memory up front."""
    return len(self.records("train")) <= self.config.in_memory_max_records

  @property
  def unique_row_shards(self) -> int:
    """Data shards whose distinct items each training batch carries (0: none): when the
    catalog has more rows than a shard's item positions, so that per-item work runs once per
    distinct item instead of once per position. With several processes, each one's own
    shards (its share of the 'data' axis); `to_model_batch` agrees on their row count."""
    shards, schema = self.partitioner.data_size, self.dataset.schema
    processes = jax.process_count()
    if shards % processes or not catalog_exceeds_positions(
        schema.num_items, self.config.batch_size, shards, schema.seq_len):
      return 0
    return shards // processes

  @functools.cached_property
  def record_similarities(self) -> pipeline.RecordSimilarities | None:
    """The input pipeline's per-record frozen cosines (`config.record_similarities`), for a
    model that reads frozen similarities without the all-pairs matrix: its train and eval
    steps then read no vectors. None otherwise."""
    if not self.config.get("record_similarities", True):
      return None
    model = nnx.merge(self.graphdef, self.state.params, self.state.rest)
    if not model.takes_record_similarities:
      return None
    return pipeline.RecordSimilarities(self.dataset.catalog, self.dataset.schema.modality_names,
                                 model.catalog.vector_dtype)

  def eval_batch_size(self, predict) -> int:
    """The evaluation batch: `config.eval_batch_size`, or when that is 0 the largest whose
    working set fits the device (`train.eval_batch`), sized once per experiment from the
    compiled `predict` step (a partitioner's `predict_step`); the figures in `eval_sizing`."""
    if self.config.eval_batch_size > 0:
      return self.config.eval_batch_size
    if self.eval_sizing is None:
      unit = math.lcm(self.partitioner.data_size, jax.process_count())
      splits = [s for s in ("validation", "test") if s in self.dataset.sources]
      largest = max(len(self.records(s)) for s in splits)
      sample = self._eval_sample(splits[0], unit)

      def working_set(rows: int) -> int | None:
        batch = {k: jax.ShapeDtypeStruct((rows * v.shape[0] // unit, *v.shape[1:]), v.dtype,
                                         sharding=v.sharding) for k, v in sample.items()}
        batch_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in batch.values())
        return eval_batch.working_set_bytes(predict.compile(self.state, batch),
                                            batch_bytes // self.partitioner.data_size)

      budget, what = eval_batch.device_budget(jax.local_devices()[0])
      size, figures = eval_batch.largest_fitting(working_set, unit=unit, largest=largest,
                                                 budget=budget)
      # each process measured its own devices: all take the smallest size
      self.eval_sizing = {"eval_batch_size": agree_across_processes(size),
                          "budget_is": what, **figures}
    return self.eval_sizing["eval_batch_size"]

  def _eval_sample(self, split: str, rows: int) -> dict:
    """The first `rows` examples of `split` as the evaluation step receives them."""
    local = pipeline.eval_dataset(self.records(split), self.parser, global_batch_size=rows,
                                  shard=self.shard)[0]
    if self.record_similarities is not None:
      local = self.record_similarities.map(local)
    return self.to_model_batch(local, extra=("group",))

  def train_dataset(self, *, seed: int | None = None) -> grain.MapDataset:
    """This process's shuffled training batches (a small split is parsed into memory now)."""
    return pipeline.train_dataset(
        self.records("train"), self.parser, global_batch_size=self.config.batch_size,
        seed=self.config.seed if seed is None else seed, shard=self.shard,
        in_memory=self.train_in_memory, unique_row_shards=self.unique_row_shards)

  def train_iterator(self, ds: grain.MapDataset | None = None) -> grain.DatasetIterator:
    """A checkpointable iterator over `ds` (default: a new `train_dataset()`). An in-memory
    split is served from this process (worker processes would each hold a copy); else
    `worker_count` processes parse."""
    ds = self.train_dataset() if ds is None else ds
    workers = 0 if self.train_in_memory else self.config.worker_count
    return pipeline.to_iterator(ds, worker_count=workers, prefetch=self.config.prefetch,
                          after=self.record_similarities)

  def to_model_batch(self, local: dict, extra: tuple[str, ...] = ()) -> dict:
    """The model's keys of a parsed local batch (plus `extra` ones), split over the mesh."""
    keys = self.dataset.schema.batch_keys() + extra + tuple(
        k for k in ("unique_items", "item_row", "hist_item_row", "hist_similarity")
        if k in local)
    if "unique_items" in local and jax.process_count() > 1:  # one shape for every process
      local = pad_unique_rows(local, agree_across_processes(local["unique_items"].shape[1],
                                                            np.max))
    return self.partitioner.shard_batch({k: local[k] for k in keys})


def total_train_steps(config, num_train_examples: int) -> int:
  """Steps of the main phase."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * (num_train_examples // config.batch_size))


def build_experiment(config: ml_collections.ConfigDict, *, test: bool = True,
                     dataset: data_format.BuiltDataset | None = None) -> Experiment:
  """The experiment of `config`; test=False leaves the test split out of the dataset (a
  tuning run: nothing can read it). dataset: the build to use (default: the config's,
  built if needed)."""
  validated = config_lib.validate(
      config, num_devices=jax.device_count(), num_processes=jax.process_count())
  dataset = select_modalities(dataset or open_dataset(config), validated.model.modalities)
  if not test:
    dataset = dataclasses.replace(dataset, sources={k: v for k, v in dataset.sources.items()
                                                    if k != "test"})
  partitioner = Partitioner(validated.mesh)
  pretrain = validated.model.pretrain_epochs * (len(dataset.sources["train"]) // config.batch_size)
  num_train = len(dataset.sources["train"])
  if config.batch_size > num_train:
    raise config_lib.ConfigError(
        f"invalid config:\n  - batch_size={config.batch_size} is larger than the training split "
        f"of {dataset.full_name} ({num_train} examples): not one batch would be full")
  total = pretrain + total_train_steps(config, len(dataset.sources["train"]))
  if total <= pretrain:
    raise config_lib.ConfigError(
        f"invalid config:\n  - training would run 0 steps ({len(dataset.sources['train'])} "
        f"examples, batch_size {config.batch_size}, num_epochs {config.num_epochs})")
  tx = optimizers.make_optimizer(validated.optimizer, total)

  def factory(rules, rngs):
    return build_model(validated.model, dataset.schema, rngs=rngs, sharding=rules)

  graphdef, state, shardings = partitioner.init(
      factory, tx, seed=config.seed, schema=dataset.schema, catalog=dataset.catalog,
      ema_decay=validated.optimizer.ema_decay)
  if validated.optimizer.content_learning_rate is not None and not any(
      optimizers.in_content_tower(path) for path, _ in nnx.to_flat_state(state.params)):
    raise config_lib.ConfigError(
        f"invalid config:\n  - optimizer.content_learning_rate is set, but model "
        f"{config.model!r} has no item-content tower for it to apply to")
  return Experiment(config, dataset, partitioner, graphdef, state, shardings, tx, total,
                    pipeline.ShardInfo.from_jax(), validated.model, pretrain)


def serving_model(exp: Experiment, state):
  """The trained model for single-device serving: no mesh axes, arrays fetched to the host.

  (The training graph's modules carry the mesh's batch axis, and the state its shardings.)
  Tables keep the row padding of the training mesh, so the trained rows fit as they are.
  Its parameters are the state's `eval_params` (the moving average, when kept).
  """
  rules = ShardingRules(table_shards=exp.partitioner.rules.table_shards)
  model = build_model(exp.model_config, exp.dataset.schema, rngs=nnx.Rngs(0), sharding=rules)
  nnx.update(model, jax.device_get(state.eval_params), jax.device_get(state.rest))
  return model


def count_params(state) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
