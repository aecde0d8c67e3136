"""BST, the Behavior Sequence Transformer (Chen et al., 2019): a Transformer encoder over the
behaviour sequence with the target appended, learned position embeddings.

  x_j = W_p k_j + p_j (j = 1..L, the history tokens),  x_{L+1} = W_p e_t + p_{L+1}
  z = Transformer_layers(x; padded history positions masked out of the keys)
  logit = head([user ; e_t ; z_{L+1} ; mean over valid j of z_j])

The target sits inside the sequence, so the encoder runs once per candidate. Its first layer
does not start over for each: `encode_user` computes the history's side of its attention once
per user (`TransformerLayer.encode_history`: the history's queries, keys and values, projected
once per item row, and each history query's softmax sums over the history), and `score`
completes the layer per candidate (`with_target`: O(L) scores per head, not O(L^2)), exactly;
the later layers (bst_layers > 1) run over the whole [B, N, L + 1] sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.sharding import NO_SHARDING
from dmf_jax.models.base import CTRModel, ModelConfig, UserState, prediction_head
from dmf_jax.nn.layers import Linear
from dmf_jax.nn.transformer import HistoryAttention, TransformerLayer

POSITION_INIT_STDDEV = 0.02


@dataclasses.dataclass(frozen=True)
class BstConfig(ModelConfig):
  """The Transformer's width, heads, layers and feed-forward width (dropout: `dropout`)."""

  bst_dim: int = checks.field(32, "positive_int")  # the Transformer's width
  bst_heads: int = checks.field(2, "positive_int")  # its heads (bst_dim a multiple of them)
  bst_layers: int = checks.field(1, "positive_int")  # its encoder layers
  bst_ffn_dim: int = checks.field(64, "positive_int")  # its feed-forward width

  @classmethod
  def search_space(cls) -> dict[str, list]:
    return {**super().search_space(), "bst_dim": [16, 32, 64], "bst_layers": [1, 2]}

  def cross_field_problems(self) -> list[str]:
    problems = super().cross_field_problems()
    if self.bst_dim % self.bst_heads:
      problems.append(f"bst_dim {self.bst_dim} must be a multiple of bst_heads {self.bst_heads}")
    return problems


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class BstState(UserState):
  """user, mask and the first layer's attention state of the history."""

  history: HistoryAttention


class BST(CTRModel):
  """BST over the item tokens [e ; content]."""

  def __init__(self, schema, config: BstConfig, *, rngs, catalog=None, sharding=NO_SHARDING,
               content=None):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     content=content)
    d = config.bst_dim
    self.project = Linear(self.token_dim, d, rngs=rngs)
    self.positions = nnx.Param(jax.nn.initializers.normal(POSITION_INIT_STDDEV)(
        rngs.params(), (schema.seq_len + 1, d), jnp.float32))
    self.layers = nnx.List([
        TransformerLayer(d, config.bst_heads, config.bst_ffn_dim, dropout=config.dropout,
                         rngs=rngs) for _ in range(config.bst_layers)])
    self.head = prediction_head(schema.user_dim + self.token_dim + 2 * d, config, rngs=rngs)

  def encode_user(self, batch, *, train=False, rngs=None):
    """user [B, u]; mask [B, L]; the first layer's attention state of the history x_j =
    W_p k_j + p_j (`HistoryAttention`), its linear maps of x_j computed once per item row:
    f(x_j) = f(W_p k_j) + p_j W_f for f = the query, key and value."""
    mask, rows = batch["hist_mask"], self.history_rows(batch)
    tokens = self.item_tokens(rows, sequence=True, train=train, rngs=rngs)
    projected = tokens.map(self.project)
    positions = self.positions[:mask.shape[1]]
    first = self.layers[0]
    qkv = tuple(projected.map(f).take() + positions @ f.kernel[...]
                for f in (first.query, first.key, first.value))
    return BstState(user=self.user_embedding(batch), mask=mask,
                    history=first.encode_history(projected.take() + positions, mask, qkv))

  def score(self, state, candidates, *, train=False, rngs=None):
    target = self.candidate_tokens(state, candidates, train=train, rngs=rngs)  # [B, N, d_tok]
    mask = state.mask
    (b, n), length = candidates.shape, mask.shape[1]
    one = n == 1  # training: one candidate per user, the sequence without a unit N axis
    query = self.project(target[:, 0] if one else target) + self.positions[length]
    x = self.layers[0].with_target(state.history, query, train=train, rngs=rngs)
    valid = mask if one else jnp.broadcast_to(mask[:, None], (b, n, length))  # [B, (N,) L]
    keys = jnp.concatenate([valid, jnp.ones_like(valid[..., :1])], axis=-1)  # [B, (N,) L + 1]
    for layer in self.layers[1:]:
      x = layer(x, keys, train=train, rngs=rngs)  # [B, (N,) L + 1, bst_dim]
    weights = valid.astype(x.dtype)
    pooled = (jnp.einsum("b...l,b...ld->b...d", weights, x[..., :length, :])
              / jnp.maximum(weights.sum(-1), 1.0)[..., None])
    last = x[..., length, :]
    if one:
      last, pooled = last[:, None], pooled[:, None]
    return self.predict(state, [target, last, pooled], train=train, rngs=rngs)
