"""Dense building blocks: the Dice activation, MLP towers and the prediction head."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = ("relu", "dice", "sigmoid")


class Dice(nnx.Module):
  """Data-adaptive activation (DIN): p(x) x + (1 - p(x)) alpha x, p = sigmoid(BN(x)).

  [..., dim] -> [..., dim]. In training p uses the batch's statistics (and updates the running
  ones); otherwise the running statistics.
  """

  def __init__(self, dim: int, *, rngs: nnx.Rngs, momentum: float = 0.99, epsilon: float = 1e-8):
    self.norm = nnx.BatchNorm(
        dim, use_bias=False, use_scale=False, momentum=momentum, epsilon=epsilon, rngs=rngs
    )
    self.alpha = nnx.Param(jnp.zeros((dim,), jnp.float32))

  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    p = jax.nn.sigmoid(self.norm(x, use_running_average=not train))
    return p * x + (1.0 - p) * self.alpha[...] * x


class MLP(nnx.Module):
  """Dense layers with an activation after each: [..., in_dim] -> [..., hidden[-1]]."""

  def __init__(
      self,
      in_dim: int,
      hidden: Sequence[int],
      *,
      activation: str = "relu",
      dropout: float = 0.0,
      rngs: nnx.Rngs,
  ):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    if not hidden:
      raise ValueError("MLP needs at least one hidden size")
    dims = (in_dim, *hidden)
    self.activation = activation
    self.layers = nnx.List(
        [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])]
    )
    self.dices = nnx.List(
        [Dice(b, rngs=rngs) for b in hidden] if activation == "dice" else []
    )
    self.dropout = nnx.Dropout(dropout) if dropout > 0 else None
    self.out_dim = dims[-1]

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    return self.layer_outputs(x, train=train, rngs=rngs)[-1]

  def layer_outputs(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None
                    ) -> list[jax.Array]:
    """Every layer's activated output: [..., hidden[i]] for each i."""
    outputs = []
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if self.activation == "dice":
        x = self.dices[i](x, train=train)
      elif self.activation == "relu":
        x = jax.nn.relu(x)
      else:
        x = jax.nn.sigmoid(x)
      if self.dropout is not None and train:
        if rngs is None:
          raise ValueError("MLP: dropout in training needs `rngs` with a 'dropout' stream")
        x = self.dropout(x, deterministic=False, rngs=rngs)
      outputs.append(x)
    return outputs


class PredictionHead(nnx.Module):
  """MLP tower then one logit: [B, in_dim] -> [B]."""

  def __init__(
      self,
      in_dim: int,
      hidden: Sequence[int],
      *,
      activation: str = "relu",
      dropout: float = 0.0,
      rngs: nnx.Rngs,
  ):
    self.tower = MLP(in_dim, hidden, activation=activation, dropout=dropout, rngs=rngs)
    self.logit = nnx.Linear(self.tower.out_dim, 1, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    return self.logit(self.tower(x, train=train, rngs=rngs))[..., 0]
