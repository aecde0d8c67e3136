"""Low-rank adapters (LoRA) for the linear layers of a module.

A module built from `AdaptableLinear` layers runs in two modes that share the base weights:
  module(x)                 the base layers, fully trainable;
  module(x, adapted=True)   y = x stop_gradient(W) + stop_gradient(b) + (alpha / r) x A B
                            for layers that carry an adapter (others: stop_gradient base only),
so one copy of the weights serves a fully trained path and a frozen-base adapted path (EM3's
target and behaviour sides). A module's other parameters (norms, embeddings) freeze through
`frozen_base(module)`, a stop-gradient view used for the whole adapted call. `add_lora` attaches adapters by path pattern (B starts at zero, so
outputs are unchanged at init); `merge_lora` folds them into plain weights. Adapter weights are
`LoRAParam`s (an `nnx.Param` subtype): `nnx.Optimizer(module, tx, wrt=LoRAParam)` trains only them.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.nn.layers import Linear, dense


class LoRAParam(nnx.Param):
  """A LoRA adapter weight."""


class LoRAAdapter(nnx.Module):
  """x [..., in] -> (alpha / rank) (x A) B [..., out]; A [in, rank] random, B [rank, out] zero."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float,
               rngs: nnx.Rngs):
    if not isinstance(rank, int) or rank < 1:
      raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    init = nnx.initializers.he_uniform()
    self.a = LoRAParam(init(rngs.params(), (in_features, rank), jnp.float32))
    self.b = LoRAParam(jnp.zeros((rank, out_features), jnp.float32))
    self.scale = float(alpha) / rank

  def delta(self) -> jax.Array:
    """The kernel update scale * A B [in, out]."""
    return self.scale * self.a[...] @ self.b[...]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.scale * dense(dense(x, self.a[...]), self.b[...])


class AdaptableLinear(nnx.Module):
  """A dense layer [..., in] -> [..., out] that may carry a LoRA adapter (see module docstring)."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.base = Linear(in_features, out_features, rngs=rngs)
    self.adapter: LoRAAdapter | None = nnx.data(None)  # a submodule slot, filled by add_lora

  def __call__(self, x: jax.Array, *, adapted: bool = False) -> jax.Array:
    if not adapted:
      return self.base(x)
    y = dense(x, jax.lax.stop_gradient(self.base.kernel[...]))
    y = y + jax.lax.stop_gradient(self.base.bias[...])
    if self.adapter is not None:
      y = y + self.adapter(x)
    return y


def adaptable_layers(module: nnx.Module) -> dict[str, AdaptableLinear]:
  """Path ('layers/0/query') -> layer, for every AdaptableLinear inside `module`."""
  found = {}
  for path, child in nnx.iter_modules(module):
    if isinstance(child, AdaptableLinear):
      found["/".join(map(str, path))] = child
  return found


def add_lora(module: nnx.Module, *, rank: int, alpha: float, include: str = ".*",
             rngs: nnx.Rngs) -> list[str]:
  """Attaches adapters to the AdaptableLinear layers whose path fully matches `include`.

  Returns the adapted paths; an `include` that matches none is an error naming the paths.
  """
  layers = adaptable_layers(module)
  chosen = [p for p in layers if re.fullmatch(include, p)]
  if not chosen:
    raise ValueError(f"LoRA: pattern {include!r} matches no layer; layers: {sorted(layers)}")
  for path in chosen:
    base = layers[path].base
    layers[path].adapter = nnx.data(LoRAAdapter(base.in_features, base.out_features, rank=rank,
                                                alpha=alpha, rngs=rngs))
  return chosen


def frozen_base(module: nnx.Module) -> nnx.Module:
  """A view of `module` (same values) whose parameters other than LoRAParams are constants
  for autodiff: norms, embeddings and dense layers all freeze, the adapters still train."""
  graphdef, adapters, base, rest = nnx.split(module, LoRAParam, nnx.Param, ...)
  return nnx.merge(graphdef, adapters, jax.tree.map(jax.lax.stop_gradient, base), rest)


def merge_lora(module: nnx.Module) -> nnx.Module:
  """A copy of `module` whose adapted layers hold W + scale A B and no adapter.

  The copy's plain call `merged(x)` equals `module(x, adapted=True)`.
  """
  merged = nnx.clone(module)
  for layer in adaptable_layers(merged).values():
    if layer.adapter is not None:
      layer.base.kernel[...] = layer.base.kernel[...] + layer.adapter.delta()
      layer.adapter = nnx.data(None)
  return merged
