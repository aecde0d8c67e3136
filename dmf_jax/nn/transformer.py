"""A Transformer encoder layer over masked sequences (BST's behaviour encoder)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class TransformerLayer(nnx.Module):
  """Post-norm encoder layer (Vaswani et al.; BST's form): x [..., T, D], mask bool [..., T]
  -> [..., T, D], with H heads of width D / H:

    a = softmax_k(q_h(x) k_h(x)^T / sqrt(D / H), keys with mask = False left out) v_h(x)
    h = LayerNorm(x + dropout(W_o [a_1 ; ... ; a_H]))
    y = LayerNorm(h + dropout(W_2 leaky_relu(W_1 h)))

  Padded positions (mask False) are never attended to; their own outputs are defined but
  meaningless (pool over valid positions). Every row needs at least one valid key.
  """

  def __init__(self, dim: int, num_heads: int, ffn_dim: int, *, dropout: float = 0.0,
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"TransformerLayer: dim {dim} is not a multiple of num_heads {num_heads}")
    self.num_heads = num_heads
    self.query, self.key, self.value, self.out = (nnx.Linear(dim, dim, rngs=rngs)
                                                  for _ in range(4))
    self.ffn_in = nnx.Linear(dim, ffn_dim, rngs=rngs)
    self.ffn_out = nnx.Linear(ffn_dim, dim, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout) if dropout > 0 else None

  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    *lead, t, d = x.shape
    heads = lambda y: y.reshape(*lead, t, self.num_heads, d // self.num_heads)
    q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
    scores = jnp.einsum("...qhc,...khc->...hqk", q, k) / jnp.sqrt(d / self.num_heads)
    scores = jnp.where(mask[..., None, None, :], scores, -1e30)
    attended = jnp.einsum("...hqk,...khc->...qhc", jax.nn.softmax(scores, -1), v)
    h = self.attention_norm(x + self._drop(self.out(attended.reshape(x.shape)), train, rngs))
    ffn = self.ffn_out(jax.nn.leaky_relu(self.ffn_in(h)))
    return self.ffn_norm(h + self._drop(ffn, train, rngs))

  def _drop(self, x, train, rngs):
    if self.dropout is None or not train:
      return x
    if rngs is None:
      raise ValueError("TransformerLayer: dropout in training needs `rngs` with a 'dropout' stream")
    return self.dropout(x, deterministic=False, rngs=rngs)
