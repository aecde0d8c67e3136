"""The paper's baselines (DESIGN.md section 3), on the same encoders, catalog and head as DMF.

  din_mm_concat  "Vector": each modality's raw vector, linearly projected, concatenated to the
                 item tokens of DIN (target and behaviours).
  simscore       the target-aware similarities s_tj as scalar side features of each behaviour
                 token (the target token carries its self-similarity, 1).
  simtier        DIN plus the SimTier histogram of the similarities (modality-centric only).
  make           MAKE: a multimodal target-attention tower with its own logit, pre-trained on the
                 CTR task ('pretrain' phase), then its outputs (attention output, hidden layers,
                 logit) joined into the ID model's head; joint training or frozen (config).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.attention import DinAttention
from dmf_jax.layers import MLP, PredictionHead
from dmf_jax.losses import bce_with_logits
from dmf_jax.model_base import Batch, CTRModel
from dmf_jax.schema import FeatureSchema
from dmf_jax.sharding import NO_SHARDING
from dmf_jax.simtier import SimTier


class ModalityTokens(nnx.Module):
  """Frozen modality vectors -> a learned token: K arrays [..., D_k] -> [..., K * width]."""

  def __init__(self, schema: FeatureSchema, width: int, *, rngs: nnx.Rngs):
    if not schema.modalities:
      raise ValueError("ModalityTokens needs at least one modality in the schema")
    self.projections = nnx.List([nnx.Linear(m.dim, width, rngs=rngs) for m in schema.modalities])
    self.out_dim = width * len(schema.modalities)

  def __call__(self, vectors: list[jax.Array]) -> jax.Array:
    return jnp.concatenate([p(v) for p, v in zip(self.projections, vectors)], axis=-1)


class _DinFamily(CTRModel):
  """DIN over item tokens [e ; extra(batch)]; head([user ; e_t ; pooled ; more(batch)])."""

  def _head(self, schema, config, token_dim: int, extra_dim: int, rngs):
    self.attention = DinAttention(
        token_dim, hidden=config.din_hidden, normalization=config.din_normalization, rngs=rngs)
    self.head = PredictionHead(
        schema.user_dim + schema.item_dim + token_dim + extra_dim, config.mlp_hidden,
        activation=config.activation, dropout=config.dropout, rngs=rngs)

  def _predict(self, x, target_tokens, behavior_tokens, extra, train, rngs):
    pooled = self.attention(target_tokens, behavior_tokens, x["mask"])
    features = [x["user"], x["target"], pooled, *extra]
    return self.head(jnp.concatenate(features, -1), train=train, rngs=rngs)


class DinMultimodalConcat(_DinFamily):
  """DIN whose tokens are [e ; P_1 v_1 ; ... ; P_K v_K] (raw vectors, linear projections)."""

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding)
    self.tokens = ModalityTokens(schema, config.modality_token_dim, rngs=rngs)
    self._head(schema, config, schema.item_dim + self.tokens.out_dim, 0, rngs)

  def __call__(self, batch, *, train=False, rngs=None):
    x = self.embed(batch)
    target, behaviors = self.encode_modalities(self.tokens, batch["item_id"], batch["hist_item_id"])
    target = jnp.concatenate([x["target"], target], -1)
    behaviors = jnp.concatenate([x["behaviors"], behaviors], -1)
    return self._predict(x, target, behaviors, [], train, rngs)


class SimScore(_DinFamily):
  """DIN whose behaviour tokens are [e_j ; s_tj (K)] and target token [e_t ; 1 (K)]."""

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     similarity=True)
    self._head(schema, config, schema.item_dim + len(schema.modalities), 0, rngs)

  def __call__(self, batch, *, train=False, rngs=None):
    x = self.embed(batch)
    s = self.similarities(batch)  # [B, L, K]
    self_similarity = jnp.ones_like(s[:, 0, :])  # [B, K], sharded like the batch
    target = jnp.concatenate([x["target"], self_similarity], -1)
    behaviors = jnp.concatenate([x["behaviors"], s], -1)
    return self._predict(x, target, behaviors, [], train, rngs)


class DinSimTier(_DinFamily):
  """DIN (ID tokens) plus SimTier(s): head([user ; e_t ; DIN pooled ; SimTier])."""

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     similarity=True)
    self.simtier = SimTier(
        len(schema.modalities), num_tiers=config.num_tiers,
        normalization=config.simtier_normalization, hidden=config.simtier_hidden, rngs=rngs)
    self._head(schema, config, schema.item_dim, self.simtier.out_dim, rngs)

  def __call__(self, batch, *, train=False, rngs=None):
    x = self.embed(batch)
    tiers = self.simtier(self.similarities(batch), x["mask"], train=train)
    return self._predict(x, x["target"], x["behaviors"], [tiers], train, rngs)


class MultimodalTower(nnx.Module):
  """MAKE's multimodal module: DIN attention over modality tokens, an MLP, a logit.

  `tokens` maps K modality vectors [..., D_k] to a token [..., width]. The tower: target tokens
  [B, width], behaviour tokens [B, L, width], mask [B, L] ->
  (features [B, out_dim] = [pooled ; every hidden layer ; logit], logit [B]).
  """

  def __init__(self, schema: FeatureSchema, config, *, rngs: nnx.Rngs):
    self.tokens = ModalityTokens(schema, config.modality_token_dim, rngs=rngs)
    width = self.tokens.out_dim
    self.attention = DinAttention(width, hidden=config.din_hidden, rngs=rngs)
    self.tower = MLP(2 * width, config.make_hidden, activation=config.activation, rngs=rngs)
    self.logit = nnx.Linear(self.tower.out_dim, 1, rngs=rngs)
    self.out_dim = width + sum(config.make_hidden) + 1

  def __call__(self, target, behaviors, mask):
    pooled = self.attention(target, behaviors, mask)
    hidden = self.tower.layer_outputs(jnp.concatenate([target, pooled], -1))
    logit = self.logit(hidden[-1])
    return jnp.concatenate([pooled, *hidden, logit], -1), logit[..., 0]


class MAKE(_DinFamily):
  """ID DIN joined with a pre-trained multimodal tower: head([user ; e_t ; pooled ; tower]).

  Phase 'pretrain' trains only `mm` on the tower's own logit; phase 'main' trains the whole
  model, or everything but `mm` (whose outputs are then constants) with `make_freeze`.
  """

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding)
    self.mm = MultimodalTower(schema, config, rngs=rngs)
    self._head(schema, config, schema.item_dim, self.mm.out_dim, rngs)

  def multimodal(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The tower's (features [B, out_dim], logit [B])."""
    target, behaviors = self.encode_modalities(self.mm.tokens, batch["item_id"],
                                               batch["hist_item_id"])
    return self.mm(target, behaviors, batch["hist_mask"])

  def __call__(self, batch, *, train=False, rngs=None):
    x = self.embed(batch)
    features, _ = self.multimodal(batch)
    if self.config.make_freeze:
      features = jax.lax.stop_gradient(features)
    return self._predict(x, x["target"], x["behaviors"], [features], train, rngs)

  def training_loss(self, batch, *, phase="main", rngs=None):
    if phase == "pretrain":
      _, logit = self.multimodal(batch)
      return bce_with_logits(logit, batch["label"], batch.get("weight")), {}
    return super().training_loss(batch, phase=phase, rngs=rngs)

  def is_trainable(self, phase, path):
    if phase == "pretrain":
      return path[0] == "mm"
    return not (self.config.make_freeze and path[0] == "mm")
