"""Optimizer factory: embedding-table and content-tower groups, clipping, schedules, config
errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dmf_jax.models import registry
from dmf_jax.train import steps as training
from dmf_jax.train.optimizers import OptimizerConfig, make_optimizer, param_labels
from helpers import small_model, tiny_problem


def params_and_grads():
  schema, catalog, _ = tiny_problem()
  model = registry.build_model({"name": "dmf", "num_heads": 1, "head_dim": 4}, schema,
                               rngs=nnx.Rngs(0), catalog=catalog)
  _, params, _ = training.split_model(model)
  return params, jax.tree.map(jnp.ones_like, params)


def flat(tree):
  value = lambda v: v.get_value() if hasattr(v, "get_value") else v
  return {"/".join(map(str, p)): np.asarray(value(v)) for p, v in nnx.to_flat_state(tree)}


def test_embedding_tables_get_their_own_optimizer():
  params, grads = params_and_grads()
  labels = flat(param_labels(params))
  assert {v.item() for v in labels.values()} == {"embedding", "dense"}
  tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1, embedding_name="sgd",
                                      embedding_learning_rate=1.0), total_steps=10)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, update in flat(updates).items():
    expected = -1.0 if path.endswith("embedding") else -0.1  # sgd, first step, unit gradient
    np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=path)
  assert any(p.endswith("item_id/table/embedding") for p in flat(updates))


def test_the_content_tower_gets_its_own_learning_rate():
  """EM3's Q-Former and contrastive heads (`model.content`) step at content_learning_rate,
  the embedding tables and the ranker at theirs; unset, the state is the plain optimizer's."""
  _, params, _ = training.split_model(small_model("em3"))
  grads = jax.tree.map(jnp.ones_like, params)
  labels = flat(param_labels(params, content=True))
  assert {v.item() for v in labels.values()} == {"embedding", "content", "dense"}
  assert all(v.item() == "content" for p, v in labels.items() if p.startswith("content/"))
  assert {v.item() for v in flat(param_labels(params)).values()} == {"embedding", "dense"}
  for embedding_rate in (None, 1.0):
    tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=0.1, content_learning_rate=0.5,
                                        embedding_learning_rate=embedding_rate), total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, update in flat(updates).items():
      expected = (-0.5 if path.startswith("content/") else
                  -(embedding_rate or 0.1) if path.endswith("embedding") else -0.1)
      np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=path)
  plain = make_optimizer(OptimizerConfig(name="adam"), 10).init(params)
  assert isinstance(plain[0], optax.ScaleByAdamState)  # one group: optax.adam's own state
  grouped = make_optimizer(OptimizerConfig(name="adam", content_learning_rate=0.5), 10)
  assert isinstance(grouped.init(params), optax.MultiTransformState)
  with pytest.raises(ValueError, match="content_learning_rate must be > 0, got -1"):
    OptimizerConfig(content_learning_rate=-1.0)


def test_clipping_and_schedules():
  params, grads = params_and_grads()
  tx = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0, grad_clip_norm=1.0), 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = optax.global_norm(updates)
  np.testing.assert_allclose(float(norm), 1.0, rtol=1e-5)  # clipped to norm 1, lr 1
  warm = make_optimizer(OptimizerConfig(name="sgd", learning_rate=1.0,
                                        schedule="warmup_cosine", warmup_steps=5), 20)
  updates, _ = warm.update(grads, warm.init(params), params)
  assert float(optax.global_norm(updates)) == 0.0  # warm-up starts at learning rate 0


def test_optimizer_config_errors():
  with pytest.raises(ValueError, match="optimizer.name 'lamb' is not one of"):
    OptimizerConfig(name="lamb")
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    OptimizerConfig(learning_rate=0.0)
  with pytest.raises(ValueError, match=r"optimizer config: unknown field\(s\) \['lr'\]"):
    OptimizerConfig.from_mapping({"lr": 1.0})
