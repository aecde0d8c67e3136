"""MLP, Dice, the cross network (DCNv2) and the prediction head (`nn.layers`) against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from dmf_jax.nn.layers import MLP, CrossNetwork, Dice, PredictionHead


def test_relu_mlp_and_head_match_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  head = PredictionHead(6, (5, 3), rngs=nnx.Rngs(0))
  h = x.astype(np.float64)
  for layer in head.tower.layers:
    h = np.maximum(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]), 0)
  want = (h @ np.asarray(head.logit.kernel[...]) + np.asarray(head.logit.bias[...]))[:, 0]
  np.testing.assert_allclose(head(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


def cross_params(cross):
  kernels = [np.asarray(layer.kernel[...]) for layer in cross.up]
  biases = [np.asarray(layer.bias[...]) for layer in cross.up]
  return kernels, biases, [np.asarray(layer.kernel[...]) for layer in cross.down]


@pytest.mark.parametrize("rank", [0, 2])
def test_cross_network_matches_numpy_with_gradients(rank):
  """DCNv2's cross layers (full and low rank) against a float64 reference, forward and the
  gradients w.r.t. the input and a kernel (central differences of the reference)."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  r = rng.normal(size=(4, 6))
  cross = CrossNetwork(6, 3, rank=rank, rngs=nnx.Rngs(1))
  for layer in cross.up:  # non-zero biases: the reference must place them right
    layer.bias[...] = jnp.asarray(rng.normal(size=layer.bias.shape) * 0.3, jnp.float32)
  kernels, biases, downs = cross_params(cross)
  want = reference.cross_network(x, kernels, biases, downs)
  np.testing.assert_allclose(cross(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(want, x)

  def loss(model, x):
    return jnp.sum(model(x) * r)

  grad_model, grad_x = jax.grad(loss, argnums=(0, 1))(cross, jnp.asarray(x))
  eps = 1e-6

  def numeric(perturb):
    plus, minus = perturb(eps), perturb(-eps)
    return (np.sum(plus * r) - np.sum(minus * r)) / (2 * eps)

  for i, j in [(0, 0), (1, 3), (3, 5)]:
    def at_x(e, i=i, j=j):
      x64 = x.astype(np.float64)
      x64[i, j] += e
      return reference.cross_network(x64, kernels, biases, downs)
    np.testing.assert_allclose(grad_x[i, j], numeric(at_x), rtol=1e-4, atol=1e-4)
  kernel_grad = np.asarray(grad_model.up[1].kernel[...])
  for i, j in [(0, 1), (1, 4)]:
    def at_kernel(e, i=i, j=j):
      changed = [k.astype(np.float64) for k in kernels]
      changed[1][i, j] += e
      return reference.cross_network(x, changed, biases, downs)
    np.testing.assert_allclose(kernel_grad[i, j], numeric(at_kernel), rtol=1e-4, atol=1e-4)


def test_dcnv2_head_is_the_cross_network_then_the_tower():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  head = PredictionHead(6, (5, 3), cross_layers=2, cross_rank=3, rngs=nnx.Rngs(0))
  plain = PredictionHead(6, (5, 3), rngs=nnx.Rngs(0))
  plain.tower, plain.logit = head.tower, head.logit
  np.testing.assert_allclose(head(x), plain(head.cross(x)), rtol=1e-6)
  with pytest.raises(ValueError, match="num_layers >= 1"):
    CrossNetwork(6, 0, rngs=nnx.Rngs(0))


def test_dice_uses_batch_statistics_in_training_and_running_ones_otherwise():
  rng = np.random.default_rng(3)
  x = rng.normal(loc=2.0, scale=3.0, size=(64, 4)).astype(np.float32)
  dice = Dice(4, rngs=nnx.Rngs(0))
  dice.alpha[...] = jnp.array([0.1, -0.2, 0.5, 0.0])
  alpha = np.asarray(dice.alpha[...])
  z = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-8)
  p = 1 / (1 + np.exp(-z))
  np.testing.assert_allclose(dice(jnp.asarray(x), train=True), p * x + (1 - p) * alpha * x,
                             rtol=1e-4, atol=1e-5)
  mean = np.asarray(dice.norm.mean[...])
  np.testing.assert_allclose(mean, 0.01 * x.mean(0), rtol=1e-4)  # momentum 0.99 from 0
  var = np.asarray(dice.norm.var[...])
  p_eval = 1 / (1 + np.exp(-(x - mean) / np.sqrt(var + 1e-8)))
  np.testing.assert_allclose(dice(jnp.asarray(x), train=False),
                             p_eval * x + (1 - p_eval) * alpha * x, rtol=1e-4, atol=1e-5)


def test_mlp_dropout_needs_rngs_in_training_and_is_identity_in_eval():
  mlp = MLP(4, (8,), dropout=0.5, rngs=nnx.Rngs(0))
  x = jnp.ones((3, 4))
  with pytest.raises(ValueError, match="dropout in training needs `rngs`"):
    mlp(x, train=True)
  a = mlp(x, train=True, rngs=nnx.Rngs(dropout=1))
  np.testing.assert_array_equal(mlp(x), mlp(x))
  assert np.any(np.asarray(a) != np.asarray(mlp(x)))
  with pytest.raises(ValueError, match="activation 'gelu' is not one of"):
    MLP(4, (8,), activation="gelu", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5), (2, 3, 4, 5)])
def test_dense_and_linear_equal_the_plain_product_in_values_and_gradients(shape):
  """`dense` and `Linear` merge the leading dims into one product: the same function as
  x @ W (+ b) and nnx.Linear, values and gradients, against float64."""
  from dmf_jax.nn.layers import Linear, dense
  rng = np.random.default_rng(0)
  x = rng.normal(size=shape)
  kernel, probe = rng.normal(size=(5, 3)), rng.normal(size=(*shape[:-1], 3))
  with jax.enable_x64():
    x64, k64 = jnp.asarray(x), jnp.asarray(kernel)
    loss = lambda f: lambda x, k: jnp.sum(jnp.tanh(f(x, k)) * probe)
    got = jax.grad(loss(dense), argnums=(0, 1))(x64, k64)
    want = jax.grad(loss(lambda x, k: x @ k), argnums=(0, 1))(x64, k64)
    assert dense(x64, k64).shape == (*shape[:-1], 3)
    np.testing.assert_allclose(dense(x64, k64), x @ kernel, rtol=1e-12)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
  layer, plain = Linear(5, 3, rngs=nnx.Rngs(1)), nnx.Linear(5, 3, rngs=nnx.Rngs(1))
  xf = jnp.asarray(x, jnp.float32)
  np.testing.assert_allclose(layer(xf), plain(xf), rtol=1e-5, atol=1e-6)
  grads = [nnx.grad(lambda m: jnp.sum(jnp.tanh(m(xf)) * probe))(m) for m in (layer, plain)]
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(getattr(grads[0], name)[...], getattr(grads[1], name)[...],
                               rtol=1e-4, atol=1e-5)


def test_dense_keeps_the_batch_split_on_a_mesh_and_falls_back_for_other_splits():
  """On a ('data', 'model') mesh with Explicit axes the merged rows stay split over 'data';
  an input split on a later leading dim takes the plain product (no merged sharding exists)."""
  from jax.sharding import PartitionSpec as P
  from dmf_jax.nn.layers import dense
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 4, 5)).astype(np.float32)
  kernel = rng.normal(size=(5, 3)).astype(np.float32)
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  with jax.set_mesh(mesh):
    for spec in (P("data", None, None), P(None, "data", None)):
      xs = jax.device_put(x, spec)
      out = jax.jit(dense)(xs, jnp.asarray(kernel))
      np.testing.assert_allclose(out, x @ kernel, rtol=1e-5, atol=1e-5)
      assert jax.typeof(out).sharding.spec[:2] == tuple(spec)[:2]


def test_contract_leading_sums_over_every_leading_dim_on_and_off_a_mesh():
  """`core.sharding.contract_leading`: sum over the leading dims of a[..., i] b[..., j],
  against float64, unsplit (one merged product) and split over 'data' on any leading dim."""
  from jax.sharding import PartitionSpec as P
  from dmf_jax.core.sharding import contract_leading
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(4, 8, 5)), rng.normal(size=(4, 8, 4))
  want = np.einsum("lbi,lbj->ij", a, b)
  a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  np.testing.assert_allclose(jax.jit(contract_leading)(a32, b32), want, rtol=1e-5, atol=1e-5)
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  with jax.set_mesh(mesh):
    for spec in (P(None, "data", None), P("data", None, None)):
      out = jax.jit(contract_leading)(jax.device_put(a32, spec), jax.device_put(b32, spec))
      np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
      assert out.shape == (5, 4) and all(s is None for s in jax.typeof(out).sharding.spec)
