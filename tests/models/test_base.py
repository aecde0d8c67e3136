"""What every model shares (`models.base`): the catalog's rows equal the per-position path
(values and gradients), bad batches get clear errors, only models that read vectors hold them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import jitted, small_model, take, tiny_problem
from dmf_jax.core.rows import Rows
from dmf_jax.models import base as model_base
from dmf_jax.models import registry
from dmf_jax.train import steps as training
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.nn.losses import bce_with_logits


@pytest.mark.parametrize("name", ["din", "dmf", "dmf_no_me", "dmf_no_mc", "din_mm_concat", "make",
                                  "simscore"])
def test_catalog_rows_equal_the_per_position_path(name, monkeypatch):
  """Encoding every item once and gathering is the same function as encoding each position:
  logits and gradients, and (under jit) out-of-range ids read the same OOV token."""
  schema, _, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(40)).items()}
  model = small_model(name)
  rows = model.item_rows(batch["hist_item_id"])
  assert rows.index is not None and rows.values.shape == (schema.num_items + 1,)
  # One example has fewer behaviour positions than the catalog has items: per position.
  assert model.item_rows(batch["hist_item_id"][:1]).index is None

  def value_and_grads(model, batch):
    graphdef, params, rest = training.split_model(model)
    loss = lambda p, b: bce_with_logits(nnx.merge(graphdef, p, rest)(b), b["label"])
    return jax.jit(jax.value_and_grad(loss))(params, batch)

  # One batch holds both in-range rows and (rows 0 and 1) out-of-range ids read under jit.
  b = batch | {"item_id": batch["item_id"].at[0].set(10**6),
               "hist_item_id": batch["hist_item_id"].at[1, :3].set(-3)}
  loss_t, g_t = value_and_grads(model, b)
  monkeypatch.setattr(model_base, "item_rows", lambda ids, n, positions=None: Rows(jnp.asarray(ids, jnp.int32)))
  assert model.item_rows(batch["hist_item_id"]).index is None
  loss_d, g_d = value_and_grads(model, b)
  np.testing.assert_allclose(loss_t, loss_d, rtol=1e-6)
  for (path, a), (_, c) in zip(nnx.to_flat_state(g_d), nnx.to_flat_state(g_t)):
    np.testing.assert_allclose(np.asarray(c[...]), np.asarray(a[...]), rtol=2e-4, atol=1e-6,
                               err_msg=str(path))
  with pytest.raises(ValueError, match="item_id: id -3 .* out of range"):
    model(batch | {"hist_item_id": batch["hist_item_id"].at[1, 0].set(-3)})


def test_bad_batches_get_clear_errors():
  _, _, splits = tiny_problem()
  model = small_model("dmf")
  batch = take(splits["train"], np.arange(4))
  with pytest.raises(KeyError, match=r"batch is missing \['hist_mask'\]"):
    model({k: v for k, v in batch.items() if k != "hist_mask"})
  with pytest.raises(ValueError, match="mismatched L .*hist_item_id=12.*hist_mask=5"):
    model(batch | {"hist_mask": batch["hist_mask"][:, :5]})
  with pytest.raises(ValueError, match="item_id: id 90 .* out of range"):
    model(batch | {"item_id": np.array([0, 1, 90, 2], np.int32)})
  with pytest.raises(TypeError, match=r"batch\['hist_mask'\]: expected a bool mask"):
    model(batch | {"hist_mask": batch["hist_mask"].astype(np.int32)})
  with pytest.raises(ValueError, match=r"batch\['user/group'\]: expected shape \(4,\)"):
    model(batch | {"user/group": np.zeros((4, 2), np.int32)})


def test_only_models_that_read_vectors_hold_them():
  """ID-only models leave the catalog's vectors out of their state (6.6 GB at 1M items); the
  catalog still takes vectors on load and at add_items, and a robustness flag still applies."""
  from dmf_jax.core.catalog import without_vectors  # pylint: disable=g-import-not-at-top

  schema, catalog, splits = tiny_problem()
  for name in registry.model_names():
    model = small_model(name)
    reads = name not in ("din", "bst", "dien")
    assert model.catalog.holds_vectors == reads, name
    assert bool(len(model.catalog.modalities)) == reads, name
  din = small_model("din")
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(20)).items()}
  before = np.asarray(jitted(din)(batch))
  din.catalog.load(schema, catalog)  # the dataset's catalog, vectors and all
  bigger = din.catalog.extended(schema, ItemCatalog(
      {k: np.asarray(v)[:2] for k, v in catalog.side.items()},
      {k: np.asarray(v)[:2] for k, v in catalog.modalities.items()}))
  assert bigger.num_items == schema.num_items + 2 and not len(bigger.modalities)
  tables = nnx.to_pure_dict(nnx.state(din.catalog))
  assert without_vectors(tables, "text", np.ones(schema.num_items, bool)).keys() == tables.keys()
  np.testing.assert_allclose(np.asarray(jitted(din)(batch)), before, rtol=1e-6)
