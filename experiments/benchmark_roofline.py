r"""Roofline figures: the machine's matmul FLOP/s and memory bandwidth, and XLA's FLOPs and bytes
per candidate (DTA vs early fusion, MovieLens model dimensions) and per training example.

  python -m experiments.benchmark_roofline --seq_len=200 --candidates=1200 --output_json=/tmp/roof.json
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
from experiments.configs import movielens

_SEQ_LEN = flags.DEFINE_integer("seq_len", 200, "L for the serving figures.")
_CANDIDATES = flags.DEFINE_integer("candidates", 1200, "N for the serving figures.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 512, "Batch for the training figures.")
_OUTPUT = flags.DEFINE_string("output_json", "/tmp/benchmark_roofline.json", "Output file.")


def cost(fn, *args):
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def median_s(fn, *args):
  jitted = jax.jit(fn)
  return float(np.median(bench_utils.time_calls(lambda: jitted(*args), min_seconds=1.0)))


def machine_peaks():
  a = jnp.ones((1024, 1024), jnp.float32)
  matmul_s = median_s(lambda a: a @ a, a)
  big = jnp.ones((64 * 1024 * 1024,), jnp.float32)  # 256 MiB
  copy_s = median_s(lambda x: x * 1.0001, big)
  return {"matmul_gflop_per_s": 2 * 1024 ** 3 / matmul_s / 1e9,
          "memory_gb_per_s": 2 * big.nbytes / copy_s / 1e9}


def main(argv):
  del argv
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

  schema50 = movielens_like_schema(50)
  catalog50 = random_catalog(schema50, rng)
  b = _TRAIN_BATCH.value
  batch = bench_utils.random_batch(schema50, b, rng)
  model = registry.build_model(cfg, schema50, rngs=nnx.Rngs(0), catalog=catalog50)
  state, step = bench_utils.train_setup(model, jit=False)
  flops, nbytes = cost(step, state, batch)
  seconds = median_s(step, state, batch)
  out["dmf_train_step"] = {"batch_size": b, "flops_per_example": flops / b,
                           "bytes_per_example": nbytes / b, "seconds_per_step": seconds,
                           "examples_per_s": b / seconds,
                           "achieved_gflop_per_s": flops / seconds / 1e9,
                           "achieved_gb_per_s": nbytes / seconds / 1e9}
  print("train", json.dumps(out["dmf_train_step"]), flush=True)
  with open(_OUTPUT.value, "w") as f:
    json.dump(out, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
