"""The parameters' moving average (`optimizer.ema_decay`, `train.steps.TrainState.ema`): the
bias-corrected average of the trained parameters against a float64 reference, training itself
unchanged, evaluation, checkpoints, restores and serving reading the average, exact resumes,
and a state without it holding the same leaves as before."""

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dmf_jax.models import registry
from dmf_jax.serve.server import Server
from dmf_jax.train import config as config_lib
from dmf_jax.train import experiment
from dmf_jax.train import loop
from dmf_jax.train import memory
from dmf_jax.train import restore
from dmf_jax.train import steps as training
from dmf_jax.train import warm_start
from dmf_jax.train.optimizers import OptimizerConfig
from helpers import batches, tiny_problem, tiny_train_config

DECAY = 0.8


def dmf(seed=0):
  schema, catalog, _ = tiny_problem()
  return registry.build_model({"name": "dmf", "mlp_hidden": (16,), "dropout": 0.1}, schema,
                              rngs=nnx.Rngs(seed), catalog=catalog)


def leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_the_average_is_the_bias_corrected_moving_average_and_training_is_unchanged():
  _, _, splits = tiny_problem()
  tx = optax.adam(3e-2)
  graphdef, plain = training.create_train_state(dmf(), tx, seed=3)
  _, state = training.create_train_state(dmf(), tx, seed=3, ema_decay=DECAY)
  assert type(plain) is training.TrainState and state.ema_decay == DECAY
  step = training.make_train_step(graphdef, tx)
  trained = []  # the params after steps 1..T, float64
  for batch in itertools.islice(batches(splits["train"], 32), 6):
    plain, _ = step(plain, batch)
    state, _ = step(state, batch)
    trained.append(leaves64(state.params))
    # The average changes no training value: the params are those of the plain state.
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain.params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    t = len(trained)
    weights = [(1 - DECAY) * DECAY ** (t - s) for s in range(1, t + 1)]
    want = [sum(w * p[i] for w, p in zip(weights, trained)) / (1 - DECAY ** t)
            for i in range(len(trained[0]))]
    got = leaves64(state.ema)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)
  # After several steps the average is not the last params (the test can tell them apart).
  assert max(np.max(np.abs(g - p)) for g, p in zip(leaves64(state.ema), trained[-1])) > 1e-3


def test_predictions_and_serving_use_the_average():
  _, _, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in next(batches(splits["validation"], 16)).items()}
  graphdef, state = training.create_train_state(dmf(), optax.sgd(0.1), ema_decay=DECAY)
  other = nnx.split(dmf(seed=5), nnx.Param, ...)[1]  # another model's weights as the average
  state = dataclasses.replace(state, ema=other)
  got = training.make_predict_step(graphdef)(state, batch)
  averaged = nnx.merge(graphdef, other, state.rest)(batch, train=False)
  trained = nnx.merge(graphdef, state.params, state.rest)(batch, train=False)
  np.testing.assert_allclose(got, averaged, rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(np.asarray(got) - np.asarray(trained))) > 1e-3
  served = Server.from_train_state(graphdef, state)
  leaves = jax.tree.leaves(nnx.state(nnx.merge(served.graphdef, served.params), nnx.Param))
  for a, b in zip(leaves, jax.tree.leaves(other)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_without_an_average_the_state_is_the_pytree_it_was():
  """A run without an average saves and reads the checkpoints it did before the average
  existed: the same five fields, in the same order (the saved tree's names)."""
  tx = optax.adam(1e-3)
  _, state = training.create_train_state(dmf(), tx)
  assert type(state) is training.TrainState
  assert [f.name for f in dataclasses.fields(state)] == [
      "step", "rng", "params", "opt_state", "rest"]
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  parts = (state.step, state.rng, state.params, state.opt_state, state.rest)
  assert len(paths) == len(jax.tree.leaves(parts))
  _, averaged = training.create_train_state(dmf(), tx, ema_decay=DECAY)
  extra = len(jax.tree.leaves(averaged)) - len(paths)
  assert extra == len(jax.tree.leaves(state.params))
  # The average counts with the optimizer's state in the memory report.
  plain, with_ema = memory.per_device_summary(state), memory.per_device_summary(averaged)
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
  assert with_ema["optimizer"] - plain["optimizer"] == params_bytes
  assert with_ema["other"] == plain["other"]


@pytest.mark.parametrize("values, culprit", [
    (dict(ema_decay=1.0), "optimizer.ema_decay must be in [0, 1), got 1.0"),
    (dict(ema_decay=-0.1), "optimizer.ema_decay must be in [0, 1)"),
    (dict(ema_decay="0.9"), "optimizer.ema_decay must be in [0, 1)"),
    (dict(ema_decay=0.9, sparse_min_rows=10), "ema_decay cannot be used with sparse_min_rows"),
])
def test_bad_decays_are_refused_by_name(values, culprit):
  with pytest.raises(ValueError, match=re.escape(culprit)):
    OptimizerConfig(**values)


def test_a_run_with_an_average_evaluates_it_and_resumes_exactly(tmp_path):
  """A run stopped at step 20 and resumed to 40 ends where the straight 40-step run does;
  its results, `evaluate_checkpoint`, `restore_run` and a warm start read the average."""
  data_dir = tmp_path / "data"

  def run(workdir, steps, decay=DECAY):
    config = tiny_train_config(data_dir, num_train_steps=steps)
    config.optimizer.ema_decay = decay
    return config, loop.train_and_evaluate(config, str(tmp_path / workdir))

  config, straight = run("straight", 40)
  run("resumed", 20)
  _, resumed = run("resumed", 40)
  assert resumed["test"] == straight["test"] and resumed["best_step"] == straight["best_step"]
  _, plain = run("plain", 40, decay=0.0)
  assert plain["test"]["auc"] != straight["test"]["auc"]  # the average is what was evaluated
  got = loop.evaluate_checkpoint(str(tmp_path / "straight"), "test")
  np.testing.assert_allclose(got["auc"], straight["test"]["auc"], rtol=1e-9)
  restored = restore.restore_run(tmp_path / "straight")
  assert isinstance(restored.state, training.AveragedTrainState)
  assert restored.step == straight["best_step"]
  model_params = jax.tree.leaves(nnx.state(restored.model(), nnx.Param))
  for a, b in zip(model_params, jax.tree.leaves(restored.state.ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A warm start carries the trained parameters; its average starts as them.
  exp = experiment.build_experiment(config)
  state = warm_start.warm_start(exp, str(tmp_path / "straight"), optimizer_state=False,
                                log=lambda *_: None)
  for a, b, c in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.ema),
                     jax.tree.leaves(restored.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    np.testing.assert_array_equal(np.asarray(b), np.asarray(c))


def test_the_decay_is_a_validated_config_field(tmp_path):
  config = tiny_train_config(tmp_path / "data")
  config.optimizer.ema_decay = 1.5
  with pytest.raises(config_lib.ConfigError, match=r"optimizer: optimizer.ema_decay must be"):
    config_lib.validate(config, num_devices=1)


def test_a_run_recorded_before_the_average_existed_still_resumes(tmp_path):
  """Its recorded config has no `optimizer.ema_decay`: at 0 the field is not part of a run's
  identity (`runs.ADDED_FIELDS`), and a decay > 0 is."""
  from dmf_jax.train import runs  # pylint: disable=g-import-not-at-top

  config = tiny_train_config(tmp_path / "data")
  recorded = runs._flatten(config.to_dict())  # pylint: disable=protected-access
  del recorded["optimizer.ema_decay"]
  older = runs._identity_fields(recorded)  # pylint: disable=protected-access
  now = runs._identity_fields(runs._flatten(config.to_dict()))  # pylint: disable=protected-access
  assert runs.differences(older, now) == []
  config.optimizer.ema_decay = 0.99
  averaged = runs._identity_fields(runs._flatten(config.to_dict()))  # pylint: disable=protected-access
  assert runs.differences(older, averaged) == [
      "optimizer.ema_decay: '<unset>' in the workdir, 0.99 now"]
