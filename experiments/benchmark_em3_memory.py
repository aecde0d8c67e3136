r"""EM3 training memory: the behaviour side with LoRA (frozen Q-Former + adapters) vs full
fine-tuning of the Q-Former there (lora_rank=0), at MovieLens model dimensions.

  python -m experiments.benchmark_em3_memory --seq_len=200 --batch_size=256 \
      --output_json=/tmp/em3_memory.json

For each variant, XLA's compiled memory analysis of one jitted train step (temporary buffers:
the activations kept for the backward pass, gradients, workspace; plus arguments and outputs)
and the median step time over a few steps.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from absl import flags
from flax import nnx

from dmf_jax.models import registry
from dmf_jax import cli
from experiments import bench_utils
from experiments.configs import movielens

_SEQ_LEN = flags.DEFINE_integer("seq_len", 200, "Behaviour sequence length L.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Training batch size.")
_HEAD = flags.DEFINE_enum("head", "din", ["din", "dmf"], "EM3's ranking head.")
_STEPS = flags.DEFINE_integer("time_steps", 5, "Steps timed per variant (0: memory only).")
_OUTPUT = flags.DEFINE_string("output_json", "/tmp/em3_memory.json", "Output file.")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --output_json.")


def measure(cfg, schema, catalog, batch, steps):
  model = registry.build_model(cfg, schema, rngs=nnx.Rngs(0), catalog=catalog)
  state, step = bench_utils.train_setup(model)
  compiled = step.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  out = {
      "temp_mib": mem.temp_size_in_bytes / 2**20,
      "argument_mib": mem.argument_size_in_bytes / 2**20,
      "output_mib": mem.output_size_in_bytes / 2**20,
      "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
  }
  if steps:
    times = bench_utils.time_calls(lambda: jax.block_until_ready(compiled(state, batch)),
                                   min_seconds=0.0, min_reps=steps, max_reps=steps, warmup=1)
    out["step_ms_p50"] = 1e3 * float(np.median(times))
  return out


def main(argv):
  del argv
  cli.refuse_to_replace("output_json", _OUTPUT.value, _FORCE.value)
  # A catalog with more items than the batch has behaviour positions: the Q-Former runs per
  # position (the path of catalogs too large for a per-step content table).
  base = bench_utils.model_config(movielens.get_config(), "em3")
  base = dataclasses.replace(base, em3_head=_HEAD.value)
  rng = np.random.default_rng(0)
  schema = bench_utils.movielens_like_schema(
      _SEQ_LEN.value, num_items=_BATCH.value * _SEQ_LEN.value + 1)
  catalog = bench_utils.random_catalog(schema, rng)
  batch = bench_utils.random_batch(schema, _BATCH.value, rng)
  result = {"seq_len": _SEQ_LEN.value, "batch_size": _BATCH.value, "head": _HEAD.value,
            "lora_layers": base.lora_layers, "lora_rank": base.lora_rank, "variants": {}}
  for name, cfg in (("lora", base), ("full_finetune", dataclasses.replace(base, lora_rank=0))):
    result["variants"][name] = measure(cfg, schema, catalog, batch, _STEPS.value)
    print(name, json.dumps(result["variants"][name]), flush=True)
  lora_mib = result["variants"]["lora"]["temp_mib"]
  full_mib = result["variants"]["full_finetune"]["temp_mib"]
  result["temp_saving"] = 1 - lora_mib / full_mib
  print(f"temporary memory: LoRA {lora_mib:.1f} MiB vs full fine-tuning {full_mib:.1f} MiB "
        f"({100 * result['temp_saving']:.1f}% less)")
  with open(_OUTPUT.value, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
