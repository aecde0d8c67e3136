"""DIN: target attention of the DIN activation unit over the item tokens (Zhou et al., 2018).

  logit = head([user ; e_t ; sum_j w_tj k_tj ; extras])

with tokens k_j = [e_j ; content_j] and optional per-pair side features s_tj appended to the
keys. The hooks `attention_inputs` and `head_extras` are where the DIN-based baselines
(`dmf_jax.models.baselines`) add similarities, SimTier or MAKE's tower; a content tower
(EM3's Q-Former, the Vector baseline's projections) is passed in as `content`.
"""

from __future__ import annotations

import dataclasses
import jax

from dmf_jax.core import checks
from dmf_jax.core.sharding import NO_SHARDING
from dmf_jax.models.base import CTRModel, ModelConfig, SimilarityState, prediction_head
from dmf_jax.nn.attention import DIN_NORMALIZATIONS, DinAttention, DinUserState


@dataclasses.dataclass(frozen=True)
class DinConfig(ModelConfig):
  """DIN's activation unit."""

  din_hidden: tuple[int, ...] = checks.field((80, 40), "sizes")  # the activation unit's MLP
  # The attention weights: raw scores (DIN's 'none') or a masked softmax over the history.
  din_normalization: str = checks.field("none", DIN_NORMALIZATIONS)

  @classmethod
  def search_space(cls) -> dict[str, list]:
    return {**super().search_space(), "din_hidden": [(36,), (64, 32), (80, 40)]}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DinState(SimilarityState):
  """user, mask, the DIN unit's user part and, for the similarity baselines, the
  similarities' history side."""

  attention: DinUserState


class DIN(CTRModel):
  """ID DIN (plus, through `content`, any item-content tower).

  content_in_head=False gives the head the ID part e_t of the target token only.
  """

  side_dim = 0  # width of the per-pair side features `attention_inputs` appends to the keys
  extra_dim = 0  # width of the features `head_extras` adds to the head's input
  State = DinState  # the state class (a subclass adds the fields `encode_extras` returns)

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING,
               similarity: bool = False, content=None, content_in_head: bool = True):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     similarity=similarity, content=content)
    self.content_in_head = content_in_head
    self.attention = DinAttention(
        self.token_dim + self.side_dim, hidden=config.din_hidden,
        normalization=config.din_normalization, side_dim=self.side_dim, rngs=rngs)
    target_dim = self.token_dim if content_in_head else schema.item_dim
    self.head = prediction_head(
        schema.user_dim + target_dim + self.attention.out_dim + self.extra_dim, config,
        rngs=rngs)

  def encode_user(self, batch, *, train=False, rngs=None):
    mask, rows = batch["hist_mask"], self.history_rows(batch)
    tokens = self.item_tokens(rows, sequence=True, train=train, rngs=rngs)
    similarity = (self.similarity.history(self.catalog, rows)
                  if self.similarity is not None else None)
    return self.State(user=self.user_embedding(batch), mask=mask, similarity=similarity,
                      attention=self.attention.encode_user(tokens, mask),
                      **self.encode_extras(batch, rows))

  def score(self, state, candidates, *, train=False, rngs=None):
    target = self.candidate_tokens(state, candidates, train=train, rngs=rngs)  # [B, N, d]
    query, side = self.attention_inputs(state, candidates, target)
    pooled = self.attention.attend(state.attention, query, side)
    head_target = target if self.content_in_head else target[..., : self.schema.item_dim]
    features = [head_target, pooled, *self.head_extras(state, candidates, train=train)]
    return self.predict(state, features, train=train, rngs=rngs)

  # Hooks for the DIN-based baselines.

  def encode_extras(self, batch, rows) -> dict:
    """More target-agnostic state (e.g. MAKE's tower): the extra fields of `State`."""
    del batch, rows
    return {}

  def attention_inputs(self, state: DinState, candidates: jax.Array, target: jax.Array
                       ) -> tuple[jax.Array, jax.Array | None]:
    """(query [B, N, d + side_dim], side features [B, N, L, side_dim] or None)."""
    del state, candidates
    return target, None

  def head_extras(self, state: DinState, candidates: jax.Array, *, train: bool = False
                  ) -> list[jax.Array]:
    """More head features [B, N, f] (extra_dim in total)."""
    del state, candidates, train
    return []
