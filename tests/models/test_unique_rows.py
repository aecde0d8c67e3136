"""Batch-unique item rows (the input pipeline's distinct items per data shard): the same logits
and gradients as the per-position path, for every family, on one device and on a mesh; the
training loop sends them when the catalog is larger than a shard's positions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import assert_same_loss_and_gradients, take, tiny_problem, tiny_train_config
from dmf_jax.core.rows import batch_unique_rows
from dmf_jax.models import registry
from dmf_jax.train import partitioner as pt
from dmf_jax.train import steps as training

SMALL = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
             mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8,
             pairwise_similarity_max_items=0)  # frozen cosines from the vectors, per position


def with_unique_rows(batch, shards, counts=(16, 32, 64)):
  rows = batch_unique_rows(np.asarray(batch["item_id"]), np.asarray(batch["hist_item_id"]),
                           shards, counts=counts)
  return batch | {k: jnp.asarray(v) for k, v in rows.items()}


@pytest.mark.parametrize("name", ["din", "dmf", "dmf_early_fusion", "bst", "dien", "em3",
                                  "make", "simtier", "din_mm_concat"])
@pytest.mark.parametrize("examples,shards", [(4, 1), (40, 4)])
def test_unique_rows_equal_the_per_position_path(name, examples, shards):
  schema, catalog, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(examples)).items()}
  unique = with_unique_rows(batch, shards)
  assert unique["unique_items"].shape[1] < schema.num_items + 1  # the unique path is taken
  model = registry.build_model({"name": name, **SMALL}, schema, rngs=nnx.Rngs(0), catalog=catalog)
  assert_same_loss_and_gradients(model, batch, unique)
  graphdef, params, rest = training.split_model(model)
  # the logits themselves, and a catalog larger than U but smaller than the positions
  np.testing.assert_allclose(jax.jit(lambda p, b: nnx.merge(graphdef, p, rest)(b))(params, unique),
                             jax.jit(lambda p, b: nnx.merge(graphdef, p, rest)(b))(params, batch),
                             rtol=1e-5, atol=1e-6)


def test_out_of_range_unique_ids_are_refused_eagerly():
  schema, catalog, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(4)).items()}
  unique = with_unique_rows(batch, 1)
  unique["unique_items"] = unique["unique_items"].at[0, 0].set(schema.num_items)
  model = registry.build_model({"name": "dmf", **SMALL}, schema, rngs=nnx.Rngs(0), catalog=catalog)
  with pytest.raises(ValueError, match=r"unique_items.\]: id 90 at index \(0, 0\) is out of range"):
    model(unique)


def test_unique_rows_on_a_mesh_train_like_per_position_rows():
  """4x2 ('data', 'model') mesh: unique_items [4, U] split over 'data', each device gathering
  its own rows; three train steps from the same init give the same losses and parameters."""
  schema, catalog, splits = tiny_problem()
  factory = lambda rules, rngs: registry.build_model({"name": "dmf", **SMALL}, schema, rngs=rngs,
                                                     sharding=rules)
  partitioner = pt.Partitioner(pt.MeshConfig(model=2))
  assert partitioner.data_size == 4
  results = {}
  for unique in (False, True):
    tx = optax.adam(1e-2)
    graphdef, state, shardings = partitioner.init(factory, tx, seed=0, schema=schema,
                                                  catalog=catalog)
    step = partitioner.train_step(graphdef, tx, shardings)
    losses = []
    for i in range(3):
      local = {k: v[i * 16:(i + 1) * 16] for k, v in splits["train"].items()}
      if unique:
        local |= batch_unique_rows(local["item_id"], local["hist_item_id"], 4, counts=(16, 64))
        assert local["unique_items"].shape[1] < schema.num_items + 1
      batch = partitioner.shard_batch(local)
      state, out = step(state, batch)
      losses.append(float(out["loss"]))
    results[unique] = (losses, jax.device_get(state.params))
  np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[False][1]), jax.tree.leaves(results[True][1])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_the_loop_sends_unique_rows_only_when_the_catalog_exceeds_a_shards_positions(tmp_path):
  from dmf_jax.train import experiment  # pylint: disable=g-import-not-at-top

  big = experiment.build_experiment(tiny_train_config(tmp_path, batch_size=32))
  # tiny: 120 items, L = 12; 8 data shards (the suite's fake devices): 4 examples a shard
  # hold 52 positions, fewer than the 121 catalog rows
  shards = big.partitioner.data_size
  assert shards == 8 and big.unique_row_shards == shards
  batch = big.train_dataset()[0]
  assert batch["unique_items"].shape[0] == shards
  assert set(big.to_model_batch(batch)) >= {"unique_items", "item_row", "hist_item_row"}
  small = experiment.build_experiment(tiny_train_config(tmp_path, batch_size=80))  # 130 > 121
  assert small.unique_row_shards == 0 and "unique_items" not in small.train_dataset()[0]



def test_a_row_sparse_step_sees_each_distinct_item_once(monkeypatch):
  """In a forward over unique rows the history's and the targets' tokens are encoded once
  (`CTRModel.item_tokens`): the row-sparse update gets one lookup of the item-id table, of
  the U rows of each shard, instead of one per side, and two steps give the same parameters
  as with the two sides encoded apart (the same looked-up rows, their gradients summed)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  from dmf_jax.models import base  # pylint: disable=g-import-not-at-top
  from dmf_jax.nn import embedding  # pylint: disable=g-import-not-at-top
  from dmf_jax.train import optimizers  # pylint: disable=g-import-not-at-top

  schema, catalog, splits = tiny_problem()
  lookup, seen = embedding.RowProbes.lookup, []
  monkeypatch.setattr(embedding.RowProbes, "lookup", lambda self, table, rows: (
      seen.append((table.name, rows.shape)), lookup(self, table, rows))[1])
  params = {}
  for once in (True, False):
    if not once:
      monkeypatch.setattr(base, "_encoded_once", contextlib.nullcontext)
    model = registry.build_model({"name": "dmf", **SMALL}, schema, rngs=nnx.Rngs(0),
                                 catalog=catalog)
    tx = optimizers.make_optimizer(
        optimizers.OptimizerConfig(learning_rate=3e-3, sparse_min_rows=1), 10)
    graphdef, state = training.create_train_state(model, tx)
    step, seen[:] = training.make_train_step(graphdef, tx), []
    for i in range(2):
      batch = {k: jnp.asarray(v[i * 8:(i + 1) * 8]) for k, v in splits["train"].items()}
      batch = with_unique_rows(batch, 2)
      assert batch["unique_items"].shape[1] < schema.num_items + 1  # the unique path is taken
      state, _ = step(state, batch)
    item_lookups = [shape for name, shape in seen if name == "item_id"]
    traces = sum(name == "user_id" for name, _ in seen)  # one user lookup per trace
    u = batch["unique_items"].shape[1]
    assert traces and item_lookups == [(2 * u,)] * (1 if once else 2) * traces, seen
    params[once] = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(params[False]), jax.tree.leaves(params[True])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_dien_auxiliary_loss_over_unique_rows_equals_the_per_position_one(monkeypatch):
  """DIEN's negatives over unique rows: the distinct items shifted by the batch's offset,
  encoded once each; the auxiliary loss, the whole training loss (BCE + auxiliary, targets
  among the unique rows) and their gradients equal the per-position path's."""
  schema, catalog, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(40)).items()}
  unique = with_unique_rows(batch, 4)
  assert unique["unique_items"].shape[1] < schema.num_items + 1
  model = registry.build_model({"name": "dien", **SMALL}, schema, rngs=nnx.Rngs(0),
                               catalog=catalog)
  aux, params, want = assert_same_loss_and_gradients(
      model, batch, unique,
      lambda m, b: m.auxiliary_loss(b, m.encode_user(b), offset=jnp.int32(37)))
  assert float(want) > 0
  # BCE + the weighted auxiliary loss, the offset drawn from one seed
  assert_same_loss_and_gradients(
      model, batch, unique, lambda m, b: m.training_loss(b, rngs=nnx.Rngs(sample=3))[0])
  negatives = []  # the unique path encodes [S, U] shifted rows, not B x (L - 1) positions
  orig = type(model).item_tokens
  monkeypatch.setattr(type(model), "item_tokens", lambda self, rows, **kw: (
      negatives.append(rows), orig(self, rows, **kw))[1])
  jax.eval_shape(aux, params, unique)
  assert negatives[-1].values.shape == unique["unique_items"].shape
