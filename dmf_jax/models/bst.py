"""BST, the Behavior Sequence Transformer (Chen et al., 2019): a Transformer encoder over the
behaviour sequence with the target appended, learned position embeddings.

  x_j = W_p k_j + p_j (j = 1..L, the history tokens),  x_{L+1} = W_p e_t + p_{L+1}
  z = Transformer_layers(x; padded history positions masked out of the keys)
  logit = head([user ; e_t ; z_{L+1} ; mean over valid j of z_j])

The target sits inside the sequence, so the encoder runs once per candidate ([B, N, L + 1]
tokens): no user-side state can be shared across candidates beyond the projected history.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.sharding import NO_SHARDING
from dmf_jax.models.base import CTRModel, ModelConfig, prediction_head
from dmf_jax.nn.transformer import TransformerLayer

POSITION_INIT_STDDEV = 0.02


@dataclasses.dataclass(frozen=True)
class BstConfig(ModelConfig):
  """The Transformer's width, heads, layers and feed-forward width (dropout: `dropout`)."""

  bst_dim: int = checks.field(32, "positive_int")
  bst_heads: int = checks.field(2, "positive_int")
  bst_layers: int = checks.field(1, "positive_int")
  bst_ffn_dim: int = checks.field(64, "positive_int")

  def cross_field_problems(self) -> list[str]:
    problems = super().cross_field_problems()
    if self.bst_dim % self.bst_heads:
      problems.append(f"bst_dim {self.bst_dim} must be a multiple of bst_heads {self.bst_heads}")
    return problems


class BST(CTRModel):
  """BST over the item tokens [e ; content]."""

  def __init__(self, schema, config: BstConfig, *, rngs, catalog=None, sharding=NO_SHARDING,
               content=None):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     content=content)
    d = config.bst_dim
    self.project = nnx.Linear(self.token_dim, d, rngs=rngs)
    self.positions = nnx.Param(jax.nn.initializers.normal(POSITION_INIT_STDDEV)(
        rngs.params(), (schema.seq_len + 1, d), jnp.float32))
    self.layers = nnx.List([
        TransformerLayer(d, config.bst_heads, config.bst_ffn_dim, dropout=config.dropout,
                         rngs=rngs) for _ in range(config.bst_layers)])
    self.head = prediction_head(schema.user_dim + self.token_dim + 2 * d, config, rngs=rngs)

  def encode_user(self, batch, *, train=False, rngs=None):
    """user [B, u]; mask [B, L]; the projected history with positions [B, L, bst_dim]."""
    mask, rows = batch["hist_mask"], self.history_rows(batch)
    tokens = self.item_tokens(rows, sequence=True, train=train, rngs=rngs).take()
    length = mask.shape[1]
    return {"user": self.user_embedding(batch), "mask": mask,
            "history": self.project(tokens) + self.positions[:length]}

  def score(self, state, candidates, *, train=False, rngs=None):
    target = self.candidate_tokens(state, candidates, train=train, rngs=rngs)  # [B, N, d_tok]
    history, mask = state["history"], state["mask"]
    (b, n), length = candidates.shape, mask.shape[1]
    x = jnp.concatenate([
        jnp.broadcast_to(history[:, None], (b, n, *history.shape[1:])),
        (self.project(target) + self.positions[length])[:, :, None]], axis=2)
    valid = jnp.broadcast_to(mask[:, None], (b, n, length))
    keys = jnp.concatenate([valid, jnp.ones_like(valid[..., :1])], axis=-1)  # [B, N, L + 1]
    for layer in self.layers:
      x = layer(x, keys, train=train, rngs=rngs)
    weights = valid.astype(x.dtype)[..., None]
    pooled = (x[:, :, :length] * weights).sum(2) / jnp.maximum(weights.sum(2), 1.0)
    return self.predict(state, [target, x[:, :, length], pooled], train=train, rngs=rngs)
