"""DIEN: the paper's formula, the auxiliary loss against numpy, its negatives, padding, and
the combined loss."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmf_jax.models import registry
from dmf_jax.nn.losses import bce_with_logits
from helpers import (assert_model_equals_its_formula,
                     check_sequence_model_reads_the_valid_history_in_order, plain_gru, take,
                     tiny_problem)


def dien_and_batch(**overrides):
  schema, catalog, splits = tiny_problem()
  model = registry.build_model({"name": "dien", **overrides}, schema, rngs=nnx.Rngs(0),
                               catalog=catalog)
  batch = take(splits["validation"], np.arange(32))
  assert (~batch["hist_mask"]).any() and batch["hist_mask"].any(1).all()
  return schema, model, batch


def plain_dien(model, batch):
  """The module docstring's formula, batch-major: the extractor over every position's token,
  both GRUs plain scans (autodiff, `helpers.plain_gru`)."""
  mask = jnp.asarray(batch["hist_mask"])
  tokens = model.item_tokens(model.item_rows(batch["hist_item_id"]), sequence=True).take()
  target = model.item_tokens(model.item_rows(batch["item_id"])).take()  # [B, d]
  interests = plain_gru(model.extractor, tokens, mask)  # [B, L, d]
  scores = jnp.einsum("bld,bd->bl", interests, model.attention(target))
  weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1) * mask
  evolved = plain_gru(model.evolution, interests, mask, weights)[:, -1]
  return model.head(jnp.concatenate([model.user_embedding(batch), target, evolved], -1))


def test_dien_equals_its_formula_in_values_and_gradients():
  """The extractor's input side once per item row, then gathered: the same logits and
  parameter gradients as the extractor over every position's token."""
  _, model, batch = dien_and_batch()
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  assert_model_equals_its_formula(model, batch, plain_dien)


def test_auxiliary_loss_matches_numpy():
  schema, model, batch = dien_and_batch()
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  state = model.encode_user(jb)
  offset = 7
  got = float(model.auxiliary_loss(jb, state, offset=offset))
  h = np.swapaxes(np.asarray(state.interests, np.float64), 0, 1)  # time-major -> [B, L, d]
  tokens = np.swapaxes(np.asarray(state.tokens, np.float64), 0, 1)
  negative_ids = (batch["hist_item_id"][:, 1:] + offset) % schema.num_items
  negatives = np.asarray(model.item_tokens(model.item_rows(jnp.asarray(negative_ids)),
                                           sequence=True).take(), np.float64)
  mask = batch["hist_mask"]
  log_sigmoid = lambda z: -np.log1p(np.exp(-z))
  total, count = 0.0, 0
  for b in range(len(mask)):
    for t in range(mask.shape[1] - 1):
      if mask[b, t] and mask[b, t + 1]:
        total -= log_sigmoid(h[b, t] @ tokens[b, t + 1]) + log_sigmoid(-(h[b, t] @ negatives[b, t]))
        count += 1
  assert count > 0
  np.testing.assert_allclose(got, total / count, rtol=1e-5)
  assert not np.any(negative_ids == batch["hist_item_id"][:, 1:])  # never the positive


def test_padded_history_ids_do_not_matter_and_valid_ones_and_order_do():
  schema, model, batch = dien_and_batch()
  check_sequence_model_reads_the_valid_history_in_order(model, batch, schema.num_items)


def test_training_loss_adds_the_weighted_auxiliary_loss():
  _, model, batch = dien_and_batch()
  jb = {k: jnp.asarray(v) for k, v in batch.items()}
  loss, extras = model.training_loss(jb, rngs=nnx.Rngs(dropout=0, sample=1))
  np.testing.assert_allclose(float(loss), float(extras["ctr_loss"] + extras["aux_loss"]),
                             rtol=1e-6)
  np.testing.assert_allclose(float(extras["ctr_loss"]),
                             float(bce_with_logits(model(jb), jb["label"], jb["weight"])),
                             rtol=1e-5)
  _, plain, _ = dien_and_batch(dien_aux_weight=0.0)
  loss, extras = plain.training_loss(jb)
  assert extras == {}
  np.testing.assert_allclose(float(loss), float(bce_with_logits(plain(jb), jb["label"],
                                                                jb["weight"])), rtol=1e-6)
