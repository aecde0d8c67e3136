"""The catalog and embedding tables row-sharded over 'model': values as on one device, 1/S of
the bytes per device (8 fake CPU devices, see conftest.py)."""

import dataclasses

import jax
import numpy as np
import optax

from dmf_jax.data import synthetic
from dmf_jax.models import registry
from dmf_jax.train import memory
from dmf_jax.train import partitioner as pt
from helpers import TINY

# 1,000 items, so the row padding to a multiple of 8 is negligible; no pairwise matrix (it is
# replicated, and only kept for small catalogs).
PROBLEM = dataclasses.replace(TINY, num_items=1000)
MODEL = {"name": "dmf", "num_heads": 2, "head_dim": 8, "pairwise_similarity_max_items": 0}


def init(partitioner, schema, catalog, **overrides):
  factory = lambda rules, rngs: registry.build_model({**MODEL, **overrides}, schema, rngs=rngs,
                                                     sharding=rules)
  tx = optax.adam(1e-3)
  graphdef, state, shardings = partitioner.init(factory, tx, seed=0, schema=schema,
                                                catalog=catalog)
  return graphdef, state, shardings, tx


def test_model_axis_of_8_holds_an_eighth_of_tables_and_catalog_per_device():
  schema, catalog, splits = synthetic.make_examples(PROBLEM)
  batch = {k: v[:64] for k, v in splits["train"].items()}
  held, losses = {}, {}
  for name, mesh in (("1 device", None), ("model=8", pt.MeshConfig(model=8))):
    partitioner = (pt.Partitioner(devices=jax.devices()[:1]) if mesh is None
                   else pt.Partitioner(mesh))
    graphdef, state, shardings, tx = init(partitioner, schema, catalog)
    held[name] = memory.per_device_summary(state)
    if mesh is not None:
      vectors = state.rest["catalog"]["modalities"]["text"][...]
      assert vectors.sharding.spec == jax.sharding.PartitionSpec("model", None)
      table = memory.device_bytes(state)
      assert len(table) == 8 and len({d["catalog"] for d in table.values()}) == 1  # even split
    step = partitioner.train_step(graphdef, tx, shardings)
    sharded = partitioner.shard_batch(batch)
    out = []
    for _ in range(3):
      state, metrics = step(state, sharded)
      out.append(float(metrics["loss"]))
    losses[name] = out
  for part in ("tables", "catalog"):
    ratio = held["model=8"][part] / held["1 device"][part]
    assert 0.124 <= ratio < 0.14, (part, ratio, held)
  # The optimizer state of the tables follows them; dense weights stay replicated.
  assert held["model=8"]["dense"] == held["1 device"]["dense"]
  for name, h in held.items():  # Adam: two moments per parameter, sharded like it
    assert abs(h["optimizer"] - 2 * (h["tables"] + h["dense"])) < 0.01 * h["optimizer"], name
  np.testing.assert_allclose(losses["model=8"], losses["1 device"], rtol=2e-5)


def test_bfloat16_vectors_halve_the_catalog_and_score_alike():
  schema, catalog, splits = synthetic.make_examples(PROBLEM)
  partitioner = pt.Partitioner(devices=jax.devices()[:1])
  batch = partitioner.shard_batch({k: v[:64] for k, v in splits["train"].items()})
  logits, held = {}, {}
  for dtype in ("float32", "bfloat16"):
    graphdef, state, shardings, _ = init(partitioner, schema, catalog, vector_dtype=dtype)
    held[dtype] = memory.per_device_summary(state)["catalog"]
    logits[dtype] = np.asarray(partitioner.predict_step(graphdef, shardings)(state, batch))
  vector_bytes = sum(v.nbytes for v in catalog.modalities.values())
  assert held["float32"] - held["bfloat16"] >= 0.49 * vector_bytes
  # Same weights (same seed), vectors rounded to 8 mantissa bits: close, not equal.
  assert 0 < np.abs(logits["float32"] - logits["bfloat16"]).max() < 0.05
