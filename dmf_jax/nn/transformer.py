"""A Transformer encoder layer over masked sequences (BST's behaviour encoder).

For a sequence whose last token is a target that changes while the L tokens before it (a
user's history) do not, `encode_history` computes the history's side of the attention once
and `with_target` completes the layer per target, exactly (online-softmax algebra): for a
history query i with scores s_ij over the valid history keys j and s_it against the target,

  softmax over {j} u {t} applied to v = (a S_i + b v_t) / (a Z_i + b),
  m_i = max_j s_ij,  Z_i = sum_j e^(s_ij - m_i),  S_i = sum_j e^(s_ij - m_i) v_j   (per user)
  m = max(m_i, s_it),  a = e^(m_i - m),  b = e^(s_it - m)                          (per target)

so a target costs O(L) scores per head instead of the O(L^2) of the whole sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.nn.layers import Linear

MASKED_SCORE = -1e30  # the score of a padded key: exp(MASKED_SCORE - max) is 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HistoryAttention:
  """A layer's attention state of a history of L tokens (heads H of width c), per user:

    x [B, L, D]  the layer's inputs          query, key, value [B, L, H, c]
    mask [B, L]  the valid history tokens    max, norm [B, L, H]; sum [B, L, H, c]: m_i, Z_i,
                                             S_i of each history query over the valid keys
  """

  x: jax.Array
  query: jax.Array
  key: jax.Array
  value: jax.Array
  mask: jax.Array
  max: jax.Array
  norm: jax.Array
  sum: jax.Array


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
    self.query, self.key, self.value, self.out = (Linear(dim, dim, rngs=rngs)
                                                  for _ in range(4))
    self.ffn_in = Linear(dim, ffn_dim, rngs=rngs)
    self.ffn_out = Linear(ffn_dim, dim, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout) if dropout > 0 else None

  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    q, k, v = (self.heads(f(x)) for f in (self.query, self.key, self.value))
    scores = self._scaled(jnp.einsum("...qhc,...khc->...hqk", q, k))
    scores = jnp.where(mask[..., None, None, :], scores, MASKED_SCORE)
    attended = jnp.einsum("...hqk,...khc->...qhc", jax.nn.softmax(scores, -1), v)
    return self._finish(x, attended, train, rngs)

  def heads(self, y: jax.Array) -> jax.Array:
    """[..., D] -> [..., H, D / H]."""
    return y.reshape(*y.shape[:-1], self.num_heads, y.shape[-1] // self.num_heads)

  def _scaled(self, scores: jax.Array) -> jax.Array:
    """Scores / sqrt(D / H)."""
    return scores / jnp.sqrt(self.query.in_features / self.num_heads)

  def _finish(self, x, attended, train, rngs):
    """The rest of the layer from the heads' attention [..., T, H, c]: the output projection,
    the residuals, the norms and the feed-forward block."""
    h = self.attention_norm(x + self._drop(self.out(attended.reshape(x.shape)), train, rngs))
    ffn = self.ffn_out(jax.nn.leaky_relu(self.ffn_in(h)))
    return self.ffn_norm(h + self._drop(ffn, train, rngs))

  def encode_history(self, x: jax.Array, mask: jax.Array,
                     qkv: tuple[jax.Array, jax.Array, jax.Array] | None = None
                     ) -> HistoryAttention:
    """The history's side of the attention, x [B, L, D], mask [B, L] -> `HistoryAttention`.
    qkv: the history's query, key and value [B, L, D] when the caller has them (computed per
    item row); else from x."""
    q, k, v = (self.heads(y) for y in (qkv or (self.query(x), self.key(x), self.value(x))))
    scores = self._scaled(jnp.einsum("bqhc,bkhc->bqhk", q, k))
    scores = jnp.where(mask[:, None, None, :], scores, MASKED_SCORE)
    top = jax.lax.stop_gradient(jnp.max(scores, -1))  # any shift gives the same function
    weights = jnp.exp(scores - top[..., None])  # [B, L, H, L]
    return HistoryAttention(x, q, k, v, mask, top, weights.sum(-1),
                            jnp.einsum("bqhk,bkhc->bqhc", weights, v))

  def with_target(self, history: HistoryAttention, target: jax.Array, *, train: bool = False,
                  rngs: nnx.Rngs | None = None) -> jax.Array:
    """The layer over [history ; target] for each target [B, ..., D] -> [B, ..., L + 1, D]
    (`self(concat(history.x, target), mask with the target valid)`, per target). The middle
    axes are the candidates: [B, N, D] for N per user, or none, [B, D] for one each (as
    training has it: XLA:CPU runs BST's step faster without a unit N axis, BUILD_NOTES)."""
    length = history.x.shape[1]
    lead = target.shape[:-1]  # [B, ...]
    per_target = lambda a: a.reshape(a.shape[0], *(1,) * (len(lead) - 1), *a.shape[1:])
    qt, kt, vt = (self.heads(f(target)) for f in (self.query, self.key, self.value))
    # history queries: the per-user sums merged with the target's key
    s_it = self._scaled(jnp.einsum("blhc,b...hc->b...lh", history.query, kt))  # [B, ..., L, H]
    top = jnp.maximum(per_target(history.max), jax.lax.stop_gradient(s_it))
    old, new = jnp.exp(per_target(history.max) - top), jnp.exp(s_it - top)
    from_history = ((old[..., None] * per_target(history.sum)
                     + jnp.einsum("b...lh,b...hc->b...lhc", new, vt))
                    / (old * per_target(history.norm) + new)[..., None])  # [B, ..., L, H, c]
    # the target's query over the history and itself
    s_tj = self._scaled(jnp.einsum("b...hc,blhc->b...hl", qt, history.key))
    s_tj = jnp.where(per_target(history.mask[:, None, :]), s_tj, MASKED_SCORE)
    s_tt = self._scaled(jnp.sum(qt * kt, -1, keepdims=True))  # [B, ..., H, 1]
    p = jax.nn.softmax(jnp.concatenate([s_tj, s_tt], -1), -1)
    from_target = (jnp.einsum("b...hl,blhc->b...hc", p[..., :length], history.value)
                   + p[..., length:] * vt)  # [B, ..., H, c]
    attended = jnp.concatenate([from_history, from_target[..., None, :, :]], axis=-3)
    x = jnp.concatenate([jnp.broadcast_to(per_target(history.x), (*lead, *history.x.shape[1:])),
                         target[..., None, :]], axis=-2)
    return self._finish(x, attended, train, rngs)

  def _drop(self, x, train, rngs):
    if self.dropout is None or not train:
      return x
    if rngs is None:
      raise ValueError("TransformerLayer: dropout in training needs `rngs` with a 'dropout' stream")
    return self.dropout(x, deterministic=False, rngs=rngs)
