"""The Fusion-Q-Former (`nn.qformer`): a fixed output size whatever the modalities, padding
ignored, modality dropout only in training."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import small_qformer

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("dims", [(7,), (7, 5), (7, 5, 9)])
def test_qformer_output_size_is_fixed_whatever_the_modalities(dims):
  vectors = [jnp.asarray(RNG.normal(size=(4, 6, d)), jnp.float32) for d in dims]
  out = small_qformer(dims)(vectors)
  assert out.shape == (4, 6, 12) and np.all(np.isfinite(np.asarray(out)))


def test_qformer_ignores_padding_and_its_position():
  module = small_qformer((7, 5, 9))
  tokens = jnp.asarray(RNG.normal(size=(8, 5, 16)), jnp.float32)
  mask = jnp.asarray(RNG.random((8, 5)) < 0.6).at[:, 0].set(True)
  out = module.fuse_tokens(tokens, mask)
  # Other values in the padded slots: same output.
  noise = jnp.asarray(RNG.normal(size=tokens.shape) * 100, jnp.float32)
  np.testing.assert_allclose(module.fuse_tokens(jnp.where(mask[..., None], tokens, noise), mask),
                             out, rtol=1e-5, atol=1e-5)
  # Padding moved elsewhere (tokens permuted per row): same output.
  perm = np.stack([RNG.permutation(5) for _ in range(8)])
  rows = np.arange(8)[:, None]
  np.testing.assert_allclose(module.fuse_tokens(tokens[rows, perm], mask[rows, perm]), out,
                             rtol=1e-5, atol=1e-5)
  # A missing modality (all-zero vector) is masked: changing its projection input is a no-op.
  vectors = [jnp.asarray(RNG.normal(size=(8, d)), jnp.float32) for d in (7, 5, 9)]
  vectors[1] = vectors[1].at[:3].set(0.0)
  present = jnp.stack([jnp.any(v != 0, -1) for v in vectors], -1)
  assert not bool(present[:3, 1].any()) and bool(present[3:, 1].all())
  a = module(vectors)
  shifted = [vectors[0], vectors[1].at[:3].set(5.0), vectors[2]]
  np.testing.assert_allclose(module(shifted, present)[:3], a[:3], rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(np.asarray(module(shifted)[:3] - a[:3]))) > 1e-3  # unmasked: it counts


def test_qformer_modality_dropout_only_in_training():
  module = small_qformer((7, 5), modality_dropout=0.5)
  vectors = [jnp.asarray(RNG.normal(size=(64, d)), jnp.float32) for d in (7, 5)]
  np.testing.assert_array_equal(module(vectors), module(vectors))
  trained = module(vectors, train=True, rngs=nnx.Rngs(dropout=3))
  assert np.max(np.abs(np.asarray(trained - module(vectors)))) > 1e-3
  with pytest.raises(ValueError, match="modality dropout in training needs `rngs`"):
    module(vectors, train=True)
  with pytest.raises(ValueError, match=r"vectors\[1\]"):
    module([vectors[0], vectors[0]])
