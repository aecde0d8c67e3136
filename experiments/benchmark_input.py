r"""Input-pipeline throughput per dataset, against what the DMF train step consumes.

  python -m experiments.benchmark_input --data_dir=/tmp/dmf_data \
      --datasets=generated_ctr/default,movielens_100k_mm/text_image \
      --manual_dir=../shared/datasets/movielens-100k-mm --output_json=/tmp/input.json

For each dataset: examples/s of the Grain training pipeline (read + parse + pad/mask + batch,
shuffled, after warm-up) with 0 and N worker processes and from the split parsed into memory,
and examples/s of the jitted DMF train
step at the same batch size on batches already in memory (compile excluded). The pipeline must
deliver at least 3x the train step's rate.
"""

from __future__ import annotations

import json

import numpy as np
from absl import flags

from dmf_jax import data
from dmf_jax import cli
from experiments import bench_utils

_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/dmf_data", "TFDS data dir (built if needed).")
_DATASETS = flags.DEFINE_list("datasets", ["generated_ctr/default"], "name/config entries.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Raw folder for movielens/byod.")
_BATCH = flags.DEFINE_integer("batch_size", 512, "Batch size.")
_BATCHES = flags.DEFINE_integer("num_batches", 100, "Timed pipeline batches.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker-process counts to measure.")
_STEPS = flags.DEFINE_integer("train_steps", 30, "Timed train steps.")
_MODEL = flags.DEFINE_string("model", "dmf", "Model whose train step is measured.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Where to write the records.")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --output_json.")


def main(argv):
  del argv
  cli.refuse_to_replace("output_json", _OUTPUT.value, _FORCE.value)
  records = []
  for entry in _DATASETS.value:
    name, _, config = entry.partition("/")
    built = data.prepare(name, config or None, _DATA_DIR.value, _MANUAL_DIR.value)
    rec = {"dataset": entry, "batch_size": _BATCH.value, "seq_len": built.schema.seq_len}
    for workers in (int(w) for w in _WORKERS.value):
      rec[f"input_examples_per_s_workers_{workers}"] = bench_utils.pipeline_rate(
          built, _BATCH.value, _BATCHES.value, workers)
    # The split parsed once into memory (what training does for splits up to
    # `in_memory_max_records`): batches are numpy gathers.
    rec["input_examples_per_s_in_memory"] = bench_utils.pipeline_rate(
        built, _BATCH.value, _BATCHES.value, 0, in_memory=True)
    times = bench_utils.train_step_times(built, _BATCH.value, _STEPS.value, {"name": _MODEL.value})
    rec[f"{_MODEL.value}_train_examples_per_s"] = _BATCH.value / float(np.median(times))
    best = max(v for k, v in rec.items() if k.startswith("input_examples_per_s"))
    rec["input_over_train"] = best / rec[f"{_MODEL.value}_train_examples_per_s"]
    records.append(rec)
    print(json.dumps(rec), flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(records, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
