"""GRU and AUGRU against a float64 reference: values, masks (carried states), gradients (the
hand-written backward pass against autodiff of the plain scan)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from helpers import plain_gru
from dmf_jax.nn.recurrent import GRU

L, D, H = 6, 5, 4


def setup(seed=0):
  rng = np.random.default_rng(seed)
  gru = GRU(D, H, rngs=nnx.Rngs(seed))
  gru.inputs.bias[...] = jnp.asarray(0.3 * rng.normal(size=3 * H), jnp.float32)
  x = rng.normal(size=(3, L, D)).astype(np.float32)
  mask = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1]], bool)
  attention = rng.uniform(size=(3, L)).astype(np.float32)
  params = [np.asarray(a, np.float64) for a in
            (gru.inputs.kernel[...], gru.inputs.bias[...], gru.recurrent.kernel[...])]
  return gru, x, mask, attention, params


@pytest.mark.parametrize("augru", [False, True])
def test_matches_the_float64_reference_and_carries_state_over_padding(augru):
  gru, x, mask, attention, params = setup()
  got = np.asarray(gru(jnp.asarray(x), jnp.asarray(mask),
                       jnp.asarray(attention) if augru else None))
  for b in range(3):
    want = reference.gru(x[b], mask[b], *params, attention[b] if augru else None)
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[1, 3:], np.repeat(got[1, 2:3], 3, 0))  # padding: carried
  assert got.shape == (3, L, H)


def test_attention_gradients_match_central_differences():
  gru, x, mask, attention, params = setup(1)
  r = np.random.default_rng(3).normal(size=H)
  b = 2
  fn = lambda a: jnp.sum(gru(jnp.asarray(x[b]), jnp.asarray(mask[b]), a)[-1] * r)
  grad = np.asarray(jax.grad(fn)(jnp.asarray(attention[b])))
  eps = 1e-6
  for t in range(L):
    plus, minus = attention[b].astype(np.float64), attention[b].astype(np.float64)
    plus[t] += eps
    minus[t] -= eps
    want = (reference.gru(x[b], mask[b], *params, plus)[-1] @ r
            - reference.gru(x[b], mask[b], *params, minus)[-1] @ r) / (2 * eps)
    np.testing.assert_allclose(grad[t], want, rtol=2e-3, atol=2e-5)
  assert grad[1] == 0.0 and grad[4] == 0.0  # masked steps do not update the state


@pytest.mark.parametrize("augru", [False, True])
def test_backward_pass_equals_autodiff_of_the_plain_scan_in_float64(augru):
  """The hand-written backward scan: the gradients of every input (x, attention) and
  parameter equal JAX's autodiff of the plain scan (`helpers.plain_gru`), in float64, over two
  leading dims, masks with holes, a probe on every state."""
  rng = np.random.default_rng(5)
  lead = (2, 3)
  with jax.enable_x64():
    gru = GRU(D, H, rngs=nnx.Rngs(2))
    for layer in (gru.inputs, gru.recurrent):  # float64 parameters
      layer.kernel.value = jnp.asarray(rng.normal(size=layer.kernel.shape))
    gru.inputs.bias.value = jnp.asarray(0.3 * rng.normal(size=3 * H))
    x = jnp.asarray(rng.normal(size=(*lead, L, D)))
    mask = jnp.asarray(rng.uniform(size=(*lead, L)) < 0.7)
    attention = jnp.asarray(rng.uniform(size=(*lead, L))) if augru else None
    probe = jnp.asarray(rng.normal(size=(*lead, L, H)))
    graphdef, params = nnx.split(gru)

    def loss(forward):
      return lambda params, x, a: jnp.sum(jnp.tanh(forward(nnx.merge(graphdef, params), x, a))
                                          * probe)

    args = (params, x, attention)
    argnums = (0, 1, 2) if augru else (0, 1)
    got = jax.grad(loss(lambda m, x, a: m(x, mask, a)), argnums)(*args)
    want = jax.grad(loss(lambda m, x, a: plain_gru(m, x, mask, a)), argnums)(*args)
    np.testing.assert_allclose(gru(x, mask, attention), plain_gru(gru, x, mask, attention),
                               rtol=1e-12, atol=1e-12)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert g.dtype == jnp.float64 and np.abs(np.asarray(w)).max() > 1e-3
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_time_major_recurrence_equals_the_batch_major_one():
  """`recur_time_major` over the gates of `project_gates`, time-major, is `recur` over
  `project` transposed."""
  gru, x, mask, attention, _ = setup(4)
  x, mask, attention = jnp.asarray(x), jnp.asarray(mask), jnp.asarray(attention)
  gates = tuple(jnp.swapaxes(g, 0, 1) for g in gru.project_gates(x))
  got = gru.recur_time_major(gates, mask.T, attention.T)
  np.testing.assert_allclose(np.swapaxes(got, 0, 1), gru.recur(gru.project(x), mask, attention),
                             rtol=1e-6, atol=1e-6)
