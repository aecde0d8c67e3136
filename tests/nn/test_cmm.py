"""CMM (`nn.cmm`): every mode against numpy."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmf_jax.nn.cmm import CMM


def test_cmm_modes_match_numpy():
  rng = np.random.default_rng(1)
  me = rng.normal(size=(3, 5)).astype(np.float32)
  mc = rng.normal(size=(3, 4)).astype(np.float32)
  relu = lambda x: np.maximum(x, 0)
  sig = lambda x: 1 / (1 + np.exp(-x))
  lin = lambda layer, x: x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

  concat = CMM(5, 4, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(concat(jnp.asarray(me), jnp.asarray(mc)), np.c_[me, mc])
  assert concat.out_dim == 9

  weighted = CMM(5, 4, mode="weighted", dim=6, alpha=0.3, rngs=nnx.Rngs(0))
  want = 0.3 * relu(lin(weighted.me, me)) + 0.7 * relu(lin(weighted.mc, mc))
  np.testing.assert_allclose(weighted(jnp.asarray(me), jnp.asarray(mc)), want, rtol=1e-5, atol=1e-6)

  gate = CMM(5, 4, mode="gate", dim=6, rngs=nnx.Rngs(0))
  g = sig(lin(gate.gate, np.c_[me, mc]))
  want = g * relu(lin(gate.me, me)) + (1 - g) * relu(lin(gate.mc, mc))
  np.testing.assert_allclose(gate(jnp.asarray(me), jnp.asarray(mc)), want, rtol=1e-5, atol=1e-6)

  with pytest.raises(ValueError, match="CMM mode 'sum' is not one of"):
    CMM(5, 4, mode="sum", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="CMM alpha must be in"):
    CMM(5, 4, mode="weighted", alpha=1.5, rngs=nnx.Rngs(0))
