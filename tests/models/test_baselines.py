"""Baselines: what each one feeds its attention, MAKE's phases, modality selection."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import batches, jitted, take, tiny_problem
from dmf_jax.models import registry
from dmf_jax.train import steps as training
from dmf_jax.core.catalog import ItemCatalog

SMALL = dict(din_hidden=(16,), mlp_hidden=(32, 16), simtier_hidden=(16,), num_tiers=8,
             modality_token_dim=8, make_hidden=(16, 8))


def build(name, schema=None, catalog=None, **overrides):
  tiny_schema, tiny_catalog, _ = tiny_problem()
  return registry.build_model({"name": name, **SMALL, **overrides}, schema or tiny_schema,
                              rngs=nnx.Rngs(0), catalog=catalog or tiny_catalog)


def flat_params(state):
  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("name", ["din_mm_concat", "simscore", "simtier", "make", "bst_mm_concat",
                                  "dien_mm_concat"])
def test_baselines_use_the_modalities(name):
  """Changing only the modality vectors changes the logits (and not for plain DIN)."""
  schema, catalog, splits = tiny_problem()
  batch = take(splits["validation"], np.arange(32))
  rng = np.random.default_rng(5)
  other = ItemCatalog(catalog.side, {k: rng.normal(size=v.shape).astype(np.float32)
                                     for k, v in catalog.modalities.items()})
  a = jitted(build(name, catalog=catalog))(batch)
  b = jitted(build(name, catalog=other))(batch)
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-4
  din_a = jitted(build("din", catalog=catalog))(batch)
  din_b = jitted(build("din", catalog=other))(batch)
  np.testing.assert_array_equal(np.asarray(din_a), np.asarray(din_b))


def test_simscore_tokens_carry_the_similarities():
  """simscore's attention sees [e_j ; s_tj] for behaviours and [e_t ; 1] for the target."""
  _, _, splits = tiny_problem()
  batch = take(splits["validation"], np.arange(16))
  model = build("simscore")
  seen = {}
  original = type(model.attention).attend

  def spy(self, state, query, side=None):
    seen.update(target=query[:, 0], behaviors_side=side[:, 0])
    return original(self, state, query, side)

  type(model.attention).attend = spy
  try:
    model(batch)
  finally:
    type(model.attention).attend = original
  k = len(model.schema.modalities)
  np.testing.assert_allclose(seen["behaviors_side"], model.similarities(batch), atol=1e-6)
  np.testing.assert_array_equal(seen["target"][:, -k:], 1.0)


def make_steps(freeze, pretrain_steps=40, main_steps=15):
  """Runs MAKE's two phases with AdamW; params after each phase, tower loss before/after."""
  _, _, splits = tiny_problem()
  model = build("make", make_freeze=freeze)
  tx = optax.adamw(3e-3, weight_decay=0.1)
  graphdef, state = training.create_train_state(model, tx)
  stream = batches(splits["train"], 64)
  held_out = take(splits["validation"], np.arange(256))

  @jax.jit
  def tower_loss(params, rest):
    return nnx.merge(graphdef, params, rest).training_loss(held_out, phase="pretrain")[0]

  snapshots = [flat_params(state.params)]
  pre_losses = [float(tower_loss(state.params, state.rest))]
  step = training.make_train_step(graphdef, tx, phase="pretrain")
  for _ in range(pretrain_steps):
    state, _ = step(state, next(stream))
  pre_losses.append(float(tower_loss(state.params, state.rest)))
  snapshots.append(flat_params(state.params))
  step = training.make_train_step(graphdef, tx, phase="main")
  for _ in range(main_steps):
    state, _ = step(state, next(stream))
  snapshots.append(flat_params(state.params))
  return snapshots, pre_losses


@pytest.mark.parametrize("freeze", [False, True])
def test_make_pretrains_its_multimodal_tower_then_joins_or_freezes(freeze):
  (init, pretrained, joined), pre_losses = make_steps(freeze)
  assert pre_losses[1] < pre_losses[0] - 0.01, pre_losses
  for path, value in init.items():
    changed_in_pretrain = not np.array_equal(value, pretrained[path])
    changed_in_main = not np.array_equal(pretrained[path], joined[path])
    if path.startswith("mm/"):
      assert changed_in_pretrain, path
      assert changed_in_main != freeze, path  # joint: trained on; frozen: kept exactly
    else:
      assert not changed_in_pretrain, path  # pre-training touches only the tower
      if "bias" not in path or "head" in path:
        assert changed_in_main, path


def test_make_pretrain_epochs_and_phases_in_config():
  config = registry.model_config({"name": "make", "make_pretrain_epochs": 3})
  assert config.pretrain_epochs == 3
  assert registry.model_config({"name": "dmf", "make_pretrain_epochs": 3}).pretrain_epochs == 0
  with pytest.raises(ValueError, match="make_pretrain_epochs must be an int >= 0"):
    registry.model_config({"name": "make", "make_pretrain_epochs": -1})


def test_modality_selection_restricts_schema_and_catalog():
  schema, catalog, splits = tiny_problem()
  names = schema.modality_names
  assert len(names) >= 2
  only = schema.with_modalities([names[1]])
  assert only.modality_names == (names[1],)
  model = build("dmf", schema=only, catalog=catalog.with_modalities([names[1]]))
  assert model.catalog.modalities.keys() == {names[1]}
  assert jitted(model)(take(splits["validation"], np.arange(4))).shape == (4,)
  with pytest.raises(ValueError, match=r"unknown modalities \['audio'\]"):
    schema.with_modalities(["audio"])
  with pytest.raises(ValueError, match="modalities must be a list of names"):
    registry.ModelConfig(modalities="text")
