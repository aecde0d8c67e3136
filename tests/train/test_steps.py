"""The pure steps (`train.steps`): one train step is the optimizer's update of the gradient of
the model's own training loss (values checked against a plain jax.grad + optax update, dropout
keys included), frozen parameters keep their values, and the predict step is the model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dmf_jax.models import registry
from dmf_jax.train import steps as training
from helpers import batches, tiny_problem

SMALL = dict(din_hidden=(16,), mlp_hidden=(32, 16), dropout=0.2)


def din(seed=0):
  schema, catalog, _ = tiny_problem()
  return registry.build_model({"name": "din", **SMALL}, schema, rngs=nnx.Rngs(seed),
                              catalog=catalog)


def test_a_train_step_is_the_optimizer_update_of_the_training_loss_gradient():
  _, _, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in next(batches(splits["train"], 32)).items()}
  tx = optax.adamw(1e-2, weight_decay=1e-3)
  graphdef, state = training.create_train_state(din(), tx, seed=7)
  params0 = jax.tree.map(jnp.copy, state.params)
  step = training.make_train_step(graphdef, tx, jit=False)
  state = jax.tree.map(jnp.copy, state)
  for expected_step in (0, 1):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    params, rest = state.params, state.rest

    def loss(p):
      rngs = nnx.Rngs(dropout=key, sample=jax.random.fold_in(key, 1))
      return nnx.merge(graphdef, p, rest).training_loss(batch, rngs=rngs)[0]

    want_loss, grads = jax.value_and_grad(loss)(params)
    updates, _ = tx.update(grads, state.opt_state, params)
    want = optax.apply_updates(params, updates)
    assert int(state.step) == expected_step
    state, out = step(state, batch)
    np.testing.assert_allclose(out["loss"], want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                 jax.tree.leaves(params0))]
  assert all(moved)  # every parameter learns (weight decay included)


def test_parameters_a_phase_does_not_train_keep_their_values():
  model = din()
  model.is_trainable = lambda phase, path: path[0] != "head"  # e.g. a frozen tower
  _, _, splits = tiny_problem()
  tx = optax.adamw(1e-2, weight_decay=1e-2)
  graphdef, state = training.create_train_state(model, tx)
  before = nnx.to_flat_state(jax.tree.map(jnp.copy, state.params))
  state, _ = training.make_train_step(graphdef, tx, jit=False)(
      state, next(batches(splits["train"], 32)))
  for (path, a), (_, b) in zip(before, nnx.to_flat_state(state.params)):
    same = np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
    assert same == (path[0] == "head"), path


def test_the_predict_step_is_the_model_in_inference_mode():
  model = din()
  _, _, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in next(batches(splits["validation"], 16)).items()}
  graphdef, state = training.create_train_state(model, optax.sgd(0.1))
  got = training.make_predict_step(graphdef)(state, batch)
  np.testing.assert_allclose(got, model(batch, train=False), rtol=1e-6, atol=1e-6)
