"""SimTier (`nn.simtier`): the histogram against numpy, padding ignored; the module's shape
and bad settings."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from dmf_jax.nn.simtier import SimTier, simtier_histogram


@pytest.mark.parametrize("normalization", ["count", "normalized", "log1p"])
@pytest.mark.parametrize("lookup", ["gather", "one_hot"])
def test_simtier_histogram_matches_numpy_and_ignores_padding(normalization, lookup):
  rng = np.random.default_rng(0)
  s = rng.uniform(-1, 1, size=(4, 9, 2)).astype(np.float32)
  mask = rng.random((4, 9)) < 0.6
  mask[3] = False
  s_garbage = np.where(mask[..., None], s, np.nan).astype(np.float32)  # padding holds NaN
  got = np.asarray(simtier_histogram(jnp.asarray(s_garbage), jnp.asarray(mask), 20, normalization,
                                     lookup))
  np.testing.assert_allclose(got, reference.simtier(s, mask, 20, normalization), rtol=1e-6)
  assert np.all(got[3] == 0)
  if normalization == "count":
    np.testing.assert_array_equal(got.sum(-1), np.broadcast_to(mask.sum(-1)[:, None], (4, 2)))


def test_simtier_module_shape_and_bad_normalization():
  mod = SimTier(3, num_tiers=10, hidden=(8, 4), rngs=nnx.Rngs(0))
  out = mod(jnp.zeros((5, 7, 3)), jnp.ones((5, 7), bool))
  assert out.shape == (5, 4) and mod.out_dim == 4
  with pytest.raises(ValueError, match="SimTier normalization 'sqrt' is not one of"):
    SimTier(3, normalization="sqrt", rngs=nnx.Rngs(0))
