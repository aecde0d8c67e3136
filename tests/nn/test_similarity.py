"""Similarities (`nn.similarity`): cosine, similarity-bucket edges, the projected mode, and the
catalog feature (the all-pairs matrix equals the vector path; calibration)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from helpers import small_model, take, tiny_problem
from dmf_jax.models.dmf import DmfConfig
from dmf_jax.nn.similarity import (
    SimilarityBucketEmbedding,
    TargetAwareSimilarity,
    bucketize,
    cosine_similarity,
)


def test_cosine_matches_numpy_and_zero_vectors_give_zero():
  rng = np.random.default_rng(0)
  t = rng.normal(size=(3, 7)).astype(np.float32)
  b = rng.normal(size=(3, 5, 7)).astype(np.float32)
  b[1, 2] = 0.0  # a missing modality vector
  got = np.asarray(cosine_similarity(jnp.asarray(t), jnp.asarray(b)))
  np.testing.assert_allclose(got, reference.cosine(t, b), rtol=1e-5, atol=1e-6)
  assert got[1, 2] == 0.0
  same = np.asarray(cosine_similarity(jnp.asarray(t), jnp.asarray(t[:, None] * 3.0)))
  np.testing.assert_allclose(same, 1.0, rtol=1e-6)


@pytest.mark.parametrize("num_buckets", [2, 20, 32])
def test_bucketize_edges(num_buckets):
  edges = jnp.array([-1.0, 1.0, -1.0000001, 1.0000001, 0.0])
  got = np.asarray(bucketize(edges, num_buckets))
  assert got[0] == 0 and got[1] == num_buckets - 1
  assert got[2] == 0 and got[3] == num_buckets - 1  # rounding past the ends is clipped
  assert got[4] == num_buckets // 2


def test_bucketize_exact_borders_belong_to_the_upper_bucket():
  num_buckets = 32  # borders -1 + i/16 are exact in binary floating point
  borders = -1.0 + 2.0 * np.arange(num_buckets) / num_buckets
  np.testing.assert_array_equal(bucketize(jnp.asarray(borders, jnp.float32), num_buckets),
                                np.arange(num_buckets))
  just_below = (borders[1:] - 1e-6).astype(np.float32)
  np.testing.assert_array_equal(bucketize(jnp.asarray(just_below), num_buckets),
                                np.arange(num_buckets - 1))


def test_bucketize_random_values_match_numpy():
  s = np.random.default_rng(1).uniform(-1, 1, size=1000).astype(np.float32)
  np.testing.assert_array_equal(bucketize(jnp.asarray(s), 20), reference.bucketize(s, 20))


def test_bucketize_rejects_nan_eagerly_and_maps_it_to_bucket_0_under_jit():
  with pytest.raises(ValueError, match=r"similarity: 1 non-finite value\(s\), first at index \(1,\)"):
    bucketize(jnp.array([0.5, jnp.nan]), 8)
  assert int(jax.jit(bucketize, static_argnums=1)(jnp.array(jnp.nan), 8)) == 0
  with pytest.raises(TypeError, match="similarity: expected a floating dtype"):
    bucketize(jnp.array([1, 0]), 8)


def test_frozen_similarity_module_masks_and_matches_cosine():
  rng = np.random.default_rng(2)
  sim = TargetAwareSimilarity([4, 6], rngs=nnx.Rngs(0))
  t = [rng.normal(size=(2, 4)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)]
  b = [rng.normal(size=(2, 3, 4)).astype(np.float32), rng.normal(size=(2, 3, 6)).astype(np.float32)]
  mask = np.array([[True, False, True], [False, False, False]])
  got = np.asarray(sim([jnp.asarray(x) for x in t], [jnp.asarray(x) for x in b], jnp.asarray(mask)))
  assert got.shape == (2, 3, 2)
  for k in range(2):
    np.testing.assert_allclose(got[..., k], reference.cosine(t[k], b[k]) * mask, atol=1e-6)


def test_projected_similarity_learns_a_projection_and_has_gradients():
  rng = np.random.default_rng(3)
  sim = TargetAwareSimilarity([5], mode="projected", projection_dim=3, rngs=nnx.Rngs(0))
  t = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(2, 4, 5)), jnp.float32)
  mask = jnp.ones((2, 4), bool)
  kernel = np.asarray(sim.projections[0].kernel[...], np.float64)
  want = reference.cosine(np.asarray(t) @ kernel, np.asarray(b) @ kernel)
  np.testing.assert_allclose(np.asarray(sim([t], [b], mask))[..., 0], want, atol=1e-5)
  graphdef, state = nnx.split(sim)
  grad = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)([t], [b], mask) ** 2))(state)
  assert np.abs(np.asarray(grad["projections"][0]["kernel"][...])).max() > 0


def test_similarity_bad_inputs_name_the_argument():
  sim = TargetAwareSimilarity([4], rngs=nnx.Rngs(0))
  good_t, good_b = jnp.ones((2, 4)), jnp.ones((2, 3, 4))
  mask = jnp.ones((2, 3), bool)
  with pytest.raises(ValueError, match=r"behavior_vectors\[0\]: expected shape \(2, 3, 4\)"):
    sim([good_t], [jnp.ones((2, 5, 4))], mask)
  with pytest.raises(ValueError, match=r"target_vectors\[0\]: expected shape \(2, 4\)"):
    sim([jnp.ones((2, 5))], [good_b], mask)
  with pytest.raises(ValueError, match=r"behavior_vectors\[0\]: 1 non-finite"):
    sim([good_t], [good_b.at[1, 2, 0].set(jnp.inf)], mask)
  with pytest.raises(ValueError, match="expected 1 modalities, got 2"):
    sim([good_t, good_t], [good_b, good_b], mask)
  with pytest.raises(ValueError, match="similarity mode 'learned' is not one of"):
    TargetAwareSimilarity([4], mode="learned", rngs=nnx.Rngs(0))


def test_bucket_embedding_lookup():
  emb = SimilarityBucketEmbedding(2, 5, 3, rngs=nnx.Rngs(0))
  ids = np.array([[[0, 4], [2, 2]]])
  got = np.asarray(emb(jnp.asarray(ids)))
  tables = np.asarray(emb.tables[...])
  want = np.concatenate([tables[0][ids[..., 0]], tables[1][ids[..., 1]]], axis=-1)
  np.testing.assert_array_equal(got, want)


def test_pairwise_similarity_matrix_equals_the_vector_path():
  _, _, splits = tiny_problem()
  batch = take(splits["validation"], np.arange(50))
  fast, slow = small_model("dmf"), small_model("dmf", pairwise_similarity_max_items=0)
  assert fast.catalog.has_pairwise and not slow.catalog.has_pairwise
  nnx.update(slow, nnx.state(fast, nnx.Param))
  np.testing.assert_allclose(fast.similarities(batch), slow.similarities(batch), atol=2e-6)
  np.testing.assert_allclose(fast(batch), slow(batch), rtol=1e-4, atol=1e-5)
  projected = small_model("dmf", similarity="projected")
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
  model = small_model("dmf", similarity_calibration="catalog_range",
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
  server = serving.Server(model, candidate_sizes=(8,))
  row = {k: v[0] for k, v in batch.items()}
  user = {k: v for k, v in row.items() if k.startswith("user/")}
  user["hist_item_id"] = row["hist_item_id"][row["hist_mask"]]
  ids = np.arange(8)
  many = {k: np.repeat(v[:1], 8, 0) for k, v in batch.items()} | {"item_id": ids.astype(np.int32)}
  np.testing.assert_allclose(server.score(server.encode_user(user), ids), jitted(model)(many),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="similarity_calibration needs similarity='frozen'"):
    DmfConfig(similarity="projected", similarity_calibration="catalog_range")
