r"""Serving throughput of DTA against early fusion: the attention layer alone and the whole model.

  python -m experiments.benchmark_serving --candidates=1,10,100,1200,5000 --seq_len=50,200,1000 \
      --output_json=/tmp/serving.json

The model has the dimensions of experiments/configs/movielens.py on the MovieLens text_image
schema (1,682 items; text 384-d, image 1,280-d; ID width 56) with a random catalog and random
weights (speed does not depend on their values). One request = encode_user once + score N
candidates (DTA), or early fusion's per-candidate keys and values. Early fusion is scored in
chunks of at most `--ef_chunk_elems` (candidate x behaviour) pairs to bound its memory.
Reported per (variant, scope, N, L): requests/s and candidates/s from the median latency, and
p50/p99 latency over many repetitions after warm-up. Writes FILE and FILE's .png twin.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from dmf_jax.data.movielens import FIELD_DIM, ID_DIM
from dmf_jax.models import registry
from dmf_jax.serve import server as serving
from dmf_jax.nn.attention import DecoupledTargetAttention, EarlyFusionTargetAttention
from dmf_jax import cli
from experiments import bench_utils
from experiments.bench_utils import NUM_ITEMS, movielens_like_schema, random_catalog
from experiments.configs import movielens

_CANDIDATES = flags.DEFINE_list("candidates", ["1", "10", "100", "1200", "5000"], "N values.")
_SEQ_LEN = flags.DEFINE_list("seq_len", ["50", "200", "1000"], "L values.")
_SCOPES = flags.DEFINE_list("scopes", ["attention", "model"], "What to time.")
_OUTPUT = flags.DEFINE_string("output_json", "/tmp/benchmark_serving.json", "Records file.")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --output_json.")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 0.5, "Timing budget per measurement.")
_EF_CHUNK = flags.DEFINE_integer("ef_chunk_elems", 2_000_000, "Early-fusion chunk (N x L).")

def record(variant, scope, n, seq_len, times):
  p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
  return {"variant": variant, "scope": scope, "candidates": n, "seq_len": seq_len,
          "requests_per_s": 1.0 / p50, "candidates_per_s": n / p50,
          "p50_ms": 1e3 * p50, "p99_ms": 1e3 * p99, "repetitions": len(times)}


def chunks(n, seq_len):
  size = max(1, min(n, _EF_CHUNK.value // seq_len))
  return [(s, min(size, n - s)) for s in range(0, n, size)]


def bench_attention(cfg, seq_len, ns, rng):
  ef = EarlyFusionTargetAttention(id_dim=ID_DIM + 3 * FIELD_DIM, num_buckets=cfg.num_buckets,
                                  bucket_dim=cfg.bucket_dim, num_modalities=2,
                                  num_heads=cfg.num_heads, head_dim=cfg.head_dim, rngs=nnx.Rngs(0))
  dta = DecoupledTargetAttention.from_early_fusion(ef)
  d = ef.weights.id_dim
  gd, gs = nnx.split(dta)
  ed, es = nnx.split(ef)
  # The attention interface with one user (B = 1) and N candidates.
  encode = jax.jit(lambda s, e, m: nnx.merge(gd, s).encode_user(e[None], m[None]))
  score = jax.jit(lambda s, u, t, b: nnx.merge(gd, s).attend(u, t[None], b[None])[0])

  @jax.jit
  def ef_score(s, e, m, t, b):
    ef = nnx.merge(ed, s)
    return ef.attend(ef.encode_user(e[None], m[None]), t[None], b[None])[0]

  behaviors = jnp.asarray(rng.normal(size=(seq_len, d)), jnp.float32)
  mask = jnp.ones(seq_len, bool)
  out = []
  for n in ns:
    targets = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    buckets = jnp.asarray(rng.integers(0, cfg.num_buckets, (n, seq_len, 2)), jnp.int32)
    dta_fn = lambda: score(gs, encode(gs, behaviors, mask), targets, buckets)
    parts = chunks(n, seq_len)
    ef_fn = lambda: [ef_score(es, behaviors, mask, targets[s:s + c], buckets[s:s + c])
                     for s, c in parts]
    out.append(record("dta", "attention", n, seq_len, bench_utils.time_calls(dta_fn, min_seconds=_MIN_SECONDS.value)))
    out.append(record("early_fusion", "attention", n, seq_len, bench_utils.time_calls(ef_fn, min_seconds=_MIN_SECONDS.value)))
    print(json.dumps(out[-2]), json.dumps(out[-1]), sep="\n", flush=True)
  return out


def bench_model(cfg, seq_len, ns, rng):
  schema = movielens_like_schema(seq_len)
  catalog = random_catalog(schema, rng)
  dmf = registry.build_model(cfg, schema, rngs=nnx.Rngs(0), catalog=catalog)
  ef = registry.build_model(dataclasses.replace(cfg, name="dmf_early_fusion"), schema,
                            rngs=nnx.Rngs(0), catalog=catalog)
  servers = {"dta": serving.Server(dmf), "early_fusion": serving.Server(ef)}
  user = {"user/user_id": 3, "user/age": 2, "user/gender": 1, "user/occupation": 4,
          "hist_item_id": rng.integers(0, NUM_ITEMS, seq_len)}
  out = []
  for n in ns:
    ids = jnp.asarray(rng.integers(0, NUM_ITEMS, n), jnp.int32)
    for variant, server in servers.items():
      feats = server.user_features(user)
      parts = chunks(n, seq_len) if variant == "early_fusion" else [(0, n)]
      fn = lambda: [server.score_fn(server.params, server.encode_fn(server.params, feats),
                                    ids[s:s + c]) for s, c in parts]
      out.append(record(variant, "model", n, seq_len,
                        bench_utils.time_calls(fn, min_seconds=_MIN_SECONDS.value)))
      print(json.dumps(out[-1]), flush=True)
  return out


def plot(records, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  scopes = sorted({r["scope"] for r in records})
  fig, axes = plt.subplots(1, len(scopes), figsize=(6 * len(scopes), 4.2), squeeze=False)
  for ax, scope in zip(axes[0], scopes):
    for seq_len in sorted({r["seq_len"] for r in records}):
      for variant, style in (("dta", "-o"), ("early_fusion", "--s")):
        rows = sorted((r["candidates"], r["candidates_per_s"]) for r in records
                      if r["scope"] == scope and r["seq_len"] == seq_len and r["variant"] == variant)
        if rows:
          ax.plot(*zip(*rows), style, label=f"{variant}, L={seq_len}")
    ax.set(xscale="log", yscale="log", xlabel="candidates per request (N)",
           ylabel="candidates / s", title=f"{scope}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  cli.refuse_to_replace("output_json", _OUTPUT.value, _FORCE.value)
  cfg = bench_utils.model_config(movielens.get_config(), "dmf")
  ns = [int(n) for n in _CANDIDATES.value]
  rng = np.random.default_rng(0)
  records = []
  for seq_len in (int(l) for l in _SEQ_LEN.value):
    if "attention" in _SCOPES.value:
      records += bench_attention(cfg, seq_len, ns, rng)
    if "model" in _SCOPES.value:
      records += bench_model(cfg, seq_len, ns, rng)
  with open(_OUTPUT.value, "w") as f:
    json.dump(records, f, indent=2)
  plot(records, _OUTPUT.value.rsplit(".", 1)[0] + ".png")
  print(f"\n{'scope':<10}{'L':>6}{'N':>6}{'DTA cand/s':>13}{'EF cand/s':>12}{'ratio':>7}")
  for r in records:
    if r["variant"] != "dta":
      continue
    ef = next(e for e in records if e["variant"] == "early_fusion" and e["scope"] == r["scope"]
              and e["seq_len"] == r["seq_len"] and e["candidates"] == r["candidates"])
    print(f"{r['scope']:<10}{r['seq_len']:>6}{r['candidates']:>6}{r['candidates_per_s']:>13,.0f}"
          f"{ef['candidates_per_s']:>12,.0f}{r['candidates_per_s'] / ef['candidates_per_s']:>7.1f}")


if __name__ == "__main__":
  cli.run(main)
