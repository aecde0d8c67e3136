r"""Scale benchmark: the DMF train step over catalogs of 1,000 to 1,000,000 items, and the
streamed build (and input pipeline) of generated_ctr/large.

  python -m experiments.benchmark_scale --data_dir=~/dmf_data --output_json=/tmp/scale.json

writes
  {"catalog": [{"num_items": N, "model": "dmf", "seq_len": L, "train_examples_per_s": x,
                "device_bytes": b, ...}, ...],
   "build": {"dataset": "generated_ctr/large", "records": R, "seconds": s,
             "peak_rss_bytes": m},
   "pipeline": {"workers": {"0": x, "2": y}, ...}}

Catalog rows: DMF with experiments/configs/movielens.py's model dimensions, MovieLens's
schema (text 384-d and image 1280-d vectors per item, random; genres, year, user fields),
batch 512, random batches, Adam; N = 1,000 / 10,000 / 100,000 / 1,000,000 at L = 50, plus one
row at L = 500 (`--long_seq_items` items). Each row is timed in `--rounds` rounds alternating
with the 1,000-item row (a slow phase of a shared machine falls on both alike), built just
before and released after, so that two catalogs at most are held at once: step_ms_median over
all steps, step_ms_by_round, and vs_1000_items_by_round, the median over rounds of the
1,000-item row's step time over the row's. device_bytes: the train state's bytes
on the device (parameters, optimizer state, catalog). The build runs `python -m data.build` in a
child process (peak RSS: the child's maximum resident set); a data_dir that already holds the
build reuses the figures recorded when it was made. Defaults take about 30 minutes on 2 CPU
cores.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import flags
from etils import epath
from flax import nnx

from dmf_jax import data
from dmf_jax.models import registry
from dmf_jax.core import rows
from dmf_jax.data import pipeline
from dmf_jax.data import synthetic
from dmf_jax.train import memory
from dmf_jax import cli
from experiments import bench_utils
from experiments.configs import movielens

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir for generated_ctr/large.",
                                required=True)
_OUTPUT = flags.DEFINE_string("output_json", None, "Where to write the figures.", required=True)
_SIZES = flags.DEFINE_list("num_items", ["1000", "10000", "100000", "1000000"],
                           "Catalog sizes of the L = 50 rows.")
_LONG_ITEMS = flags.DEFINE_integer("long_seq_items", 100_000,
                                   "Catalog size of the L = 500 row (0: no such row).")
_STEPS = flags.DEFINE_integer("steps", 15, "Timed train steps per row and round.")
_ROUNDS = flags.DEFINE_integer(
    "rounds", 3, "Rounds of --steps steps per row, the rows alternating (all rows are built "
    "first and held together: the 1,000,000-item row holds about 7 GB).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 512, "Examples per step.")
_VECTOR_DTYPE = flags.DEFINE_enum("vector_dtype", "float32", ["float32", "bfloat16"],
                                  "How the catalog holds the vectors.")
_BUILD = flags.DEFINE_string("build_config", "large",
                             "generated_ctr config to build ('' to skip the build).")
_PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 60,
                                         "Batches timed per pipeline setting.")
_SPARSE = flags.DEFINE_integer(
    "sparse_min_rows", 0, "Row-sparse (lazy) Adam for the tables of at least this many rows "
    "(optimizer.sparse_min_rows; 0: dense Adam, as training's default).")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Input worker processes to time.")
_UNIQUE = flags.DEFINE_bool(
    "unique_rows", True, "Batches carry their distinct items per data shard "
    "(`core.rows.batch_unique_rows`, as the input pipeline sends them): per-item work once per "
    "distinct item. False: the catalog or per-position rows.")
_MODALITY_DIM = flags.DEFINE_integer(
    "modality_dim", 0, "Shrink every modality to this many dims (0: MovieLens's 384 and 1280): "
    "how much of a step is reading vectors.")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --output_json.")
_RECORD = flags.DEFINE_bool(
    "record_similarities", True, "Batches carry their frozen cosines (the input pipeline's "
    "`data.pipeline.RecordSimilarities`, timed on the host per batch) when the all-pairs "
    "matrix is not used: the step reads no vectors. False: the step reads them per position.")
_EXPOSURE = flags.DEFINE_string(
    "exposure", "zipf:1.0", "Item exposure of the catalog rows' random batches: 'uniform' or "
    "'zipf:A' (exposure ~ 1 / rank^A over a seeded permutation of the items).")

BUILD_RECORD = "benchmark_scale_build.json"  # beside the build: the figures of its making


def catalog_setup(num_items: int, seq_len: int) -> tuple[dict, Callable[[], object]]:
  """(the row's figures but its timing, one() running the next jitted DMF train step) over a
  random catalog of `num_items` items, the step compiled and run twice."""
  rng = np.random.default_rng(0)
  schema = bench_utils.movielens_like_schema(seq_len, num_items)
  if _MODALITY_DIM.value:
    schema = schema.replace(modalities=tuple(dataclasses.replace(m, dim=_MODALITY_DIM.value)
                                             for m in schema.modalities))
  catalog = bench_utils.random_catalog(schema, rng)
  config = bench_utils.model_config(movielens.get_config(), "dmf")
  config = dataclasses.replace(config, vector_dtype=_VECTOR_DTYPE.value)
  model = registry.build_model(config, schema, rngs=nnx.Rngs(0), catalog=catalog)
  record = _RECORD.value and model.takes_record_similarities
  state, step = bench_utils.train_setup(model, sparse_min_rows=_SPARSE.value)
  del model
  held = memory.per_device_summary(state)
  batches = [bench_utils.random_batch(schema, _BATCH.value, rng, _EXPOSURE.value)
             for _ in range(4)]
  if _UNIQUE.value:
    batches = [b | {k: jax.numpy.asarray(v) for k, v in rows.batch_unique_rows(
        np.asarray(b["item_id"]), np.asarray(b["hist_item_id"])).items()} for b in batches]
  host_ms = None
  if record:  # the host's part: the input pipeline's transform, timed per batch
    transform = pipeline.RecordSimilarities(catalog, schema.modality_names, _VECTOR_DTYPE.value)
    host = [{k: np.asarray(b[k]) for k in ("item_id", "hist_item_id", "hist_mask")}
            for b in batches]
    mapped = []
    host_ms = round(1e3 * float(np.median(bench_utils.time_calls(
        lambda: mapped.append([transform.map(h) for h in host]), min_seconds=0.0, min_reps=3,
        max_reps=3, warmup=1))) / len(host), 2)
    batches = [b | {"hist_similarity": jax.numpy.asarray(m["hist_similarity"])}
               for b, m in zip(batches, mapped[-1])]
    del transform
  del catalog  # the model holds its own (device) copy
  distinct = float(np.mean([len(np.unique(np.concatenate(
      [np.asarray(b["item_id"]).ravel(), np.asarray(b["hist_item_id"]).ravel()])))
      for b in batches]))
  floor = floor_bytes(state, batches[0], distinct,
                      num_items <= config.pairwise_similarity_max_items or record, schema)
  holder = {"state": state, "i": 0}

  def one():
    holder["state"], out = step(holder["state"], batches[holder["i"] % 4])
    holder["i"] += 1
    return out

  start = time.perf_counter()
  for _ in range(2):  # compiles, then the first touch of the state's pages
    jax.block_until_ready(one())
  row = {"num_items": num_items, "model": "dmf", "seq_len": seq_len,
         "exposure": _EXPOSURE.value, "distinct_items_per_batch": round(distinct, 1),
         "unique_rows": (int(batches[0]["unique_items"].shape[1]) if _UNIQUE.value else None),
         "device_bytes": int(held["total"]),
         "device_bytes_by_part": {k: int(v) for k, v in held.items() if k != "total"},
         "pairwise_matrix": num_items <= config.pairwise_similarity_max_items,
         "record_similarities": bool(record), "host_similarity_ms_per_batch": host_ms,
         "vector_dtype": _VECTOR_DTYPE.value, "sparse_min_rows": _SPARSE.value,
         "seconds_with_compile": round(time.perf_counter() - start, 1),
         "floor_bytes": int(floor)}
  return row, one


def timed_rounds(setups: list[tuple[dict, Callable[[], object]]], rounds: int, steps: int
                 ) -> list[list[np.ndarray]]:
  """Per setup, per round, its `steps` step times (s): `rounds` alternating rounds (every other
  round in reverse order), so that a slow phase of a shared machine falls on every row alike."""
  times = [[] for _ in setups]
  for r in range(rounds):
    order = range(len(setups)) if r % 2 == 0 else reversed(range(len(setups)))
    for i in order:
      times[i].append(bench_utils.time_calls(setups[i][1], min_seconds=0.0, min_reps=steps,
                                             max_reps=steps, warmup=0))
  return times


def with_times(row: dict, per_round: list[np.ndarray]) -> dict:
  """The row with its timing figures: the median over all its steps, per round the median
  step, and the step's ratio to the floor."""
  step_s = float(np.median(np.concatenate(per_round)))
  return row | {"train_examples_per_s": round(_BATCH.value / step_s, 1),
                "step_ms_median": round(1e3 * step_s, 2),
                "step_ms_by_round": [round(1e3 * float(np.median(t)), 3) for t in per_round],
                "floor_ratio": round(step_s / (row["floor_bytes"] / bandwidth()), 1)}


def catalog_rows(specs: list[tuple[int, int]], rounds: int, steps: int) -> list[dict]:
  """The catalog rows of (num_items, seq_len) `specs`, in their order.

  The 1,000-item L = 50 row (the base) is built first and kept; every other row is built in
  turn, timed in rounds alternating with the base, and released, so that at most two catalogs
  are held at once (a 1,000,000-item catalog with MovieLens's vectors takes 6.7 GB). A row's
  vs_1000_items is the base's examples/s over the row's in those rounds, and
  vs_1000_items_by_round the median of the rounds' ratios; the base row's figures cover all
  its rounds."""
  base_spec = (1000, 50) if (1000, 50) in specs else None
  base = catalog_setup(*base_spec) if base_spec else None
  rows, base_rounds = {}, []
  for spec in specs:
    if spec == base_spec:
      continue
    setup = catalog_setup(*spec)
    times = timed_rounds([setup] if base is None else [base, setup], rounds, steps)
    row = with_times(setup[0], times[-1])
    del setup
    if base is not None:  # the base's step time over the row's: all steps, and per round
      base_rounds += times[0]
      row["vs_1000_items"] = round(float(
          np.median(np.concatenate(times[0])) / np.median(np.concatenate(times[1]))), 3)
      row["vs_1000_items_by_round"] = round(float(np.median(
          [np.median(a) / np.median(b) for a, b in zip(*times)])), 3)
    print(json.dumps(row), flush=True)
    rows[spec] = row
  if base is not None:
    base_rounds = base_rounds or timed_rounds([base], rounds, steps)[0]
    rows[base_spec] = with_times(base[0], base_rounds) | {"vs_1000_items": 1.0,
                                                          "vs_1000_items_by_round": 1.0}
    print(json.dumps(rows[base_spec]), flush=True)
  return [rows[spec] for spec in specs]


def floor_bytes(state, batch, distinct_items: float, no_vectors: bool, schema) -> float:
  """The bytes a DMF train step must move at least, per step:

  - dense parameters and Adam's moments, read and written: 6 x their bytes;
  - embedding tables: under row-sparse Adam (`--sparse_min_rows`) the rows the batch looks up
    (the item-id table: its distinct items; user tables: one row per example; side-field
    tables: whole, they are small), 6 x each row's bytes; under dense Adam the whole table;
  - the catalog rows of the distinct items: side fields and, without the all-pairs matrix,
    every modality's vector (the frozen cosine reads each once); with the matrix, the B x L x K
    similarities it gathers; with record similarities (`no_vectors`), none: the batch holds
    the B x L x K cosines;
  - the batch itself.
  """
  total = 0.0
  for path, x in jax.tree_util.tree_leaves_with_path(state.params):
    names = jax.tree_util.keystr(path)
    size = x.size * x.dtype.itemsize
    if "['embedding']" in names and x.shape[0] >= max(_SPARSE.value, 1) \
        and _SPARSE.value:
      rows = distinct_items if "['items']['item_id']" in names else len(batch["item_id"])
      total += 6 * min(rows, x.shape[0]) * x.shape[1] * x.dtype.itemsize
    else:
      total += 6 * size
  per_item = 4 * (len(schema.item_features) + 1) + (
      0 if no_vectors else sum(m.dim * 4 for m in schema.modalities))
  total += distinct_items * per_item
  if no_vectors and "hist_similarity" not in batch:  # gathered from the all-pairs matrix
    total += batch["hist_item_id"].size * len(schema.modalities) * 4
  return total + sum(np.asarray(v).nbytes for v in batch.values())


@functools.lru_cache(maxsize=1)
def bandwidth() -> float:
  """This device's memory bandwidth, bytes/s: a STREAM-like copy (read + write of 256 MiB,
  jitted, the best of 5), measured once per run."""
  x = jax.numpy.ones(64 * 2**20, jax.numpy.float32)
  copy = jax.jit(lambda a: a * 1.0)
  copy(x).block_until_ready()
  best = min(bench_utils.time_calls(lambda: copy(x).block_until_ready(), min_seconds=0.0,
                                    min_reps=5, max_reps=5, warmup=1))
  return 2 * x.nbytes / best


def build_row(data_dir: str, config: str) -> dict:
  """Builds generated_ctr/<config> in a child process (wall time, peak RSS) unless built."""
  builder_dir = epath.Path(data_dir).expanduser() / "generated_ctr" / config
  record = builder_dir / BUILD_RECORD
  if not record.exists():
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data.build", "--dataset=generated_ctr",
                    f"--config={config}", f"--data_dir={data_dir}"], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    built = data.prepare("generated_ctr", config, data_dir)
    figures = {"dataset": f"generated_ctr/{config}",
               "records": int(sum(len(s) for s in built.sources.values())),
               "records_by_split": {k: len(v) for k, v in built.sources.items()},
               "seconds": round(seconds, 1), "peak_rss_bytes": int(peak),
               "measured": time.strftime("%Y-%m-%d %H:%M")}
    record.write_text(json.dumps(figures, indent=2))
  figures = json.loads(record.read_text())
  print(json.dumps(figures), flush=True)
  return figures


def pipeline_row(data_dir: str, config: str) -> dict:
  """Examples/s of the streamed training pipeline (read + parse per batch) by worker count,
  against the DMF step's examples/s on that dataset's schema."""
  built = data.prepare("generated_ctr", config, data_dir)
  rates = {w: round(bench_utils.pipeline_rate(built, _BATCH.value, _PIPELINE_BATCHES.value,
                                              workers=int(w)), 1) for w in _WORKERS.value}
  model_config = dataclasses.replace(bench_utils.model_config(movielens.get_config(), "dmf"),
                                     vector_dtype=_VECTOR_DTYPE.value)
  step = bench_utils.train_step_times(built, _BATCH.value, _STEPS.value, model_config)
  row = {"dataset": built.full_name, "batch_size": _BATCH.value, "workers": rates,
         "train_step_examples_per_s": round(_BATCH.value / float(np.median(step)), 1)}
  print(json.dumps(row), flush=True)
  return row


def main(argv):
  del argv
  try:
    synthetic.zipf_exponent_of(_EXPOSURE.value)
  except ValueError as e:
    cli.fail(f"--exposure: {e}")
  cli.refuse_to_replace("output_json", _OUTPUT.value, _FORCE.value)
  out = {"machine": f"{jax.devices()[0].platform}, {jax.device_count()} device(s)",
         "memory_bandwidth_bytes_per_s": round(bandwidth()), "catalog": []}
  if _BUILD.value:
    out["build"] = build_row(_DATA_DIR.value, _BUILD.value)
  specs = [(int(n), 50) for n in _SIZES.value]
  if _LONG_ITEMS.value:
    specs.append((_LONG_ITEMS.value, 500))
  out["catalog"] = catalog_rows(specs, _ROUNDS.value, _STEPS.value)
  if _BUILD.value:
    out["pipeline"] = pipeline_row(_DATA_DIR.value, _BUILD.value)
  epath.Path(_OUTPUT.value).write_text(json.dumps(out, indent=2))
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
