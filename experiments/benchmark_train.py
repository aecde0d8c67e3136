r"""Training throughput of each model and of the input pipeline, on a config's dataset.

  python -m experiments.benchmark_train --config=experiments/configs/movielens.py \
      --config.manual_dir=../shared/datasets/movielens-100k-mm --batch_size=512 \
      --output_json=/tmp/train.json

Steady-state examples/s of the jitted train step (compile and warm-up excluded, batches already
in memory) for every model in --models, the Grain pipeline's examples/s, and for
--end_to_end_models the training loop's (pipeline feeding the sharded step), at one batch size.
"""

from __future__ import annotations

import json

import numpy as np
from absl import flags
from ml_collections import config_flags

from dmf_jax import data
from dmf_jax import cli
from experiments import bench_utils

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.", lock_config=True)
_BATCH = flags.DEFINE_integer("batch_size", 512, "Batch size.")
_MODELS = flags.DEFINE_list("models", ["din", "dmf", "dmf_early_fusion", "dmf_no_me",
                                       "dmf_no_mc"], "Models to time.")
_STEPS = flags.DEFINE_integer("steps", 30, "Timed train steps per model.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Input worker processes.")
_END_TO_END = flags.DEFINE_list("end_to_end_models", ["dmf"],
                                "Models also timed in the training loop's steady state "
                                "(input pipeline + sharded step).")
_OUTPUT = flags.DEFINE_string("output_json", "/tmp/benchmark_train.json", "Output file.")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --output_json.")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cli.refuse_to_replace("output_json", _OUTPUT.value, _FORCE.value)
  config = _CONFIG.value
  built = data.prepare(config.dataset, config.dataset_config, config.data_dir, config.manual_dir)
  result = {
      "dataset": built.full_name,
      "batch_size": _BATCH.value,
      "seq_len": built.schema.seq_len,
      # As the training loop reads this split (parsed in memory when small enough), and
      # streamed from the files whatever its size.
      "input_examples_per_s": bench_utils.pipeline_rate(
          built, _BATCH.value, 100, _WORKERS.value,
          in_memory=len(built.sources["train"]) <= config.in_memory_max_records),
      "input_streamed_examples_per_s": bench_utils.pipeline_rate(
          built, _BATCH.value, 100, _WORKERS.value),
      "models": {},
  }
  for name in _MODELS.value:
    model_config = bench_utils.model_config(config, name)
    times = bench_utils.train_step_times(built, _BATCH.value, _STEPS.value, model_config)
    result["models"][name] = {"train_examples_per_s": _BATCH.value / float(np.median(times)),
                              "step_ms_p50": 1e3 * float(np.median(times))}
    if name in _END_TO_END.value:
      with config.unlocked():
        config.model = name
      result["models"][name]["end_to_end_examples_per_s"] = bench_utils.end_to_end_rate(
          config, _BATCH.value, 3 * _STEPS.value, _WORKERS.value)
    print(name, json.dumps(result["models"][name]), flush=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  cli.run(main)
