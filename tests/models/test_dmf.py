"""DMF (`models.dmf`): it needs a modality; every CMM mode; DTA and early fusion, and the gather
and one-hot lookups, compute the same function (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import jitted, small_model, take, tiny_problem
from dmf_jax.models import registry
from dmf_jax.train import steps as training
from dmf_jax.nn.losses import bce_with_logits


def test_dmf_needs_modalities():
  schema, _, _ = tiny_problem()
  with pytest.raises(ValueError, match="needs at least one modality"):
    registry.build_model({"name": "dmf"}, schema.replace(modalities=()), rngs=nnx.Rngs(0),
                         catalog=None)


@pytest.mark.parametrize("cmm", ["concat", "weighted", "gate"])
def test_forward_shapes_for_every_cmm_mode(cmm):
  _, _, splits = tiny_problem()
  batch = take(splits["train"], np.arange(7))
  logits = small_model("dmf", cmm=cmm, similarity="projected", activation="dice")(batch)
  assert logits.shape == (7,) and np.all(np.isfinite(np.asarray(logits)))


def test_dmf_and_early_fusion_compute_the_same_function():
  _, _, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(40)).items()}
  ef = small_model("dmf_early_fusion")
  dta = small_model("dmf")
  nnx.update(dta, nnx.state(ef))  # identical parameter trees: same weights everywhere
  np.testing.assert_allclose(dta(batch), ef(batch), rtol=1e-5, atol=1e-5)

  def grads(model):
    graphdef, params, rest = training.split_model(model)
    def loss(p):
      return bce_with_logits(nnx.merge(graphdef, p, rest)(batch), batch["label"])
    return jax.grad(loss)(params)

  for (path, a), (_, b) in zip(nnx.to_flat_state(grads(ef)), nnx.to_flat_state(grads(dta))):
    np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), rtol=2e-4, atol=1e-6,
                               err_msg=str(path))


@pytest.mark.parametrize("name", ["dmf", "dmf_no_mc", "simtier"])
def test_one_hot_lookup_modes_compute_the_same_function(name):
  """lookup_mode='one_hot' (TPU's) and 'gather': the same logits and gradients; 'auto' is
  gather on this CPU."""
  _, _, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(40)).items()}
  gather, one_hot = small_model(name, lookup_mode="gather"), small_model(name, lookup_mode="one_hot")
  assert small_model(name).config.lookup_mode == "auto"
  assert (small_model(name).catalog.pairwise_lookup, one_hot.catalog.pairwise_lookup) == (
      "gather", "one_hot") and one_hot.catalog.has_pairwise
  if name != "simtier":
    assert (small_model(name).attention.lookup_mode, one_hot.attention.lookup_mode) == (
        "gather", "one_hot")
  # N candidates per user, as serving scores them
  candidates = jnp.asarray(np.random.default_rng(0).integers(0, 90, (40, 13)), jnp.int32)
  scores = [jitted(m, "score")(jitted(m, "encode_user")(batch), candidates)
            for m in (gather, one_hot)]
  np.testing.assert_allclose(scores[1], scores[0], rtol=1e-5, atol=1e-6)

  def value_and_grads(model):
    graphdef, params, rest = training.split_model(model)
    def loss(p):
      return bce_with_logits(nnx.merge(graphdef, p, rest)(batch), batch["label"])
    return jax.jit(jax.value_and_grad(loss))(params)

  (want, g_want), (got, g_got) = value_and_grads(gather), value_and_grads(one_hot)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g_want), nnx.to_flat_state(g_got)):
    np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), rtol=1e-4, atol=1e-7,
                               err_msg=str(path))
