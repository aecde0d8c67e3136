"""Numeric features: the module against numpy, and every model reading them on both sides."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import batches, jitted, take, tiny_problem
from dmf_jax.core.schema import NumericSpec
from dmf_jax.models import registry
from dmf_jax.nn.numeric import NumericFeature
from dmf_jax.train import steps as training

X = np.array([[-3.0, 0.0, 0.5, np.nan], [2.0, 40.0, 1e6, 7.0]], np.float32)


def reference(spec, x):
  """float64 numpy: [z ; missing] for the scalar normalisations, the bucket index otherwise."""
  x = np.asarray(x, np.float64)
  missing = np.isnan(x)
  if spec.bucketized:
    return np.where(missing, len(spec.boundaries) + 1,
                    np.searchsorted(spec.boundaries, np.nan_to_num(x), side="right"))
  t = np.sign(x) * np.log1p(np.abs(x)) if spec.normalization == "log1p" else x
  z = np.clip((t - spec.center) / spec.scale, -spec.CLIP, spec.CLIP)
  return np.stack([np.where(missing, 0.0, z), missing.astype(np.float64)], -1)


@pytest.mark.parametrize("normalization", ["standard", "minmax", "log1p"])
def test_scalar_normalisations_match_numpy(normalization):
  spec = NumericSpec("x", normalization, center=1.5, scale=2.5)
  got = NumericFeature(spec, rngs=nnx.Rngs(0))(X)
  assert got.shape == (2, 4, 2)
  np.testing.assert_allclose(got, reference(spec, X), rtol=1e-6, atol=1e-6)
  if normalization != "log1p":
    assert float(got[1, 2, 0]) == spec.CLIP  # 1e6 is clipped
  # Gradients flow only to what reads the value; none of NaN leaks into them.
  grad = jax.grad(lambda x: NumericFeature(spec, rngs=nnx.Rngs(0))(x)[..., 0].sum())(X)
  assert np.isfinite(grad).all() and grad[0, 3] == 0


def test_bucketize_reads_its_bucket_rows_and_missing_its_own_row():
  spec = NumericSpec("x", "bucketize", dim=3, boundaries=(0.0, 1.0, 100.0))
  module = NumericFeature(spec, rngs=nnx.Rngs(0))
  table = np.asarray(module.buckets.embedding[...])
  assert table.shape[0] >= 5  # 4 buckets + the missing (OOV) row
  np.testing.assert_allclose(module(X), table[reference(spec, X)], rtol=1e-6)
  grads = nnx.grad(lambda m: m(X[:1]).sum())(module).buckets.embedding[...]
  used = np.zeros(len(table), bool)
  used[reference(spec, X[:1]).ravel()] = True
  assert (np.abs(np.asarray(grads)).sum(1) > 0).tolist() == used.tolist()


def test_a_spec_rejects_bad_statistics():
  with pytest.raises(ValueError, match="scale > 0"):
    NumericSpec("x", scale=0.0)
  with pytest.raises(ValueError, match="boundaries: must be finite and increasing"):
    NumericSpec("x", "bucketize", boundaries=(1.0, 1.0))
  with pytest.raises(ValueError, match="'z' is not one of"):
    NumericSpec("x", "z")


# --- every model reads numeric fields, in the head and (items) in the behaviour tokens ------


def numeric_problem():
  """The tiny problem with item fields price (log1p), rank (bucketize) and a user age."""
  schema, catalog, splits = tiny_problem()
  rng = np.random.default_rng(0)
  price = rng.lognormal(3, 1, schema.num_items).astype(np.float32)
  price[::7] = np.nan
  rank = rng.uniform(0, 10, schema.num_items).astype(np.float32)
  schema = schema.replace(
      item_numeric=(NumericSpec("price", "log1p", center=3.0, scale=1.0),
                    NumericSpec("rank", "bucketize", dim=4, boundaries=(2.0, 5.0, 8.0))),
      user_numeric=(NumericSpec("age", center=40.0, scale=12.0),))
  catalog = dataclasses.replace(catalog, numeric={"price": price, "rank": rank})
  splits = {k: v | {"user/age": rng.normal(40, 12, len(v["label"])).astype(np.float32)}
            for k, v in splits.items()}
  return schema, catalog, splits


SMALL = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
             mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8)
SEQUENCE_MODELS = {"din", "dmf", "dmf_early_fusion", "dmf_no_mc", "din_mm_concat", "make", "bst",
                   "dien", "em3", "bst_mm_concat", "dien_mm_concat"}


@pytest.mark.parametrize("name", registry.model_names())
def test_every_model_reads_numeric_fields(name):
  schema, catalog, splits = numeric_problem()
  model = registry.build_model({"name": name, **SMALL}, schema, rngs=nnx.Rngs(0), catalog=catalog)
  assert model.items(model.catalog, jnp.arange(3)).shape[-1] == schema.item_dim
  batch = take(splits["validation"], np.arange(16))
  forward = jitted(model)
  base = np.asarray(forward(batch))

  def changed(**arrays):
    return np.abs(np.asarray(forward(batch | arrays)) - base).max()

  assert changed(**{"user/age": batch["user/age"] + 30}) > 1e-6
  assert changed(**{"user/age": np.full(16, np.nan, np.float32)}) > 1e-6  # missing != value
  # The target's numeric values: change them by moving the target to an item with other values.
  prices = catalog.numeric["price"]
  twin = np.argsort(np.nan_to_num(prices))  # same batch, only the catalog changes
  other = dataclasses.replace(catalog, numeric={"price": prices[twin[::-1]],
                                                "rank": catalog.numeric["rank"]})
  model.catalog.load(schema, other)
  assert np.abs(np.asarray(jitted(model)(batch)) - base).max() > 1e-6
  model.catalog.load(schema, catalog)
  if name in SEQUENCE_MODELS:  # a behaviour item's value changes the logit too
    hist = batch["hist_item_id"].copy()
    nan_prices = catalog.numeric["price"].copy()
    nan_prices[hist[batch["hist_mask"]]] = np.nan
    nan_prices[batch["item_id"]] = catalog.numeric["price"][batch["item_id"]]
    model.catalog.load(schema, dataclasses.replace(catalog, numeric={
        "price": nan_prices, "rank": catalog.numeric["rank"]}))
    moved = np.abs(np.asarray(jitted(model)(batch)) - base).max()
    model.catalog.load(schema, catalog)
    assert moved > 1e-6


@pytest.mark.parametrize("name", ["din", "dmf"])
def test_models_with_numeric_fields_train_and_serve_the_same(name):
  from dmf_jax.serve import server as serving

  schema, catalog, splits = numeric_problem()
  model = registry.build_model({"name": name, **SMALL}, schema, rngs=nnx.Rngs(0), catalog=catalog)
  tx = optax.adam(3e-3)
  graphdef, state = training.create_train_state(model, tx)
  step = training.make_train_step(graphdef, tx)
  stream = batches(splits["train"], 64)
  before = jax.tree.map(np.asarray, state.params)
  for _ in range(5):
    state, metrics = step(state, next(stream))
  assert np.isfinite(float(metrics["loss"]))
  # The bucket table and the head's weights over the numeric inputs are trained.
  rank_table = state.params["items"]["numeric"]["fields"]["rank"]["buckets"]["embedding"]
  assert np.abs(np.asarray(rank_table[...]) - np.asarray(
      before["items"]["numeric"]["fields"]["rank"]["buckets"]["embedding"])).max() > 0
  model = nnx.merge(graphdef, state.params, state.rest)
  server = serving.Server(model, candidate_sizes=(8,))
  batch = take(splits["validation"], np.arange(1))
  user = {k: v[0] for k, v in batch.items() if k.startswith("user/")}
  user["user/age"] = None  # missing
  user["hist_item_id"] = batch["hist_item_id"][0][batch["hist_mask"][0]]
  ids = np.arange(8)
  many = {k: np.repeat(v, 8, 0) for k, v in batch.items()} | {
      "item_id": ids.astype(np.int32), "user/age": np.full(8, np.nan, np.float32)}
  np.testing.assert_allclose(server.score(server.encode_user(user), ids), jitted(model)(many),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"user/age: inf is not finite"):
    server.encode_user(user | {"user/age": float("inf")})
  with pytest.raises(KeyError, match=r"user features miss 'user/age'"):
    server.encode_user({k: v for k, v in user.items() if k != "user/age"})
