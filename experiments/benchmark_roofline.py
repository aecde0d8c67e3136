r"""Roofline figures: the machine's matmul FLOP/s and memory bandwidth, and XLA's FLOPs and bytes
per candidate (DTA vs early fusion, MovieLens model dimensions) and per training example.

  python -m experiments.benchmark_roofline --seq_len=200 --candidates=1200 --output_json=/tmp/roof.json

A model's `fraction_of_dmf_at_matmul_peak` is its examples/s, were its matrix products to run at
this machine's measured matmul FLOP/s with everything else free, over DMF's measured examples/s:
a bound no implementation of the same function reaches on this machine.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from dmf_jax.models import registry
from dmf_jax.serve import server as serving
from dmf_jax import cli
from experiments import bench_utils
from experiments.bench_utils import NUM_ITEMS, movielens_like_schema, random_catalog
from experiments.configs import movielens, movielens_study

_SEQ_LEN = flags.DEFINE_integer("seq_len", 200, "L for the serving figures.")
_CANDIDATES = flags.DEFINE_integer("candidates", 1200, "N for the serving figures.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 512, "Batch for the training figures.")
_TRAIN_MODELS = flags.DEFINE_list(
    "train_models", ["dmf", "din", "bst", "dien"],
    "Models whose train step (MovieLens study config, L = 50) gets a roofline line.")
_OUTPUT = flags.DEFINE_string("output_json", "/tmp/benchmark_roofline.json", "Output file.")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --output_json.")


def cost(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def median_s(fn, *args):
  jitted = jax.jit(fn)
  return float(np.median(bench_utils.time_calls(lambda: jitted(*args), min_seconds=1.0)))


def machine_peaks():
  """The best matmul FLOP/s over square float32 sizes 512-2048, and a copy's bandwidth."""
  matmul = max(2 * n ** 3 / median_s(lambda a: a @ a, jnp.ones((n, n), jnp.float32)) / 1e9
               for n in (512, 1024, 2048))
  big = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MiB
  copy_s = median_s(lambda x: x * 1.0001, big)
  return {"matmul_gflop_per_s": matmul,
          "memory_gb_per_s": 2 * big.nbytes / copy_s / 1e9}


def train_rooflines(names, batch_size: int, machine: dict, rng) -> dict:
  """Per model: the train step's FLOPs per example (matrix products, loops times their length:
  `bench_utils.matmul_flops`; XLA's own count beside it, which counts a loop's body once),
  bytes per example (XLA), measured examples/s and achieved FLOP/s, and the examples/s this
  machine's matmul peak would allow; with DMF in `names`, each model's fraction of DMF's
  examples/s, measured and at that bound."""
  schema = movielens_like_schema(50)
  catalog = random_catalog(schema, rng)
  batch = bench_utils.random_batch(schema, batch_size, rng)
  out = {}
  for name in names:
    cfg = bench_utils.model_config(movielens_study.get_config(), name)
    model = registry.build_model(cfg, schema, rngs=nnx.Rngs(0), catalog=catalog)
    state, step = bench_utils.train_setup(model, jit=False)
    xla_flops, nbytes = cost(step, state, batch)
    flops, loop_once = bench_utils.matmul_flops(step, state, batch)
    seconds = median_s(step, state, batch)
    out[name] = {
        "batch_size": batch_size, "matmul_flops_per_example": flops / batch_size,
        "xla_flops_per_example": xla_flops / batch_size, "while_loop_counted_once": loop_once,
        "bytes_per_example": nbytes / batch_size, "seconds_per_step": seconds,
        "examples_per_s": batch_size / seconds, "achieved_gflop_per_s": flops / seconds / 1e9,
        "examples_per_s_at_matmul_peak":
            machine["matmul_gflop_per_s"] * 1e9 * batch_size / max(flops, 1.0)}
    print("train", name, json.dumps(out[name]), flush=True)
  if "dmf" in out:
    for line in out.values():
      line["fraction_of_dmf"] = line["examples_per_s"] / out["dmf"]["examples_per_s"]
      line["fraction_of_dmf_at_matmul_peak"] = (line["examples_per_s_at_matmul_peak"]
                                                / out["dmf"]["examples_per_s"])
  return out


def main(argv):
  del argv
  cli.refuse_to_replace("output_json", _OUTPUT.value, _FORCE.value)
  out = {"machine": machine_peaks()}
  print(json.dumps(out["machine"]), flush=True)
  cfg = bench_utils.model_config(movielens.get_config(), "dmf")
  seq_len, n = _SEQ_LEN.value, _CANDIDATES.value
  rng = np.random.default_rng(0)
  schema = movielens_like_schema(seq_len)
  catalog = random_catalog(schema, rng)
  user = {"user/user_id": 3, "user/age": 2, "user/gender": 1, "user/occupation": 4,
          "hist_item_id": rng.integers(0, NUM_ITEMS, seq_len)}
  ids = jnp.asarray(rng.integers(0, NUM_ITEMS, n), jnp.int32)
  for variant in ("dmf", "dmf_early_fusion"):
    model = registry.build_model(dataclasses.replace(cfg, name=variant), schema, rngs=nnx.Rngs(0),
                                 catalog=catalog)
    server = serving.Server(model)
    feats = server.user_features(user)
    state = server.encode_fn(server.params, feats)
    graphdef = server.graphdef
    score = lambda p, s, i: nnx.merge(graphdef, p).score(s, i[None])[0]
    flops, nbytes = cost(score, server.params, state, ids)
    seconds = median_s(score, server.params, state, ids)
    out[f"{variant}_model_score"] = {
        "flops_per_candidate": flops / n, "bytes_per_candidate": nbytes / n,
        "seconds_per_request": seconds, "achieved_gflop_per_s": flops / seconds / 1e9,
        "achieved_gb_per_s": nbytes / seconds / 1e9}
    print(variant, json.dumps(out[f"{variant}_model_score"]), flush=True)

  out["train_steps"] = train_rooflines(_TRAIN_MODELS.value, _TRAIN_BATCH.value,
                                       out["machine"], rng)
  with open(_OUTPUT.value, "w") as f:
    json.dump(out, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
