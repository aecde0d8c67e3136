"""Per-record frozen cosines from the input pipeline (`data.pipeline.RecordSimilarities`): the
same values as the model's own (float64 reference, stored bf16 vectors), the same loss and
gradients for every family that takes them, ignored by the others, and sent by the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_same_loss_and_gradients, take, tiny_problem, tiny_train_config
from dmf_jax.core.rows import batch_unique_rows
from dmf_jax.data import pipeline
from dmf_jax.models import registry
from dmf_jax.nn.losses import bce_with_logits
from dmf_jax.train import steps as training

SMALL = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
             mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8,
             pairwise_similarity_max_items=0)  # frozen cosines from the vectors
TAKERS = ["dmf", "dmf_early_fusion", "dmf_no_me", "dmf_no_mc", "simscore", "simtier"]


def a_batch(examples=24):
  schema, catalog, splits = tiny_problem()
  batch = take(splits["validation"], np.arange(examples))
  return schema, catalog, batch


def test_record_cosines_match_a_float64_reference():
  schema, catalog, batch = a_batch()
  vectors = {k: np.array(v) for k, v in catalog.modalities.items()}
  first = schema.modality_names[0]
  vectors[first][int(batch["hist_item_id"][0, 0])] = 0.0  # a missing vector: cosine 0
  catalog = type(catalog)(**{**catalog.__dict__, "modalities": vectors})
  got = pipeline.RecordSimilarities(catalog, schema.modality_names).map(dict(batch))
  assert got["hist_similarity"].dtype == np.float32
  for k, name in enumerate(schema.modality_names):
    v = vectors[name].astype(np.float64)
    unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
    want = np.einsum("bd,bld->bl", unit[batch["item_id"]], unit[batch["hist_item_id"]])
    want = np.clip(want, -1, 1) * batch["hist_mask"]
    np.testing.assert_allclose(got["hist_similarity"][..., k], want, atol=2e-6)
    assert np.abs(want).max() > 0.1 and (~batch["hist_mask"]).any()  # non-trivial, padded
  assert got["hist_similarity"][0, 0, 0] == 0.0


@pytest.mark.parametrize("vector_dtype", ["float32", "bfloat16"])
def test_record_cosines_equal_the_models_own(vector_dtype):
  schema, catalog, batch = a_batch()
  model = registry.build_model({"name": "dmf", **SMALL, "vector_dtype": vector_dtype}, schema,
                               rngs=nnx.Rngs(0), catalog=catalog)
  assert model.takes_record_similarities
  sims = pipeline.RecordSimilarities(catalog, schema.modality_names, vector_dtype).map(dict(batch))
  own = jax.jit(lambda b: model.similarities(b))({k: jnp.asarray(v) for k, v in batch.items()})
  np.testing.assert_allclose(sims["hist_similarity"], own, atol=1e-6)


@pytest.mark.parametrize("name", TAKERS)
@pytest.mark.parametrize("unique", [False, True])
def test_record_similarities_give_the_same_loss_and_gradients(name, unique):
  schema, catalog, batch = a_batch()
  config = {"name": name, **SMALL}
  if name == "dmf":
    config["similarity_calibration"] = "catalog_range"
  model = registry.build_model(config, schema, rngs=nnx.Rngs(0), catalog=catalog)
  assert model.takes_record_similarities, name
  if unique:
    batch |= batch_unique_rows(batch["item_id"], batch["hist_item_id"], 1, counts=(64,))
  record = pipeline.RecordSimilarities(catalog, schema.modality_names).map(dict(batch))
  batch, record = ({k: jnp.asarray(v) for k, v in b.items()} for b in (batch, record))
  _, params, want = assert_same_loss_and_gradients(model, batch, record)
  # nothing depends on the vectors any more: other vectors leave the loss as it was
  for name_ in schema.modality_names:
    for table in (model.catalog.modalities[name_], model.catalog.inv_norms[name_]):
      table.set_value(table[...][::-1])
  graphdef, _, rest = training.split_model(model)
  loss = lambda p, b: bce_with_logits(nnx.merge(graphdef, p, rest)(b), b["label"])
  np.testing.assert_allclose(jax.jit(loss)(params, record), want, rtol=1e-6)
  assert abs(float(jax.jit(loss)(params, batch)) - float(want)) > 1e-4


def test_the_families_that_take_them():
  schema, catalog, _ = a_batch()
  takers = [name for name in registry.MODELS if registry.build_model(
      {"name": name, **SMALL}, schema, rngs=nnx.Rngs(0), catalog=catalog
  ).takes_record_similarities]
  assert takers == TAKERS


def test_models_that_do_not_take_them_ignore_them():
  schema, catalog, batch = a_batch()
  record = pipeline.RecordSimilarities(catalog, schema.modality_names).map(dict(batch))
  record["hist_similarity"] = record["hist_similarity"] + 0.5  # would change any reader
  for config in ({"name": "din", **SMALL}, {"name": "dmf", **SMALL,
                                           "pairwise_similarity_max_items": 4096}):
    model = registry.build_model(config, schema, rngs=nnx.Rngs(0), catalog=catalog)
    assert not model.takes_record_similarities
    forward = jax.jit(lambda b, m=model: m(b))
    np.testing.assert_array_equal(forward(record), forward(batch))


def test_a_wrong_shape_is_refused_naming_the_key():
  schema, catalog, batch = a_batch(4)
  model = registry.build_model({"name": "dmf", **SMALL}, schema, rngs=nnx.Rngs(0), catalog=catalog)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  batch["hist_similarity"] = jnp.zeros(batch["hist_mask"].shape + (5,))
  with pytest.raises(ValueError, match=r"hist_similarity"):
    model(batch)


def test_the_loop_sends_them_in_training_and_evaluation(tmp_path):
  from dmf_jax.train import experiment
  from dmf_jax.train import loop  # pylint: disable=g-import-not-at-top

  config = tiny_train_config(tmp_path, batch_size=32)
  config.model_config.pairwise_similarity_max_items = 0
  exp = experiment.build_experiment(config)
  assert exp.record_similarities is not None
  it = exp.train_iterator(exp.train_dataset())
  first, second = next(it), next(it)
  assert set(exp.to_model_batch(first)) >= {"hist_similarity"}
  model = registry.build_model(exp.model_config, exp.dataset.schema, rngs=nnx.Rngs(0),
                               catalog=exp.dataset.catalog)
  plain = {k: v for k, v in first.items() if k != "hist_similarity"}
  np.testing.assert_allclose(first["hist_similarity"], jax.jit(model.similarities)(plain),
                             atol=1e-6)
  state = it.get_state()  # the iterator's state resumes at the next batch, cosines included
  resumed = exp.train_iterator(exp.train_dataset())
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["hist_similarity"], next(it)["hist_similarity"])
  assert second["hist_similarity"].shape == first["hist_similarity"].shape
  predict = exp.partitioner.predict_step(exp.graphdef, exp.shardings)
  metrics = loop.evaluate_split(exp, predict, exp.state, "validation")
  config.record_similarities = False
  off = experiment.build_experiment(config)
  assert off.record_similarities is None
  np.testing.assert_allclose(
      loop.evaluate_split(off, off.partitioner.predict_step(off.graphdef, off.shardings),
                               off.state, "validation")["auc"], metrics["auc"], atol=1e-6)
  config.record_similarities = True
  config.model_config.pairwise_similarity_max_items = 4096  # the matrix: nothing to send
  assert experiment.build_experiment(config).record_similarities is None
