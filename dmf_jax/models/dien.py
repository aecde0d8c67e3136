"""DIEN, the Deep Interest Evolution Network (Zhou et al., 2019): a GRU interest extractor
trained with an auxiliary next-behaviour loss, and an attention-update GRU (AUGRU) that
evolves the interests towards the target.

  h_1..h_L   = GRU(k_1..k_L)                        (interest extractor, H = token width d)
  a_t        = softmax over valid t of h_t W e_t'   (e_t': the target token)
  h'_1..h'_L = AUGRU(h_1..h_L; a)                    (interest evolution, per candidate)
  logit      = head([user ; e_t' ; h'_last])

  L_aux = -mean over t with valid t and t + 1 of
          [log sigmoid(h_t . k_{t+1}) + log(1 - sigmoid(h_t . k^-_{t+1}))]
  loss  = BCE + dien_aux_weight * L_aux

The negative k^-_{t+1} is the item (id_{t+1} + o) mod V with one offset o uniform in [1, V)
per batch (a 'sample' stream draw): every negative differs from its positive, each is uniform
over the other items, and the ids keep the batch's sharding (no replicated random array
inside a sharded step). Over a batch's distinct items (`core.rows.batch_unique_rows`) the
negatives' distinct items are those items shifted by o (a bijection of the ids), so they are
encoded once per distinct item too, not once per position.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dmf_jax.core import checks
from dmf_jax.core.rows import Rows
from dmf_jax.core.sharding import NO_SHARDING
from dmf_jax.models.base import CTRModel, ModelConfig, UserState, prediction_head
from dmf_jax.nn.layers import Linear
from dmf_jax.nn.losses import bce_with_logits
from dmf_jax.nn.recurrent import GRU


@dataclasses.dataclass(frozen=True)
class DienConfig(ModelConfig):
  """The auxiliary loss's weight (0: the extractor learns from the CTR loss only)."""

  dien_aux_weight: float = checks.field(1.0, "non_negative")  # L_aux's weight in the loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DienState(UserState):
  """user, mask [B, L]; time-major: the behaviour tokens and interest states [L, B, d], and the
  AUGRU's input side of the interests, one [L, B, d] per gate (the same for every candidate)."""

  tokens: jax.Array
  interests: jax.Array
  evolution_inputs: tuple[jax.Array, jax.Array, jax.Array]


class DIEN(CTRModel):
  """DIEN over the item tokens [e ; content]."""

  def __init__(self, schema, config: DienConfig, *, rngs, catalog=None, sharding=NO_SHARDING,
               content=None):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     content=content)
    d = self.token_dim
    self.extractor = GRU(d, d, rngs=rngs)
    self.attention = Linear(d, d, use_bias=False, rngs=rngs)  # W of h_t W e_t'
    self.evolution = GRU(d, d, rngs=rngs)
    self.head = prediction_head(schema.user_dim + 2 * d, config, rngs=rngs)

  def encode_user(self, batch, *, train=False, rngs=None):
    """The users' `DienState`. The extractor's input side (W x_t + b) is computed once per
    item row, then gathered time-major, one array per gate."""
    mask, rows = batch["hist_mask"], self.history_rows(batch)
    tokens = self.item_tokens(rows, sequence=True, train=train, rngs=rngs)
    projected, d = tokens.map(self.extractor.project), self.extractor.hidden
    gates = tuple(projected.map(lambda v, g=g: v[..., g * d:(g + 1) * d]).take_swapped()
                  for g in range(3))
    interests = self.extractor.recur_time_major(gates, mask.T)
    return DienState(user=self.user_embedding(batch), mask=mask,
                     tokens=tokens.take_swapped(), interests=interests,
                     evolution_inputs=self.evolution.project_gates(interests))

  def score(self, state, candidates, *, train=False, rngs=None):
    target = self.candidate_tokens(state, candidates, train=train, rngs=rngs)  # [B, N, d]
    interests, mask = state.interests, state.mask  # [L, B, d], [B, L]
    b, n = candidates.shape
    steps = mask.shape[1]
    scores = jnp.einsum("lbd,bnd->lbn", interests, self.attention(target))
    valid = jnp.broadcast_to(mask.T[:, :, None], (steps, b, n))
    weights = jax.nn.softmax(jnp.where(valid, scores, -1e30), axis=0) * valid  # [L, B, N]
    inputs = state.evolution_inputs  # 3 x [L, B, d]
    if n == 1:  # training: the recurrence over [L, B, d], no unit candidate axis
      valid, weights = valid[..., 0], weights[..., 0]
    else:
      inputs = tuple(jnp.broadcast_to(x[:, :, None], (steps, b, n, x.shape[-1])) for x in inputs)
    last = self.evolution.recur_time_major(inputs, valid, weights)[-1]  # [B, (N,) d]
    return self.predict(state, [target, last[:, None] if n == 1 else last], train=train,
                        rngs=rngs)

  def auxiliary_loss(self, batch, state, rngs=None, offset=None) -> jax.Array:
    """L_aux (see the module docstring): next-behaviour discrimination by the interests.
    offset: the negatives' id offset in [1, V) (default: drawn from rngs' 'sample' stream)."""
    num_items = self.catalog.num_items
    if offset is None:
      offset = jax.random.randint(rngs.sample(), (), 1, max(num_items, 2))
    shifted = lambda ids: (ids + offset) % num_items
    unique = self._unique_rows(batch, "hist_item_row")
    if unique is not None:  # the batch's distinct items shifted: the negatives' distinct items
      rows = Rows(shifted(unique.values), unique.index[:, 1:], unique.shards)
    else:
      rows = self.item_rows(shifted(batch["hist_item_id"][:, 1:]))  # [B, L - 1]
    negatives = self.item_tokens(rows, sequence=True).take_swapped()
    mask = state.mask.T  # time-major, as the states: [L, B]
    h, positives = state.interests[:-1], state.tokens[1:]
    pairs = (mask[:-1] & mask[1:]).astype(h.dtype)
    pos = jnp.sum(h * positives, -1)
    neg = jnp.sum(h * negatives, -1)
    per_step = -(jax.nn.log_sigmoid(pos) + jax.nn.log_sigmoid(-neg))
    return jnp.sum(per_step * pairs) / jnp.maximum(jnp.sum(pairs), 1.0)

  def training_loss(self, batch, *, phase="main", rngs=None):
    """BCE of the logits plus dien_aux_weight x L_aux, from one pass of the extractor."""
    del phase
    state, logits = self.forward(batch, train=True, rngs=rngs)
    ctr = bce_with_logits(logits, batch["label"], batch.get("weight"))
    if not self.config.dien_aux_weight:
      return ctr, {}
    if rngs is None:
      raise ValueError("DIEN: the auxiliary loss needs `rngs` with a 'sample' stream")
    aux = self.auxiliary_loss(batch, state, rngs)
    return ctr + self.config.dien_aux_weight * aux, {"ctr_loss": ctr, "aux_loss": aux}
