"""BST: padding, the target's place in the sequence, positions, config errors."""

import numpy as np
import pytest
from flax import nnx

from dmf_jax.models import registry as models
from helpers import jitted, take, tiny_problem


def bst_and_batch():
  schema, catalog, splits = tiny_problem()
  model = models.build_model({"name": "bst", "bst_dim": 16, "bst_heads": 2}, schema,
                             rngs=nnx.Rngs(0), catalog=catalog)
  batch = take(splits["validation"], np.arange(32))
  assert (~batch["hist_mask"]).any() and batch["hist_mask"].any(1).all()
  return schema, model, batch


def test_padded_history_ids_do_not_matter_and_valid_ones_and_order_do():
  schema, model, batch = bst_and_batch()
  call = jitted(model)
  base = np.asarray(call(batch))
  rng = np.random.default_rng(0)
  padded = dict(batch, hist_item_id=np.where(
      batch["hist_mask"], batch["hist_item_id"],
      rng.integers(0, schema.num_items, batch["hist_item_id"].shape)).astype(np.int32))
  np.testing.assert_allclose(np.asarray(call(padded)), base, rtol=1e-5, atol=1e-6)
  valid = dict(batch, hist_item_id=np.where(
      batch["hist_mask"], rng.integers(0, schema.num_items, batch["hist_item_id"].shape),
      batch["hist_item_id"]).astype(np.int32))
  assert np.abs(np.asarray(call(valid)) - base).max() > 1e-4
  # Positions: reversing the valid part of a full history changes the logits.
  full = np.flatnonzero(batch["hist_mask"].all(1))
  assert len(full)
  reversed_ = dict(batch, hist_item_id=batch["hist_item_id"].copy())
  reversed_["hist_item_id"][full] = batch["hist_item_id"][full, ::-1]
  assert np.abs(np.asarray(call(reversed_))[full] - base[full]).max() > 1e-5


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
    models.build_model({"name": "bst", "bst_dim": 10, "bst_heads": 4}, schema,
                       rngs=nnx.Rngs(0), catalog=catalog)
