"""The Fusion-Q-Former (`nn.qformer`): a fixed output size whatever the modalities, padding
ignored, modality dropout only in training, the grouped layers equal to the plain ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmf_jax.nn import lora
from dmf_jax.nn.qformer import FusionQFormer
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


@pytest.mark.parametrize("num_queries,num_layers", [(2, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize("adapted", [False, True])
def test_grouped_layers_equal_the_layers_over_all_tokens_in_values_and_gradients(
    num_queries, num_layers, adapted):
  """`fuse_tokens` (the queries' first-layer projections once, the last layer's outputs for
  the queries only) against `fuse_tokens_plain` (every layer over all Q + K tokens) computed
  in float64: outputs, and the gradients of every parameter (LoRA adapters attached) and of
  the tokens. Row 1's modalities are all masked (the queries attend to themselves only)."""
  module = FusionQFormer((7, 5, 9), width=16, num_queries=num_queries, num_layers=num_layers,
                         num_heads=2, out_dim=12, rngs=nnx.Rngs(1))
  lora.add_lora(module, rank=2, alpha=2.0, include="layers/.*|output", rngs=nnx.Rngs(2))
  rng = np.random.default_rng(3)
  for _, p in nnx.iter_graph(module):  # B starts at zero: make every adapter count
    if isinstance(p, lora.LoRAParam):
      p[...] = jnp.asarray(0.1 * rng.normal(size=p.shape), jnp.float32)
  tokens = jnp.asarray(rng.normal(size=(5, 3, 16)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0], [1, 1, 0]], bool)
  weights = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)
  graphdef, params = nnx.split(module)

  def loss(fuse, params, tokens):
    out = getattr(nnx.merge(graphdef, params), fuse)(tokens, mask, adapted=adapted)
    return jnp.sum(out * weights.astype(out.dtype)), out

  (_, got), (got_grads, got_tokens) = jax.value_and_grad(
      lambda *a: loss("fuse_tokens", *a), argnums=(0, 1), has_aux=True)(params, tokens)
  with jax.enable_x64(True):
    as64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64)
    (_, want), want_grads = jax.value_and_grad(
        lambda *a: loss("fuse_tokens_plain", *a), argnums=(0, 1), has_aux=True)(
            *jax.tree.map(as64, (params, tokens)))
    want, want_grads = np.asarray(want), jax.tree.map(np.asarray, want_grads)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_tokens), want_grads[1], rtol=1e-4, atol=1e-5)
  assert np.abs(want_grads[1]).max() > 1e-3
  got_grads, want_grads = nnx.to_flat_state(got_grads), nnx.to_flat_state(want_grads[0])
  assert len(got_grads) == len(want_grads)
  for (path, a), (_, w) in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), w, rtol=1e-4, atol=1e-5, err_msg=str(path))
  grads = {"/".join(map(str, path)): np.abs(w).max() for path, w in want_grads}
  adapters = [g for path, g in grads.items() if path.endswith(("/a", "/b"))]
  assert len(adapters) == 2 * (6 * num_layers + 1)
  assert all((g > 1e-6) == adapted for g in adapters)  # used (and trained) only when adapted
  assert (grads["layers/0/query/base/kernel"] > 1e-6) != adapted  # frozen when adapted
  assert grads["queries"] > 1e-6 and grads[f"layers/{num_layers - 1}/norm1/scale"] > 1e-6
