"""Dense building blocks: dense layers over flattened leading dims, the Dice activation, MLP
towers, DCNv2's cross network and the prediction head."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core.sharding import over_merged_rows

ACTIVATIONS = ("relu", "dice", "sigmoid")


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., K] @ kernel [K, M] -> [..., M], computed as one [E, K] @ [K, M] product over the
  leading dims merged (E = their product).

  The same function as `x @ kernel`; XLA's CPU backend runs the 2-D product and, above all,
  its weight gradient (a contraction over E) about 2x faster than over several leading dims
  (a DIN train step: 41 -> 24 ms; BUILD_NOTES, 2026-12-05 fourth session)."""
  return over_merged_rows(lambda rows: rows @ kernel, x)


class Linear(nnx.Linear):
  """`nnx.Linear` (the same parameters, initializers and dtypes) that runs over the input's
  leading dims merged into one, as `dense` does: [..., in] -> [..., out]."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return over_merged_rows(super().__call__, x)


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
        [Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])]
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


class CrossNetwork(nnx.Module):
  """DCNv2's cross layers (Wang et al., 2021): [..., D] -> [..., D],

    x_{l+1} = x_0 * (W_l x_l + b_l) + x_l,   l = 0 .. num_layers - 1,

  with W_l a full [D, D] matrix (rank 0) or the paper's low-rank U_l V_l^T (U_l, V_l [D, r]):
  explicit feature crosses of growing degree, the residual keeping x_l.
  """

  def __init__(self, dim: int, num_layers: int, *, rank: int = 0, rngs: nnx.Rngs):
    if num_layers < 1 or rank < 0:
      raise ValueError(f"CrossNetwork needs num_layers >= 1 and rank >= 0, got {num_layers}, "
                       f"{rank}")
    self.down = nnx.List([Linear(dim, rank, use_bias=False, rngs=rngs)
                          for _ in range(num_layers)] if rank else [])
    self.up = nnx.List([Linear(rank or dim, dim, rngs=rngs) for _ in range(num_layers)])

  def __call__(self, x: jax.Array) -> jax.Array:
    x0 = x
    for l, up in enumerate(self.up):
      x = x0 * up(self.down[l](x) if len(self.down) else x) + x
    return x


class PredictionHead(nnx.Module):
  """[B, in_dim] -> float32 [B]: an MLP tower then one logit; with cross_layers > 0 DCNv2's
  stacked form, `CrossNetwork` (of rank `cross_rank`) before the tower. The logit is float32
  whatever the compute dtype (`nn.precision`)."""

  def __init__(
      self,
      in_dim: int,
      hidden: Sequence[int],
      *,
      activation: str = "relu",
      dropout: float = 0.0,
      cross_layers: int = 0,
      cross_rank: int = 0,
      rngs: nnx.Rngs,
  ):
    self.cross = (CrossNetwork(in_dim, cross_layers, rank=cross_rank, rngs=rngs)
                  if cross_layers else None)
    self.tower = MLP(in_dim, hidden, activation=activation, dropout=dropout, rngs=rngs)
    self.logit = Linear(self.tower.out_dim, 1, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False, rngs: nnx.Rngs | None = None):
    if self.cross is not None:
      x = self.cross(x)
    return self.logit(self.tower(x, train=train, rngs=rngs))[..., 0].astype(jnp.float32)
