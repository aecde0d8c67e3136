"""BST: padding, the target's place in the sequence, positions, config errors."""

import numpy as np
import pytest
from flax import nnx

from dmf_jax.models import registry as models
from helpers import (check_sequence_model_reads_the_valid_history_in_order, jitted, take,
                     tiny_problem)


def bst_and_batch():
  schema, catalog, splits = tiny_problem()
  model = models.build_model({"name": "bst", "bst_dim": 16, "bst_heads": 2}, schema,
                             rngs=nnx.Rngs(0), catalog=catalog)
  batch = take(splits["validation"], np.arange(32))
  assert (~batch["hist_mask"]).any() and batch["hist_mask"].any(1).all()
  return schema, model, batch


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
    models.build_model({"name": "bst", "bst_dim": 10, "bst_heads": 4}, schema,
                       rngs=nnx.Rngs(0), catalog=catalog)
