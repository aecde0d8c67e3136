"""BST: the paper's formula (the whole sequence per candidate), padding, the target's place in
the sequence, positions, config errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmf_jax.models import registry
from dmf_jax.models.base import UserState
from helpers import (assert_model_equals_its_formula,
                     check_sequence_model_reads_the_valid_history_in_order, jitted, take,
                     tiny_problem)


def bst_and_batch():
  schema, catalog, splits = tiny_problem()
  model = registry.build_model({"name": "bst", "bst_dim": 16, "bst_heads": 2}, schema,
                               rngs=nnx.Rngs(0), catalog=catalog)
  batch = take(splits["validation"], np.arange(32))
  assert (~batch["hist_mask"]).any() and batch["hist_mask"].any(1).all()
  return schema, model, batch


def plain_bst(model, batch):
  """The module docstring's formula with every layer over the whole [B, L + 1] sequence."""
  mask = jnp.asarray(batch["hist_mask"])
  length = mask.shape[1]
  history = model.item_tokens(model.item_rows(batch["hist_item_id"]), sequence=True).take()
  target = model.item_tokens(model.item_rows(batch["item_id"][:, None])).take()  # [B, 1, d]
  x = jnp.concatenate([model.project(history) + model.positions[:length],
                       model.project(target) + model.positions[length]], axis=1)
  keys = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=1)
  for layer in model.layers:
    x = layer(x, keys)
  weights = mask.astype(x.dtype)[..., None]
  pooled = (x[:, :length] * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
  return model.predict(UserState(user=model.user_embedding(batch), mask=mask),
                       [target, x[:, None, length], pooled[:, None]])[:, 0]


@pytest.mark.parametrize("layers", [1, 2])
def test_bst_equals_the_whole_sequence_per_candidate_in_values_and_gradients(layers):
  """The first layer's history side once per user (`encode_history`, its maps per item row),
  completed per target: the same logits and parameter gradients as the plain formula."""
  schema, catalog, splits = tiny_problem()
  model = registry.build_model({"name": "bst", "bst_dim": 16, "bst_heads": 2,
                              "bst_layers": layers}, schema, rngs=nnx.Rngs(0), catalog=catalog)
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(32)).items()}
  assert_model_equals_its_formula(model, batch, plain_bst)


def test_padded_history_ids_do_not_matter_and_valid_ones_and_order_do():
  schema, model, batch = bst_and_batch()
  check_sequence_model_reads_the_valid_history_in_order(model, batch, schema.num_items)


def test_the_target_token_reads_the_last_position_embedding():
  _, model, batch = bst_and_batch()
  call = jitted(model)
  base = np.asarray(call(batch))
  model.positions[...] = model.positions[...].at[-1].add(1.0)
  assert np.abs(np.asarray(jitted(model)(batch)) - base).max() > 1e-4
  del call


def test_bst_config_errors():
  schema, catalog, _ = tiny_problem()
  with pytest.raises(ValueError, match="bst_dim 10 must be a multiple of bst_heads 4"):
    registry.build_model({"name": "bst", "bst_dim": 10, "bst_heads": 4}, schema,
                         rngs=nnx.Rngs(0), catalog=catalog)
