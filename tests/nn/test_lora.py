"""LoRA (`nn.lora`): zero B leaves outputs unchanged and merges exactly; only the adapters
train."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import small_qformer
from dmf_jax.nn import lora

RNG = np.random.default_rng(0)


def adapted_module(include=r"layers/.*|output", rank=3):
  module = small_qformer((7, 5))
  paths = lora.add_lora(module, rank=rank, alpha=6.0, include=include, rngs=nnx.Rngs(2))
  return module, paths


def test_lora_zero_b_leaves_outputs_unchanged_and_merges_exactly():
  module, paths = adapted_module()
  assert "output" in paths and "layers/1/query" in paths and "projections/0" not in paths
  vectors = [jnp.asarray(RNG.normal(size=(10, d)), jnp.float32) for d in (7, 5)]
  np.testing.assert_allclose(module(vectors, adapted=True), module(vectors), rtol=1e-6, atol=1e-6)
  for layer in lora.adaptable_layers(module).values():  # non-zero B: now the adapters count
    if layer.adapter is not None:
      layer.adapter.b[...] = jnp.asarray(RNG.normal(size=layer.adapter.b.shape) * 0.3,
                                         jnp.float32)
  adapted = module(vectors, adapted=True)
  assert np.max(np.abs(np.asarray(adapted - module(vectors)))) > 1e-3
  merged = lora.merge_lora(module)
  np.testing.assert_allclose(merged(vectors), adapted, rtol=1e-5, atol=1e-5)
  assert all(l.adapter is None for l in lora.adaptable_layers(merged).values())
  with pytest.raises(ValueError, match="pattern 'attn/.\\*' matches no layer"):
    lora.add_lora(small_qformer((7,)), rank=2, alpha=1.0, include="attn/.*", rngs=nnx.Rngs(0))


def test_lora_trains_only_the_adapters():
  module, _ = adapted_module()
  vectors = [jnp.asarray(RNG.normal(size=(32, d)), jnp.float32) for d in (7, 5)]
  target = jnp.asarray(RNG.normal(size=(32, 12)), jnp.float32)

  def loss(m):
    return jnp.mean((m(vectors, adapted=True) - target) ** 2)

  grads = nnx.jit(nnx.grad(loss))(module)
  flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  base = {k: v for k, v in flat.items() if "/adapter/" not in k}
  adapters = {k: v for k, v in flat.items() if "/adapter/" in k}
  assert all(np.all(v == 0) for v in base.values())  # frozen base: no gradient at all
  assert any(np.any(v != 0) for v in adapters.values())
  params = lambda: {"/".join(map(str, p)): np.asarray(v[...])
                    for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  before = params()
  optimizer = nnx.Optimizer(module, optax.adamw(1e-2, weight_decay=0.5), wrt=lora.LoRAParam)

  @nnx.jit
  def train_step(module, optimizer):
    optimizer.update(module, nnx.grad(loss, argnums=nnx.DiffState(0, lora.LoRAParam))(module))

  for _ in range(3):
    train_step(module, optimizer)
  after = params()
  for key, value in before.items():
    changed = not np.array_equal(value, after[key])
    assert changed == ("/adapter/" in key), key
