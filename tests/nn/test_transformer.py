"""The Transformer encoder layer against a float64 reference: values, masks, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from dmf_jax.nn.transformer import TransformerLayer

T, D, HEADS = 5, 8, 2


def layer_and_params(seed=0):
  rng = np.random.default_rng(seed)
  layer = TransformerLayer(D, HEADS, 12, rngs=nnx.Rngs(seed))
  for norm in (layer.attention_norm, layer.ffn_norm):  # not the identity: placement matters
    norm.scale[...] = jnp.asarray(1 + 0.3 * rng.normal(size=D), jnp.float32)
    norm.bias[...] = jnp.asarray(0.3 * rng.normal(size=D), jnp.float32)
  for lin in (layer.query, layer.key, layer.value, layer.out, layer.ffn_in, layer.ffn_out):
    lin.bias[...] = jnp.asarray(0.2 * rng.normal(size=lin.bias.shape), jnp.float32)
  return layer, params_of(layer)


def params_of(layer):
  f = lambda a: np.asarray(a[...], np.float64)
  lin = lambda m: (f(m.kernel), f(m.bias))
  return {"q": lin(layer.query), "k": lin(layer.key), "v": lin(layer.value),
          "o": lin(layer.out), "f1": lin(layer.ffn_in), "f2": lin(layer.ffn_out),
          "n1": (f(layer.attention_norm.scale), f(layer.attention_norm.bias)),
          "n2": (f(layer.ffn_norm.scale), f(layer.ffn_norm.bias))}


def inputs(seed=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3, T, D)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 0, 0, 1, 1]], bool)
  return x, mask


def test_layer_matches_the_float64_reference_with_masks():
  layer, p = layer_and_params()
  x, mask = inputs()
  got = np.asarray(layer(jnp.asarray(x), jnp.asarray(mask)))
  for b in range(len(x)):
    np.testing.assert_allclose(got[b], reference.transformer_layer(x[b], mask[b], p, HEADS),
                               rtol=1e-4, atol=1e-4)


def test_masked_positions_do_not_reach_the_valid_outputs():
  layer, _ = layer_and_params()
  x, mask = inputs()
  changed = x.copy()
  changed[~mask] += 5.0
  a = np.asarray(layer(jnp.asarray(x), jnp.asarray(mask)))
  b = np.asarray(layer(jnp.asarray(changed), jnp.asarray(mask)))
  np.testing.assert_allclose(a[mask], b[mask], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[~mask], b[~mask])  # their own rows did change


def test_input_gradients_match_central_differences_of_the_reference():
  layer, p = layer_and_params()
  x, mask = inputs()
  r = np.random.default_rng(2).normal(size=(T, D))
  b = 1
  grad = jax.grad(lambda x: jnp.sum(layer(x, jnp.asarray(mask[b]))[mask[b]] * r[mask[b]]))(
      jnp.asarray(x[b]))
  eps = 1e-6

  def objective(x64):
    return np.sum(reference.transformer_layer(x64, mask[b], p, HEADS)[mask[b]] * r[mask[b]])

  for i, j in [(0, 0), (2, 5), (4, 7), (1, 3)]:  # (1, 3) is a masked position: gradient 0
    plus, minus = x[b].astype(np.float64), x[b].astype(np.float64)
    plus[i, j] += eps
    minus[i, j] -= eps
    want = (objective(plus) - objective(minus)) / (2 * eps)
    np.testing.assert_allclose(grad[i, j], want, rtol=2e-3, atol=2e-4)
  np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)


def test_bad_widths_are_refused():
  with pytest.raises(ValueError, match="not a multiple of num_heads"):
    TransformerLayer(6, 4, 8, rngs=nnx.Rngs(0))


def test_history_then_target_equals_the_whole_sequence_in_values_and_gradients():
  """`encode_history` + `with_target` (per user, then per target) against the plain layer over
  [history ; target] computed in float64: outputs of every position, and the gradients of every
  parameter, the history and the targets. Row 2's history is all padding (the target alone)."""
  layer, _ = layer_and_params()
  rng = np.random.default_rng(4)
  b, length, n = 3, 4, 2
  history = jnp.asarray(rng.normal(size=(b, length, D)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(b, n, D)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
  weights = jnp.asarray(rng.normal(size=(b, n, length + 1, D)), jnp.float32)
  graphdef, params = nnx.split(layer)

  def decoupled(params, history, targets):
    layer = nnx.merge(graphdef, params)
    out = layer.with_target(layer.encode_history(history, mask), targets)
    return jnp.sum(out * weights), out

  def plain(params, history, targets):
    layer = nnx.merge(graphdef, params)
    x = jnp.concatenate([jnp.broadcast_to(history[:, None], (b, n, length, D)),
                         targets[:, :, None]], axis=2)
    keys = jnp.concatenate([jnp.broadcast_to(mask[:, None], (b, n, length)),
                            jnp.ones((b, n, 1), bool)], axis=-1)
    out = layer(x, keys)
    return jnp.sum(out * weights.astype(out.dtype)), out

  args = (params, history, targets)
  (_, got), got_grads = jax.value_and_grad(decoupled, argnums=(0, 1, 2), has_aux=True)(*args)
  with jax.enable_x64(True):
    as64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64)
    (_, want), want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2), has_aux=True)(
        *jax.tree.map(as64, args))
    want, want_grads = np.asarray(want), jax.tree.map(np.asarray, want_grads)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  for a, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), w, rtol=1e-4, atol=1e-5)
  # every gradient non-trivial but the key bias's (softmax is shift-invariant: exactly 0)
  assert sum(np.abs(w).max() < 1e-9 for w in jax.tree.leaves(want_grads)) == 1
  assert np.isfinite(np.asarray(got)).all()


def test_one_target_per_user_without_a_candidate_axis_equals_the_candidate_form():
  """`with_target` over targets [B, D] (training's form) is the [B, 1, D] form without its
  unit axis, in values and in the gradients of every parameter, the history and the targets."""
  layer, _ = layer_and_params()
  rng = np.random.default_rng(5)
  b, length = 3, 4
  history = jnp.asarray(rng.normal(size=(b, length, D)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(b, D)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0]], bool)
  weights = jnp.asarray(rng.normal(size=(b, length + 1, D)), jnp.float32)
  graphdef, params = nnx.split(layer)

  def run(params, history, targets, axis):
    layer = nnx.merge(graphdef, params)
    state = layer.encode_history(history, mask)
    out = (layer.with_target(state, targets[:, None])[:, 0] if axis
           else layer.with_target(state, targets))
    return jnp.sum(out * weights), out

  grad = jax.value_and_grad(run, argnums=(0, 1, 2), has_aux=True)
  (_, got), got_grads = grad(params, history, targets, False)
  (_, want), want_grads = grad(params, history, targets, True)
  assert got.shape == (b, length + 1, D)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  for a, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-5, atol=1e-6)
