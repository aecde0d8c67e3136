"""Timing helpers shared by the benchmark binaries."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmf_jax.data.movielens import FIELD_DIM, ID_DIM, USER_FIELDS
from dmf_jax.data import format as data_format
from dmf_jax.data import pipeline
from dmf_jax.data import synthetic
from dmf_jax.models import registry
from dmf_jax.train import experiment
from dmf_jax.train import optimizers
from dmf_jax.train import steps as training
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.core.schema import FeatureSchema, FeatureSpec, ModalitySpec


def model_config(config, name: str):
  """The typed config of model `name` from an experiment config's flat model_config."""
  return registry.model_config({"name": name, **config.model_config.to_dict()})


def train_setup(model, *, jit: bool = True, sparse_min_rows: int = 0):
  """(train state, train step) of `model` with Adam(1e-3), as every benchmark times it; with
  sparse_min_rows > 0 the tables of at least that many rows get lazy row-sparse Adam."""
  tx = optimizers.make_optimizer(
      optimizers.OptimizerConfig(learning_rate=1e-3, sparse_min_rows=sparse_min_rows), 1)
  graphdef, state = training.create_train_state(model, tx)
  return state, training.make_train_step(graphdef, tx, jit=jit)


def time_calls(fn, *, min_seconds: float = 0.5, min_reps: int = 5, max_reps: int = 200,
               warmup: int = 2) -> np.ndarray:
  """Wall times (s) of repeated `fn()` calls (each blocks until done), after warm-up."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times, start = [], time.perf_counter()
  while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_seconds):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return np.asarray(times)


def pipeline_rate(built, batch_size: int, num_batches: int, workers: int = 0,
                  in_memory: bool = False) -> float:
  """Examples/s of the training input pipeline (after 5 warm-up batches; with `in_memory`,
  the one-off parse of the split is excluded)."""
  records = data_format.raw_records(built.sources["train"])
  parser = data_format.RecordParser(built.schema)
  ds = pipeline.train_dataset(records, parser, global_batch_size=batch_size, seed=0,
                        in_memory=in_memory)
  it = pipeline.to_iterator(ds, worker_count=workers)
  for _ in range(5):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches * batch_size / (time.perf_counter() - start)


def train_step_times(built, batch_size: int, steps: int, model_config) -> np.ndarray:
  """Seconds per jitted train step on in-memory batches (compile and warm-up excluded)."""
  records = data_format.raw_records(built.sources["train"])
  parser = data_format.RecordParser(built.schema)
  it = pipeline.to_iterator(
      pipeline.train_dataset(records, parser, global_batch_size=batch_size, seed=0))
  keys = built.schema.batch_keys()
  batches = [jax.device_put({k: v for k, v in next(it).items() if k in keys}) for _ in range(8)]
  model = registry.build_model(model_config, built.schema, rngs=nnx.Rngs(0), catalog=built.catalog)
  state, step = train_setup(model)
  holder = {"state": state, "i": 0}

  def one():
    holder["state"], out = step(holder["state"], batches[holder["i"] % 8])
    holder["i"] += 1
    return out

  return time_calls(one, min_seconds=0.0, min_reps=steps, max_reps=steps, warmup=3)


def end_to_end_rate(config, batch_size: int, steps: int, workers: int = 0) -> float:
  """Examples/s of the training loop's steady state: the training iterator (as `loop`
  builds it, with `workers` as worker_count) feeding the partitioner's sharded, donated train
  step, with no per-step synchronization; compile and 5 warm-up steps excluded."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.batch_size, config.worker_count = batch_size, workers
  exp = experiment.build_experiment(config)
  step_fn = exp.partitioner.train_step(exp.graphdef, exp.tx, exp.shardings, "main")
  it = exp.train_iterator(exp.train_dataset(seed=0))
  state = exp.state
  for _ in range(5):
    state, out = step_fn(state, exp.to_model_batch(next(it)))
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(steps):
    state, out = step_fn(state, exp.to_model_batch(next(it)))
  jax.block_until_ready(out)
  return steps * batch_size / (time.perf_counter() - start)


NUM_ITEMS = 1682


def matmul_flops(fn, *args) -> tuple[float, bool]:
  """(FLOPs of the matrix products `fn(*args)` runs, whether a `while` loop was counted once).

  Counted on the jaxpr: 2 x (output elements) x (contracted size) per `dot_general`, a `scan`'s
  body times its length, every nested jaxpr (jit, custom_vjp, remat, cond: its largest branch).
  XLA's `cost_analysis` counts a loop's body once, which under-counts recurrent models (DIEN's
  GRUs by their length), so the roofline uses this count for the compute side. A `while` loop
  of unknown trip count is counted once, and flagged.
  """
  closed = jax.make_jaxpr(fn)(*args)
  once = [False]

  def count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
        continue
      subs = [v for k, v in eqn.params.items()
              if k in ("jaxpr", "call_jaxpr", "fun_jaxpr", "body_jaxpr", "branches")]
      inner = []
      for sub in subs:
        for j in (sub if isinstance(sub, (list, tuple)) else [sub]):
          inner.append(count(getattr(j, "jaxpr", j)))
      if name == "cond":
        total += max(inner, default=0.0)
      elif name == "scan":
        total += eqn.params["length"] * sum(inner)
      else:
        once[0] |= name == "while"
        total += sum(inner)
    return total

  return count(closed.jaxpr), once[0]


def movielens_like_schema(seq_len: int, num_items: int = NUM_ITEMS) -> FeatureSchema:
  return FeatureSchema(
      num_items=num_items, item_id_dim=ID_DIM, seq_len=seq_len,
      item_features=(FeatureSpec("genres", 19, FIELD_DIM, max_values=6),
                     FeatureSpec("year", 72, FIELD_DIM), FeatureSpec("image_missing", 2, FIELD_DIM)),
      user_features=USER_FIELDS,
      modalities=(ModalitySpec("text", 384), ModalitySpec("image", 1280)),
  )


def random_catalog(schema, rng) -> ItemCatalog:
  n = schema.num_items
  genres = np.full((n, 6), -1, np.int32)
  genres[:, :2] = rng.integers(0, 19, (n, 2))
  side = {"genres": genres, "year": rng.integers(0, 72, n).astype(np.int32),
          "image_missing": np.zeros(n, np.int32)}
  mods = {m.name: rng.standard_normal((n, m.dim), dtype=np.float32) for m in schema.modalities}
  return ItemCatalog(side, mods)


@functools.lru_cache(maxsize=4)
def _exposure_cdf(exposure: str, num_items: int) -> np.ndarray:
  return np.cumsum(synthetic.exposure_weights(exposure, num_items, seed=0))


def item_ids(num_items: int, shape, rng, exposure: str = "uniform") -> np.ndarray:
  """Random item ids int32 `shape`: uniform, or 'zipf:A' (`synthetic.exposure_weights`)."""
  if exposure == "uniform":
    return rng.integers(0, num_items, shape)
  cdf = _exposure_cdf(exposure, num_items)
  ids = np.searchsorted(cdf, rng.random(shape) * cdf[-1], side="right")
  return np.minimum(ids, num_items - 1)


def random_batch(schema, batch_size: int, rng, exposure: str = "uniform") -> dict:
  """A random training batch for `schema` (80% of history slots valid); item ids drawn with
  `exposure` ('uniform' or 'zipf:A')."""
  b, seq_len = batch_size, schema.seq_len
  batch = {f"user/{f.name}": jnp.asarray(rng.integers(0, f.vocab_size, b), jnp.int32)
           for f in schema.user_features}
  return batch | {
      "item_id": jnp.asarray(item_ids(schema.num_items, b, rng, exposure), jnp.int32),
      "hist_item_id": jnp.asarray(item_ids(schema.num_items, (b, seq_len), rng, exposure),
                                  jnp.int32),
      "hist_mask": jnp.asarray(rng.random((b, seq_len)) < 0.8),
      "label": jnp.asarray(rng.random(b) < 0.5, jnp.float32), "weight": jnp.ones(b)}
