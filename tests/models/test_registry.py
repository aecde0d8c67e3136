"""Model registry, configs, the loss, and end-to-end training on a small generated problem."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import jitted, take, tiny_problem, train_steps
from dmf_jax.core.rows import Rows
from dmf_jax.models import base as model_base
from dmf_jax.models import registry
from dmf_jax.models.din import DinConfig
from dmf_jax.models.dmf import DmfConfig
from dmf_jax.models.em3 import EM3Config
from dmf_jax.train import steps as training
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.nn.losses import bce_with_logits

SMALL = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
             mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8)


def build(name, **overrides):
  schema, catalog, _ = tiny_problem()
  return registry.build_model({"name": name, **SMALL, **overrides}, schema,
                              rngs=nnx.Rngs(0), catalog=catalog)


def test_registry_lists_models_and_rejects_unknown_names():
  assert set(registry.model_names()) >= {"din", "dmf", "dmf_early_fusion", "dmf_no_me", "dmf_no_mc",
                                       "din_mm_concat", "simscore", "simtier", "make", "em3", "bst", "dien",
                                       "bst_mm_concat", "dien_mm_concat"}
  with pytest.raises(ValueError, match="unknown model 'dnn'; valid models: bst, bst_mm_concat, "
                                       "dien, dien_mm_concat, din, din_mm_concat, dmf,"):
    build("dnn")
  with pytest.raises(ValueError, match="model 'din' is already registered"):
    registry.register_model("din", registry.DIN)


def test_model_config_validation():
  with pytest.raises(ValueError, match="num_heads must be a positive int"):
    DmfConfig(num_heads=0)
  with pytest.raises(ValueError, match="cmm='mean' is not one of"):
    DmfConfig(cmm="mean")
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\]"):
    registry.ModelConfig.from_mapping({"heads": 2})
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\]"):
    registry.model_config({"name": "din", "heads": 2})
  with pytest.raises(ValueError, match="mlp_hidden must be a non-empty list"):
    registry.ModelConfig(mlp_hidden=())
  # Every problem at once, one message each.
  with pytest.raises(ValueError) as e:
    DmfConfig(num_heads=0, dropout=2.0, cmm="mean")
  assert len(e.value.problems) == 3


def test_each_model_gets_its_familys_config():
  """The flat mapping's fields of other families are ignored; a retired field is accepted."""
  values = {"num_heads": 3, "din_hidden": (8,), "em3_head": "dmf", "item_table_max_items": 0}
  din = registry.model_config({"name": "din", **values})
  dmf = registry.model_config({"name": "dmf", **values})
  em3 = registry.model_config({"name": "em3", **values})
  assert type(din) is DinConfig and din.din_hidden == (8,) and not hasattr(din, "num_heads")
  assert type(dmf) is DmfConfig and dmf.num_heads == 3 and not hasattr(dmf, "din_hidden")
  assert type(em3) is EM3Config and (em3.num_heads, em3.din_hidden) == (3, (8,))
  assert set(registry.default_values()) == set(registry.config_fields()) - {"name"}


def test_dmf_needs_modalities():
  schema, _, _ = tiny_problem()
  with pytest.raises(ValueError, match="needs at least one modality"):
    registry.build_model({"name": "dmf"}, schema.replace(modalities=()), rngs=nnx.Rngs(0),
                         catalog=None)


@pytest.mark.parametrize("cmm", ["concat", "weighted", "gate"])
def test_forward_shapes_for_every_cmm_mode(cmm):
  _, _, splits = tiny_problem()
  batch = take(splits["train"], np.arange(7))
  logits = build("dmf", cmm=cmm, similarity="projected", activation="dice")(batch)
  assert logits.shape == (7,) and np.all(np.isfinite(np.asarray(logits)))


def test_dmf_and_early_fusion_compute_the_same_function():
  _, _, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(40)).items()}
  ef = build("dmf_early_fusion")
  dta = build("dmf")
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
  gather, one_hot = build(name, lookup_mode="gather"), build(name, lookup_mode="one_hot")
  assert build(name).config.lookup_mode == "auto"
  assert (build(name).catalog.pairwise_lookup, one_hot.catalog.pairwise_lookup) == (
      "gather", "one_hot") and one_hot.catalog.has_pairwise
  if name != "simtier":
    assert (build(name).attention.lookup_mode, one_hot.attention.lookup_mode) == (
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


@pytest.mark.parametrize("name", ["din", "dmf", "dmf_early_fusion", "dmf_no_me", "dmf_no_mc",
                                  "din_mm_concat", "simscore", "simtier", "make", "bst", "dien",
                                  "bst_mm_concat", "dien_mm_concat"])
def test_models_train_and_loss_falls(name):
  _, state, outputs = train_steps(build(name), 60)
  losses = [float(o["loss"]) for o in outputs]
  assert int(state.step) == 60
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.03, (losses[:10], losses[-10:])


@pytest.mark.parametrize("name", ["din", "dmf", "dmf_no_me", "dmf_no_mc", "din_mm_concat", "make",
                                  "simscore"])
def test_catalog_rows_equal_the_per_position_path(name, monkeypatch):
  """Encoding every item once and gathering is the same function as encoding each position:
  logits and gradients, and (under jit) out-of-range ids read the same OOV token."""
  schema, _, splits = tiny_problem()
  batch = {k: jnp.asarray(v) for k, v in take(splits["validation"], np.arange(40)).items()}
  model = build(name)
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


def test_catalog_is_frozen_and_not_in_params():
  model = build("dmf")
  _, params, rest = training.split_model(model)
  param_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
  assert not any(p.startswith("catalog") for p in param_paths)
  rest_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(rest)}
  assert "catalog/modalities/text" in rest_paths


def test_catalog_rejects_bad_tables():
  schema, catalog, _ = tiny_problem()
  bad = dict(catalog.modalities)
  bad["text"] = bad["text"].copy()
  bad["text"][4, 1] = np.nan
  with pytest.raises(ValueError, match=r"catalog.modalities\['text'\]: 1 non-finite value"):
    ItemCatalog(catalog.side, bad).validate(schema)
  bad["text"] = np.zeros((schema.num_items + 1, 8), np.float32)
  with pytest.raises(ValueError, match=r"catalog.modalities\['text'\]: expected shape"):
    ItemCatalog(catalog.side, bad).validate(schema)
  side = dict(catalog.side, category=np.full(schema.num_items, 99, np.int32))
  with pytest.raises(ValueError, match=r"catalog.side\['category'\]: id 99"):
    ItemCatalog(side, catalog.modalities).validate(schema)


def test_bad_batches_get_clear_errors():
  _, _, splits = tiny_problem()
  model = build("dmf")
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


def test_bce_matches_numpy_with_weights():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=10).astype(np.float32) * 3
  labels = (rng.random(10) < 0.5).astype(np.float32)
  weights = rng.random(10).astype(np.float32)
  weights[3] = 0.0
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  per = -(labels * np.log(p) + (1 - labels) * np.log(1 - p))
  got = bce_with_logits(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights))
  np.testing.assert_allclose(float(got), (per * weights).sum() / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(bce_with_logits(jnp.asarray(logits), jnp.asarray(labels))),
                             per.mean(), rtol=1e-5)
  assert float(bce_with_logits(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros(10))) == 0.0
  with pytest.raises(ValueError, match="logits .* and labels .* must have the same shape"):
    bce_with_logits(jnp.zeros(3), jnp.zeros(4))


def test_pairwise_similarity_matrix_equals_the_vector_path():
  _, _, splits = tiny_problem()
  batch = take(splits["validation"], np.arange(50))
  fast, slow = build("dmf"), build("dmf", pairwise_similarity_max_items=0)
  assert fast.catalog.has_pairwise and not slow.catalog.has_pairwise
  nnx.update(slow, nnx.state(fast, nnx.Param))
  np.testing.assert_allclose(fast.similarities(batch), slow.similarities(batch), atol=2e-6)
  np.testing.assert_allclose(fast(batch), slow(batch), rtol=1e-4, atol=1e-5)
  projected = build("dmf", similarity="projected")
  assert not projected.catalog.has_pairwise  # a learned projection cannot be precomputed


@pytest.mark.parametrize("pairwise", [True, False])
def test_calibrated_similarities_match_numpy_and_serving(pairwise):
  """catalog_range calibration: clip(2 (cos - low) / (high - low) - 1) with the catalog's cosine
  percentiles; the same in the pairwise and vector paths and in the serving path."""
  from dmf_jax.serve import server as serving
  from dmf_jax.core.catalog import cosine_range
  from helpers import jitted

  schema, catalog, splits = tiny_problem()
  batch = take(splits["validation"], np.arange(30))
  model = build("dmf", similarity_calibration="catalog_range",
                pairwise_similarity_max_items=4096 if pairwise else 0)
  assert model.catalog.has_pairwise == pairwise
  got = np.asarray(jitted(model, "similarities")(batch))
  for k, name in enumerate(schema.modality_names):
    v = catalog.modalities[name].astype(np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)
    cos = np.einsum("bd,bld->bl", v[batch["item_id"]], v[batch["hist_item_id"]])
    low, high = cosine_range(catalog.modalities[name])
    want = np.clip(2 * (cos - low) / (high - low) - 1, -1, 1) * batch["hist_mask"]
    np.testing.assert_allclose(got[..., k], want, atol=2e-5)
  server = serving.Server(model, buckets=(8,))
  row = {k: v[0] for k, v in batch.items()}
  user = {k: v for k, v in row.items() if k.startswith("user/")}
  user["hist_item_id"] = row["hist_item_id"][row["hist_mask"]]
  ids = np.arange(8)
  many = {k: np.repeat(v[:1], 8, 0) for k, v in batch.items()} | {"item_id": ids.astype(np.int32)}
  np.testing.assert_allclose(server.score(server.encode_user(user), ids), jitted(model)(many),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="similarity_calibration needs similarity='frozen'"):
    DmfConfig(similarity="projected", similarity_calibration="catalog_range")


def test_only_models_that_read_vectors_hold_them():
  """ID-only models leave the catalog's vectors out of their state (6.6 GB at 1M items); the
  catalog still takes vectors on load and at add_items, and a robustness flag still applies."""
  from dmf_jax.core.catalog import without_vectors  # pylint: disable=g-import-not-at-top

  schema, catalog, splits = tiny_problem()
  for name in registry.model_names():
    model = build(name)
    reads = name not in ("din", "bst", "dien")
    assert model.catalog.holds_vectors == reads, name
    assert bool(len(model.catalog.modalities)) == reads, name
  din = build("din")
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
