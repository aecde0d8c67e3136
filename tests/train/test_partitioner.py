"""The partitioner (`train.partitioner`): tables sharded over a ('data', 'model') mesh of 8
fake devices train like one device; every model and head trains on the mesh."""

import jax
import numpy as np
import optax
import pytest

from dmf_jax.models import registry
from dmf_jax.train import partitioner as pt
from dmf_jax.data import synthetic
from helpers import TINY, one_device_and_mesh_runs

SMALL_MODELS = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
                    mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8, modality_token_dim=8,
                    make_hidden=(16,), qformer_width=16, content_dim=8, contrastive_dim=8,
                    contrastive_negatives="sampled", contrastive_num_negatives=16)


def test_tables_sharded_on_model_axis_match_one_device():
  runs = one_device_and_mesh_runs(lambda: optax.adam(3e-3))
  for name, (partitioner, state, _) in runs.items():
    table = state.params["items"]["item_id"]["table"]["embedding"][...]
    if name == "4x2 mesh":
      assert dict(partitioner.mesh.shape) == {"data": 4, "model": 2}
      assert table.sharding.spec == jax.sharding.PartitionSpec("model", None)
      assert len({str(s.index) for s in table.addressable_shards}) == 2  # rows split in two
      adam_mu = state.opt_state[0].mu["items"]["item_id"]["table"]["embedding"][...]
      assert adam_mu.sharding.spec == table.sharding.spec  # optimizer state follows
    else:
      assert table.sharding.spec == jax.sharding.PartitionSpec()
  np.testing.assert_allclose(runs["4x2 mesh"][2], runs["1 device"][2], rtol=2e-5)


@pytest.mark.parametrize("name,head", [(name, "mlp") for name in sorted(registry.MODELS)]
                         + [("din", "dcnv2"), ("dmf", "dcnv2")])
def test_every_model_trains_on_a_sharded_mesh(name, head):
  """Every registered model compiles and trains on a 4x2 ('data', 'model') mesh with explicit
  axes (arrays created inside a model must carry the batch's sharding); MAKE both phases;
  DIN and DMF with the DCNv2 head too."""
  schema, catalog, splits = synthetic.make_examples(TINY)
  config = {"name": name, "head": head, "cross_layers": 2, **SMALL_MODELS}
  factory = lambda rules, rngs: registry.build_model(config, schema, rngs=rngs, sharding=rules)
  partitioner = pt.Partitioner(pt.MeshConfig(model=2))
  tx = optax.adam(3e-3)
  graphdef, state, shardings = partitioner.init(factory, tx, seed=0, schema=schema,
                                                catalog=catalog)
  phases = ("pretrain", "main") if name == "make" else ("main",)
  for phase in phases:
    step = partitioner.train_step(graphdef, tx, shardings, phase)
    for i in range(2):
      batch = partitioner.shard_batch({k: v[i * 32:(i + 1) * 32]
                                       for k, v in splits["train"].items()})
      state, out = step(state, batch)
      assert np.isfinite(float(out["loss"])), (name, phase)
  logits = partitioner.predict_step(graphdef, shardings)(state, batch)
  assert logits.shape == (32,)
  cross = state.params["head"].get("cross") if "head" in state.params else None
  assert (cross is not None and len(cross["up"]) == 2) == (head == "dcnv2")
