"""GRU and AUGRU against a float64 reference: values, masks (carried states), gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
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
