"""Complementary Modality Modeling (CMM): combining the modality-enriched and -centric paths."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.nn.layers import Linear

CMM_MODES = ("concat", "weighted", "gate")


class CMM(nnx.Module):
  """r_ME [B, d_me], r_MC [B, d_mc] -> [B, out_dim].

  'concat' (default): [r_ME ; r_MC], out_dim = d_me + d_mc (the head's MLP mixes them).
  'weighted': alpha * relu(W_me r_ME) + (1 - alpha) * relu(W_mc r_MC), alpha a fixed constant.
  'gate': g * relu(W_me r_ME) + (1 - g) * relu(W_mc r_MC), g = sigmoid(W_g [r_ME ; r_MC]) per unit.
  """

  def __init__(
      self,
      me_dim: int,
      mc_dim: int,
      *,
      mode: str = "concat",
      dim: int = 64,
      alpha: float = 0.5,
      rngs: nnx.Rngs,
  ):
    if mode not in CMM_MODES:
      raise ValueError(f"CMM mode {mode!r} is not one of {CMM_MODES}")
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"CMM alpha must be in [0, 1], got {alpha}")
    self.mode = mode
    self.alpha = alpha
    if mode == "concat":
      self.out_dim = me_dim + mc_dim
      return
    self.out_dim = dim
    self.me = Linear(me_dim, dim, rngs=rngs)
    self.mc = Linear(mc_dim, dim, rngs=rngs)
    if mode == "gate":
      self.gate = Linear(me_dim + mc_dim, dim, rngs=rngs)

  def __call__(self, r_me: jax.Array, r_mc: jax.Array) -> jax.Array:
    if self.mode == "concat":
      return jnp.concatenate([r_me, r_mc], axis=-1)
    me, mc = jax.nn.relu(self.me(r_me)), jax.nn.relu(self.mc(r_mc))
    if self.mode == "weighted":
      return self.alpha * me + (1.0 - self.alpha) * mc
    g = jax.nn.sigmoid(self.gate(jnp.concatenate([r_me, r_mc], axis=-1)))
    return g * me + (1.0 - g) * mc
