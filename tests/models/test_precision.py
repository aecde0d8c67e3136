"""Mixed precision (`compute_dtype='bfloat16'`): the forward in bfloat16, parameters, optimizer
state, logits and losses in float32; DTA == early fusion within bfloat16 tolerance; serving
follows the model's dtype."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import batches, take, tiny_problem, train_steps
from dmf_jax.models import registry
from dmf_jax.nn import precision
from dmf_jax.nn.attention import masked_softmax
from dmf_jax.nn.losses import bce_with_logits
from dmf_jax.serve import server as serving
from dmf_jax.train import steps as training

SMALL = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
             mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8)


def build(name, dtype, **overrides):
  schema, catalog, _ = tiny_problem()
  return registry.build_model({"name": name, **SMALL, "compute_dtype": dtype, **overrides},
                              schema, rngs=nnx.Rngs(0), catalog=catalog)


def compute_call(model):
  """model(batch) under jit, in the model's compute dtype (as the steps and serving run it)."""
  graphdef, state = nnx.split(model)
  call = jax.jit(lambda s, b: precision.to_compute_dtype(
      nnx.merge(graphdef, s), model.config.compute_dtype)(b))
  return lambda batch: call(state, batch)


def validation_batch(n=40):
  _, _, splits = tiny_problem()
  return {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(n)).items()}


def test_masked_softmax_normalises_bfloat16_scores_in_float32():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(4, 30)).astype(np.float32) * 4
  mask = rng.random((4, 30)) < 0.7
  mask[2] = False
  got = masked_softmax(jnp.asarray(scores, jnp.bfloat16), jnp.asarray(mask))
  assert got.dtype == jnp.bfloat16
  s = np.asarray(jnp.asarray(scores, jnp.bfloat16), np.float64)
  peak = np.where(mask, s, -1e30).max(-1, keepdims=True)
  e = np.where(mask, np.exp(np.where(mask, s - peak, 0.0)), 0.0)
  want = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=4e-3)
  assert np.all(np.asarray(got)[2] == 0)


@pytest.mark.parametrize("name", ["din", "dmf", "bst", "dien", "em3"])
def test_bfloat16_forward_runs_its_matmuls_in_bfloat16_and_returns_float32_logits(name):
  model = build(name, "bfloat16")
  batch = validation_batch()
  graphdef, state = nnx.split(model)
  fn = lambda s, b: precision.to_compute_dtype(nnx.merge(graphdef, s), "bfloat16")(b)
  text = jax.jit(fn).trace(state, batch).lower().as_text()
  operands = re.findall(r"stablehlo.dot_general[^\n]*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>",
                        text)
  assert operands and all(a == b == "bf16" for a, b in operands), operands
  logits = jax.jit(fn)(state, batch)
  assert logits.dtype == jnp.float32
  want = compute_call(build(name, "float32"))(batch)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=0.05, rtol=0.05)
  assert not np.allclose(np.asarray(logits), np.asarray(want), atol=1e-6, rtol=0)  # really bf16


def test_dta_equals_early_fusion_in_bfloat16_values_and_gradients():
  batch = validation_batch()
  ef, dta = build("dmf_early_fusion", "bfloat16"), build("dmf", "bfloat16")
  nnx.update(dta, nnx.state(ef))  # identical parameter trees: same weights everywhere
  np.testing.assert_allclose(np.asarray(compute_call(dta)(batch)),
                             np.asarray(compute_call(ef)(batch)), rtol=0.03, atol=0.03)

  def grads(model):
    graphdef, params, rest = training.split_model(model)

    def loss(p):
      m = precision.to_compute_dtype(nnx.merge(graphdef, p, rest), "bfloat16")
      return bce_with_logits(m(batch), batch["label"])
    return jax.jit(jax.grad(loss))(params)

  g_ef, g_dta = nnx.to_flat_state(grads(ef)), nnx.to_flat_state(grads(dta))
  for (path, a), (_, b) in zip(g_ef, g_dta):
    a, b = np.asarray(a[...]), np.asarray(b[...])
    assert a.dtype == b.dtype == np.float32, path  # gradients of the float32 parameters
    scale = max(np.abs(a).max(), 1e-3)
    np.testing.assert_allclose(b, a, atol=0.05 * scale, err_msg=str(path))


def test_bfloat16_training_keeps_float32_state_and_learns():
  graphdef, state, outputs = train_steps(build("dmf", "bfloat16"), 60)
  losses, metrics = [float(o["loss"]) for o in outputs], outputs[-1]
  floats = [x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(d == jnp.float32 for d in floats)
  assert metrics["loss"].dtype == jnp.float32 and np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.03, (losses[:10], losses[-10:])
  logits = training.make_predict_step(graphdef)(state, validation_batch())
  assert logits.dtype == jnp.float32


def test_serving_and_export_follow_the_models_dtype(tmp_path):
  from dmf_jax.serve.export import export  # pylint: disable=g-import-not-at-top
  from dmf_jax.serve.exported import ExportedScorer  # pylint: disable=g-import-not-at-top

  _, _, splits = tiny_problem()
  model = build("dmf", "bfloat16")
  server = serving.Server(model, candidate_sizes=(8, 64))
  params = [x for _, x in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  assert all(p[...].dtype == jnp.float32 for p in params)  # the caller's model is not cast
  served = jax.tree.leaves(server.params)
  assert any(x.dtype == jnp.bfloat16 for x in served)  # cast once, for every request
  split = splits["validation"]
  user = {k: split[k][3] for k in split if k.startswith("user/")}
  user["hist_item_id"] = split["hist_item_id"][3][split["hist_mask"][3]]
  ids = np.arange(30)
  state = server.encode_user(user)
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state))
  got = server.score(state, ids)
  batch = {k: np.repeat(np.asarray(v[3])[None], len(ids), 0) for k, v in split.items()}
  batch["item_id"] = ids.astype(np.int32)
  want = compute_call(model)(batch)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, np.asarray(want), rtol=0.02, atol=0.02)
  export(server, str(tmp_path / "model.dmfx"))
  scorer = ExportedScorer(str(tmp_path / "model.dmfx"))
  exported = scorer.score(scorer.encode_user(user), ids)
  np.testing.assert_allclose(exported, got, rtol=1e-6, atol=1e-6)


def test_bfloat16_with_row_sparse_tables_updates_float32_rows():
  """Row-sparse Adam's tables enter the differentiated function cast like the other Params."""
  from dmf_jax.train import optimizers  # pylint: disable=g-import-not-at-top

  _, _, splits = tiny_problem()
  losses = {}
  for dtype in ("float32", "bfloat16"):
    tx = optimizers.make_optimizer(
        optimizers.OptimizerConfig(learning_rate=3e-3, sparse_min_rows=50), 100)
    graphdef, state = training.create_train_state(build("dmf", dtype), tx)
    before = np.array(state.params["items"]["item_id"]["table"]["embedding"][...])  # donated
    step = training.make_train_step(graphdef, tx)
    stream = batches(splits["train"], 64)
    for _ in range(5):
      state, metrics = step(state, next(stream))
    after = state.params["items"]["item_id"]["table"]["embedding"][...]
    assert after.dtype == jnp.float32 and not np.allclose(after, before)
    losses[dtype] = float(metrics["loss"])
  assert abs(losses["bfloat16"] - losses["float32"]) < 0.02, losses
