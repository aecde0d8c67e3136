"""Embedding tables: numpy reference, OOV handling, pooling, gradients, row sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dmf_jax.nn.embedding import EmbeddingTable, FeatureEmbedding
from dmf_jax.core.schema import FeatureSpec
from dmf_jax.core.sharding import ShardingRules


def test_lookup_matches_numpy_and_has_oov_row():
  table = EmbeddingTable(10, 4, rngs=nnx.Rngs(0), name="item_id")
  ids = np.array([[0, 9, 3], [3, 3, 1]], np.int32)
  np.testing.assert_array_equal(table(jnp.asarray(ids)), np.asarray(table.embedding[...])[ids])
  assert table.embedding.shape == (11, 4)


def test_out_of_range_ids_rejected_eagerly_with_the_field_name():
  table = EmbeddingTable(10, 4, rngs=nnx.Rngs(0), name="item_id")
  with pytest.raises(ValueError, match=r"item_id: id 10 at index \(1,\) is out of range"):
    table(jnp.array([2, 10]))
  with pytest.raises(ValueError, match="item_id: id -1"):
    table(np.array([-1]))
  with pytest.raises(TypeError, match="item_id: expected an integer dtype"):
    table(jnp.array([1.0]))


def test_out_of_range_ids_use_the_oov_row_under_jit():
  table = EmbeddingTable(10, 4, rngs=nnx.Rngs(0))
  out = nnx.jit(lambda t, i: t(i))(table, jnp.array([-5, 10, 1000, 2]))
  rows = np.asarray(table.embedding[...])
  np.testing.assert_array_equal(out[:3], np.broadcast_to(rows[10], (3, 4)))
  np.testing.assert_array_equal(out[3], rows[2])


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_multi_valued_pooling_ignores_padding(pooling):
  spec = FeatureSpec("genres", 6, 3, max_values=4, pooling=pooling)
  emb = FeatureEmbedding(spec, rngs=nnx.Rngs(1))
  ids = np.array([[1, 2, -1, -1], [5, -1, -1, -1], [-1, -1, -1, -1], [0, 0, 4, 3]], np.int32)
  got = np.asarray(emb(jnp.asarray(ids)))
  rows = np.asarray(emb.table.embedding[...], np.float64)
  for i, row in enumerate(ids):
    valid = row[row >= 0]
    want = rows[valid].sum(0) if len(valid) else np.zeros(3)
    if pooling == "mean" and len(valid):
      want = want / len(valid)
    np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="genres: multi-valued field expects trailing size 4"):
    emb(jnp.zeros((2, 3), jnp.int32))


def test_gradient_scatters_into_looked_up_rows():
  table = EmbeddingTable(5, 2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(table)
  ids = jnp.array([1, 1, 3, 7])  # 7 -> the OOV row (5) under jit
  cot = np.arange(8, dtype=np.float32).reshape(4, 2)
  loss = lambda s, i: jnp.sum(nnx.merge(graphdef, s)(i) * cot)
  grad = jax.jit(jax.grad(loss))(state, ids)
  want = np.zeros((6, 2), np.float32)
  for i, row in zip([1, 1, 3, 5], cot):
    want[i] += row
  np.testing.assert_array_equal(np.asarray(grad["embedding"][...]), want)


def test_row_sharded_table_on_8_fake_devices():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  rules = ShardingRules(batch_axis="data", table_axis="model")
  with jax.set_mesh(mesh):
    table = EmbeddingTable(15, 6, rngs=nnx.Rngs(0), sharding=rules)
    assert nnx.get_partition_spec(nnx.state(table))["embedding"].get_value() == P("model", None)
    ids = np.arange(8 * 3).reshape(8, 3) % 17  # includes 15, 16: out of range -> OOV (jit)
    ids_sharded = jax.device_put(jnp.asarray(ids, jnp.int32), jax.NamedSharding(mesh, P("data")))
    out = nnx.jit(lambda t, i: t(i))(table, ids_sharded)
  assert table.embedding[...].sharding.spec == P("model", None)
  assert out.sharding.spec == P("data", None, None)
  rows = np.asarray(table.embedding[...])
  np.testing.assert_array_equal(np.asarray(out), rows[np.where(ids < 15, ids, 15)])
