"""The catalog's host-side math (`core.catalog`): inverse norms, the all-pairs cosine matrix,
the typical cosine range and each record's cosines, against float64 references; the device
tables' lookups and their out-of-range rule; the catalog frozen in a model (not a parameter) and
its bad tables refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import small_model, tiny_problem
from dmf_jax.train import steps as training
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.core import catalog as catalog_lib
from dmf_jax.core.sharding import ShardingRules


def vectors(seed=0, n=40, d=12):
  v = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  v[3] = 0.0  # a missing vector
  return v


def unit64(v):
  v = v.astype(np.float64)
  return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-8)


def test_inverse_norms_and_the_cosine_matrix_match_float64():
  v = vectors()
  inv = catalog_lib.inverse_norms(v)
  assert inv.dtype == np.float32
  np.testing.assert_allclose(inv[[0, 1]], 1 / np.linalg.norm(v[[0, 1]].astype(np.float64), axis=1),
                             rtol=1e-6)
  assert inv[3] == np.float32(1e8)  # a zero vector: 1 / eps, so its cosines are 0
  matrix = catalog_lib.cosine_matrix(v)
  np.testing.assert_allclose(matrix, np.clip(unit64(v) @ unit64(v).T, -1, 1), atol=1e-6)
  assert np.all(matrix[3] == 0) and np.all(np.abs(matrix) <= 1)


def test_the_cosine_range_of_random_pairs():
  v = vectors(n=300)
  low, high = catalog_lib.cosine_range(v, quantiles=(5, 95), max_items=100, seed=1)
  assert -1 < low < 0 < high < 1  # random directions: cosines around 0
  assert list(catalog_lib.cosine_range(v[:1])) == [-1.0, 1.0]  # fewer than two items
  same = np.ones((5, 4), np.float32)
  assert list(catalog_lib.cosine_range(same)) == [-1.0, 1.0]  # no spread


def test_the_cosine_range_copies_only_the_drawn_items():
  """The same draw and values as normalising every non-zero vector first (the plain form), with
  zero vectors among them; and the memory it takes is a fraction of the vectors' (the plain
  form's normalised copy alone is their size)."""
  import tracemalloc  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(4)
  v = rng.standard_normal((200_000, 64), dtype=np.float32) + 0.3
  v[rng.integers(0, len(v), 5_000)] = 0.0
  norms = np.linalg.norm(v, axis=1)
  plain = v[norms > 0] / norms[norms > 0, None]
  plain = plain[np.random.default_rng(0).choice(len(plain), 1000, replace=False)]
  cos = (plain @ plain.T)[~np.eye(1000, dtype=bool)]
  want = np.percentile(cos, (0.5, 99.5)).astype(np.float32)
  del plain, cos
  tracemalloc.start()
  got = catalog_lib.cosine_range(v)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  np.testing.assert_array_equal(got, want)
  assert peak < v.nbytes / 2, (peak, v.nbytes)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_record_cosines_match_float64_in_any_chunking(chunk):
  v = vectors()
  rng = np.random.default_rng(2)
  item, hist = rng.integers(0, 40, 20), rng.integers(0, 40, (20, 9))
  hist[0, 0] = 3
  got = catalog_lib.record_cosines(v, catalog_lib.inverse_norms(v), item, hist, chunk=chunk)
  want = np.clip(np.einsum("bd,bld->bl", unit64(v)[item], unit64(v)[hist]), -1, 1)
  assert got.shape == (20, 9) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert got[0, 0] == 0.0
  with pytest.raises(IndexError):
    catalog_lib.record_cosines(v, catalog_lib.inverse_norms(v), item, hist + 40)


def test_tables_look_up_rows_and_keep_out_of_range_ids_defined():
  schema, catalog, _ = tiny_problem()
  tables = catalog_lib.CatalogTables(schema, catalog)
  ids = jnp.asarray([0, 5, schema.num_items - 1])
  name = schema.modality_names[0]
  np.testing.assert_array_equal(tables.vectors(name, ids), catalog.modalities[name][np.asarray(ids)])
  np.testing.assert_allclose(tables.inverse_norms(name, ids),
                             catalog_lib.inverse_norms(catalog.modalities[name])[np.asarray(ids)])
  # under jit an out-of-range id reads the last item (ids are range-checked where embedded)
  np.testing.assert_array_equal(tables.vectors(name, jnp.asarray([schema.num_items, -1])),
                                np.repeat(catalog.modalities[name][-1:], 2, axis=0))
  half = catalog_lib.CatalogTables(schema, catalog, vector_dtype="bfloat16")
  assert half.stored_vectors(name, ids).dtype == jnp.bfloat16
  assert half.vectors(name, ids).dtype == jnp.float32
  with pytest.raises(ValueError, match="vector_dtype 'int8'"):
    catalog_lib.CatalogTables(schema, catalog, vector_dtype="int8")
  without = catalog_lib.CatalogTables(schema, catalog, vectors=False)
  assert not without.holds_vectors and not without.has_pairwise


def test_present_marks_the_vectors_that_are_not_all_zero_whole_or_by_id():
  """has_vectors / all_present: the missing marker (an all-zero vector) as a table, kept in
  step with the vectors by `load` and `extended`; all_vectors is the stored table."""
  schema, catalog, _ = tiny_problem()
  name = schema.modality_names[0]
  modalities = dict(catalog.modalities)
  modalities[name] = np.array(modalities[name], np.float32)
  modalities[name][[2, 7]] = 0.0
  modalities[name][9, :] = 0.0
  modalities[name][9, 1] = 1e-30  # tiny, not missing
  catalog = ItemCatalog(catalog.side, modalities, catalog.raw_ids, catalog.numeric)
  want = np.any(modalities[name] != 0, axis=1)
  assert not want[2] and not want[7] and want[9]
  tables = catalog_lib.CatalogTables(schema, catalog)
  np.testing.assert_array_equal(tables.all_present(name), want)
  np.testing.assert_array_equal(tables.all_vectors(name), modalities[name])
  ids = jnp.asarray([7, 9, 0, schema.num_items])  # out of range: the last item's
  np.testing.assert_array_equal(tables.has_vectors(name, ids), want[[7, 9, 0, -1]])
  restored = catalog_lib.CatalogTables(schema)  # all zero: nothing present until loaded
  assert not np.any(restored.all_present(name))
  restored.load(schema, catalog)
  np.testing.assert_array_equal(restored.all_present(name), want)
  new_vectors = {k: np.array(v[:2]) for k, v in catalog.modalities.items()}
  new_vectors[name][1] = 0.0
  bigger = tables.extended(schema, ItemCatalog({k: np.asarray(v)[:2] for k, v in
                                                catalog.side.items()}, new_vectors))
  np.testing.assert_array_equal(bigger.all_present(name), np.concatenate([want, [True, False]]))
  with jax.set_mesh(jax.make_mesh((1, 1), ("data", "model"))):
    sharded = catalog_lib.CatalogTables(
        schema, catalog, sharding=ShardingRules(batch_axis="data", table_axis="model"))
  assert not sharded.readable_whole
  with pytest.raises(ValueError, match="row-sharded"):
    sharded.all_vectors(name)


def test_catalog_is_frozen_and_not_in_params():
  model = small_model("dmf")
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
