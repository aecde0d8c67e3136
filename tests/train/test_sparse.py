"""Row-sparse (lazy) table updates: equal to optax when every row is looked up, untouched rows
kept, the same train step as the dense one on its first step, on a sharded mesh, phases, and
an exact resume."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dmf_jax.models import registry
from dmf_jax.train import checkpointing
from dmf_jax.train import experiment
from dmf_jax.train import loop
from dmf_jax.train import sparse
from dmf_jax.train import steps as training
from dmf_jax.train.optimizers import OptimizerConfig, make_optimizer
from helpers import one_device_and_mesh_runs, tiny_problem, tiny_train_config

V, D = 7, 3
DENSE = {"adam": optax.adam, "adagrad": optax.adagrad,
         "sgd": lambda lr: optax.sgd(lr, momentum=0.9)}


def toy_params(rng):
  return nnx.State({"items": {"embedding": nnx.Param(jnp.asarray(rng.normal(size=(V, D)),
                                                                   jnp.float32))},
                    "w": nnx.Param(jnp.ones((2,)))})


def table(params):
  return np.asarray(params["items"]["embedding"][...])


def moments(state):
  return {k: np.asarray(v["items"]["embedding"][...]) for k, v in state.rows.items()}


@pytest.mark.parametrize("kind", sorted(DENSE))
def test_lazy_update_equals_the_dense_optimizer_when_every_row_is_looked_up(kind):
  """Each step looks every row up (some twice, in shuffled order): the summed per-lookup
  gradients and the lazy update give optax's dense update, step after step."""
  rng = np.random.default_rng(0)
  params = toy_params(rng)
  lazy = sparse.RowSparse(optax.identity(), 5, kind, optax.constant_schedule(0.05))
  state = lazy.init(params)
  _, tables = lazy.split(params)
  dense_tx = DENSE[kind](0.05)
  dense_table = jnp.asarray(table(params))
  dense_state = dense_tx.init(dense_table)
  for _ in range(4):
    ids = rng.permutation(np.concatenate([np.arange(V), rng.integers(0, V, 5)]))
    grads = rng.normal(size=(len(ids), D)).astype(np.float32)
    row_grads = np.zeros((V, D), np.float32)
    np.add.at(row_grads, ids, grads)
    tables, state = lazy.apply_rows(tables, state, {"items/embedding": (jnp.asarray(ids),
                                                                        jnp.asarray(grads))})
    updates, dense_state = dense_tx.update(jnp.asarray(row_grads), dense_state, dense_table)
    dense_table = optax.apply_updates(dense_table, updates)
    np.testing.assert_allclose(table(tables), np.asarray(dense_table), rtol=1e-5, atol=1e-6)
  assert int(state.count) == 4


def test_rows_not_looked_up_keep_their_values_and_moments():
  rng = np.random.default_rng(1)
  lazy = sparse.RowSparse(optax.identity(), 5, "adam", optax.constant_schedule(0.1))
  params = toy_params(rng)
  state = lazy.init(params)
  _, tables = lazy.split(params)
  all_rows = jnp.arange(V)
  tables, state = lazy.apply_rows(tables, state, {"items/embedding": (
      all_rows, jnp.asarray(rng.normal(size=(V, D)), jnp.float32))})
  before, before_moments = table(tables), moments(state)
  touched = jnp.asarray([4, 1, 4])
  tables, state = lazy.apply_rows(tables, state, {"items/embedding": (
      touched, jnp.asarray(rng.normal(size=(3, D)), jnp.float32))})
  after, after_moments = table(tables), moments(state)
  kept = [r for r in range(V) if r not in (1, 4)]
  np.testing.assert_array_equal(after[kept], before[kept])
  for name in ("m", "v"):
    np.testing.assert_array_equal(after_moments[name][kept], before_moments[name][kept])
    assert not np.allclose(after_moments[name][[1, 4]], before_moments[name][[1, 4]])
  assert not np.allclose(after[[1, 4]], before[[1, 4]])


def test_only_tables_of_min_rows_are_row_sparse():
  params = toy_params(np.random.default_rng(2))
  dense, tables = sparse.split(params, V)
  assert [p for p, _ in tables.flat_state()] == [("items", "embedding")]
  assert [p for p, _ in dense.flat_state()] == [("w",)]
  assert not list(sparse.split(params, V + 1)[1].flat_state())
  joined = sparse.join(dense, tables)
  assert [p for p, _ in joined.flat_state()] == [p for p, _ in params.flat_state()]
  with pytest.raises(ValueError, match="row-sparse updates support"):
    sparse.RowSparse(optax.identity(), 1, "lamb", optax.constant_schedule(1.0))


def dmf_state(tx, name="dmf"):
  schema, catalog, splits = tiny_problem()
  model = registry.build_model({"name": name, "num_heads": 2, "head_dim": 8, "make_hidden": (16,),
                              "qformer_width": 16, "content_dim": 8, "contrastive_dim": 8},
                             schema, rngs=nnx.Rngs(0), catalog=catalog)
  graphdef, state = training.create_train_state(model, tx)
  return graphdef, state, splits["train"]


def flat_params(state):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in state.params.flat_state()}


def test_sparse_train_step_equals_the_dense_one_on_its_first_step_then_trains():
  """Adam's first step moves no row that has no gradient, so one lazy step equals one dense
  step for every parameter; later steps differ only at rows not looked up."""
  outs = {}
  for min_rows in (0, 1):
    tx = make_optimizer(OptimizerConfig(learning_rate=3e-3, sparse_min_rows=min_rows), 10)
    graphdef, state, train = dmf_state(tx)
    step = training.make_train_step(graphdef, tx)
    batch = {k: v[:64] for k, v in train.items()}
    state, _ = step(state, batch)
    outs[min_rows] = flat_params(state)
    if min_rows:
      assert isinstance(state.opt_state, sparse.RowSparseState)
      assert state.opt_state.rows["m"]["items"]["item_id"]["table"]["embedding"].shape == (
          state.params["items"]["item_id"]["table"]["embedding"].shape)
      losses = []
      for i in range(1, 30):
        state, out = step(state, {k: v[(i % 8) * 64:(i % 8 + 1) * 64] for k, v in train.items()})
        losses.append(float(out["loss"]))
      assert np.mean(losses[-5:]) < np.mean(losses[:5])
  assert outs[0].keys() == outs[1].keys()
  for path in outs[0]:
    np.testing.assert_allclose(outs[1][path], outs[0][path], rtol=1e-5, atol=1e-7,
                               err_msg=path)


def test_sparse_tables_sharded_on_model_axis_match_one_device():
  runs = one_device_and_mesh_runs(
      lambda: make_optimizer(OptimizerConfig(learning_rate=3e-3, sparse_min_rows=1), 8))
  tables = {}
  for name, (_, state, _) in runs.items():
    item_table = state.params["items"]["item_id"]["table"]["embedding"][...]
    tables[name] = np.asarray(item_table)
    moment = state.opt_state.rows["v"]["items"]["item_id"]["table"]["embedding"][...]
    assert moment.sharding.spec == item_table.sharding.spec  # moments follow the table
    if name == "4x2 mesh":
      assert item_table.sharding.spec == jax.sharding.PartitionSpec("model", None)
  np.testing.assert_allclose(runs["4x2 mesh"][2], runs["1 device"][2], rtol=2e-5)
  rows = len(tables["1 device"])  # the mesh pads the rows to a multiple of its 2 shards
  np.testing.assert_allclose(tables["4x2 mesh"][:rows], tables["1 device"], rtol=1e-4, atol=1e-6)


def test_a_phase_that_freezes_a_table_leaves_it_and_its_moments():
  """MAKE's pre-training phase trains only its `mm` module: after a main step (moments set),
  a pre-training step leaves the row-sparse id tables and their moments as they were."""
  tx = make_optimizer(OptimizerConfig(learning_rate=3e-3, sparse_min_rows=1), 10)
  graphdef, state, train = dmf_state(tx, name="make")
  state, _ = training.make_train_step(graphdef, tx, phase="main")(
      state, {k: v[64:128] for k, v in train.items()})
  before, before_rows = flat_params(state), jax.tree.map(np.asarray, state.opt_state.rows)
  step = training.make_train_step(graphdef, tx, phase="pretrain")
  state, _ = step(state, {k: v[:64] for k, v in train.items()})
  after = flat_params(state)
  frozen = [p for p in before if not p.startswith("mm/") and p.endswith("embedding")]
  assert frozen
  for path in frozen:
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.opt_state.rows),
               before_rows)
  assert any(not np.array_equal(after[p], before[p]) for p in before if p.startswith("mm/"))


def test_sparse_run_resumes_exactly(tmp_path):
  """A run stopped at step 20 and resumed to 40 ends where the straight 40-step run does."""
  data_dir = tmp_path / "data"

  def train(workdir, steps):
    config = tiny_train_config(data_dir, num_train_steps=steps)
    config.optimizer.sparse_min_rows = 1
    return config, loop.train_and_evaluate(config, str(workdir))

  config, straight = train(tmp_path / "straight", 40)
  train(tmp_path / "resumed", 20)
  _, resumed = train(tmp_path / "resumed", 40)
  assert resumed["test"] == straight["test"]
  exp = experiment.build_experiment(config)
  abstract = exp.partitioner.abstract_state(exp.shardings, exp.state)
  assert isinstance(exp.state.opt_state, sparse.RowSparseState)
  finals = []
  for workdir in ("straight", "resumed"):
    manager = checkpointing.CheckpointManager(pathlib.Path(tmp_path / workdir) / "checkpoints",
                                              every_steps=10)
    finals.append(manager.restore(40, abstract,
                                  catalog=checkpointing.catalog_of(exp.state)).state)
  leaves = [jax.tree.leaves(s) for s in finals]
  assert len(leaves[0]) == len(leaves[1]) > 10
  for x, y in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
