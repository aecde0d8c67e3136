"""The DMF paper's baselines: DIN with multimodal additions, on the same
encoders, catalog and head as DMF.

  din_mm_concat  "Vector": each modality's raw vector, linearly projected, concatenated to the
                 item tokens of DIN (target and behaviours); the head sees the ID part e_t.
  bst_mm_concat, dien_mm_concat
                 the same projected vectors in the item tokens of BST and DIEN (multimodal
                 sequence baselines; their heads see the whole target token).
  simscore       the target-aware similarities s_tj as scalar side features of each behaviour
                 token (the target token carries its self-similarity, 1).
  simtier        DIN plus the SimTier histogram of the similarities (modality-centric only).
  make           MAKE: a multimodal target-attention tower with its own logit, pre-trained on the
                 CTR task ('pretrain' phase), then its outputs (attention output, hidden layers,
                 logit) joined into the ID model's head; joint training or frozen (config).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.schema import FeatureSchema
from dmf_jax.core.sharding import NO_SHARDING
from dmf_jax.models.base import ModelConfig, MultimodalConfig
from dmf_jax.models.bst import BST, BstConfig
from dmf_jax.models.dien import DIEN, DienConfig
from dmf_jax.models.din import DIN, DinConfig, DinState
from dmf_jax.nn.attention import DinAttention, DinUserState
from dmf_jax.nn.layers import MLP, Linear
from dmf_jax.nn.losses import bce_with_logits
from dmf_jax.nn.simtier import SimTier


@dataclasses.dataclass(frozen=True)
class ModalityTokenConfig(ModelConfig):
  """The width of each projected modality token (`ModalityTokens`: the Vector baselines, MAKE)."""

  modality_token_dim: int = checks.field(32, "positive_int")  # one modality's token width

  @classmethod
  def search_space(cls) -> dict[str, list]:
    return {**super().search_space(), "modality_token_dim": [16, 32, 64]}


@dataclasses.dataclass(frozen=True)
class BaselineConfig(MultimodalConfig, DinConfig, ModalityTokenConfig):
  """DIN plus the similarity settings (simscore, simtier) or modality tokens (din_mm_concat)."""


@dataclasses.dataclass(frozen=True)
class MakeConfig(BaselineConfig):
  """MAKE's multimodal tower, its pre-training epochs and whether it stays frozen after joining
  (else joint training)."""

  make_hidden: tuple[int, ...] = checks.field((64, 32), "sizes")  # the tower's MLP widths
  make_pretrain_epochs: int = checks.field(2, "non_negative_int")  # the tower's own phase
  make_freeze: bool = False  # the tower frozen after joining (else trained jointly)

  @property
  def pretrain_epochs(self) -> int:
    return self.make_pretrain_epochs


class ModalityTokens(nnx.Module):
  """Frozen modality vectors -> a learned token: K arrays [..., D_k] -> [..., K * width]."""

  def __init__(self, schema: FeatureSchema, width: int, *, rngs: nnx.Rngs):
    if not schema.modalities:
      raise ValueError("ModalityTokens needs at least one modality in the schema")
    self.projections = nnx.List([Linear(m.dim, width, rngs=rngs) for m in schema.modalities])
    self.out_dim = width * len(schema.modalities)

  def __call__(self, vectors: list[jax.Array], present: jax.Array | None = None, *,
               sequence: bool = False, train: bool = False, rngs: nnx.Rngs | None = None
               ) -> jax.Array:
    del present, sequence, train, rngs  # the same projections on both sides, no dropout
    return jnp.concatenate([p(v) for p, v in zip(self.projections, vectors)], axis=-1)


@dataclasses.dataclass(frozen=True)
class BstVectorConfig(BstConfig, ModalityTokenConfig):
  """BST plus the width of each projected modality token."""


@dataclasses.dataclass(frozen=True)
class DienVectorConfig(DienConfig, ModalityTokenConfig):
  """DIEN plus the width of each projected modality token."""


def bst_multimodal_concat(schema, config, *, rngs, catalog=None, sharding=NO_SHARDING) -> BST:
  """BST whose tokens are [e ; P_1 v_1 ; ... ; P_K v_K]."""
  tokens = ModalityTokens(schema, config.modality_token_dim, rngs=rngs)
  return BST(schema, config, rngs=rngs, catalog=catalog, sharding=sharding, content=tokens)


def dien_multimodal_concat(schema, config, *, rngs, catalog=None, sharding=NO_SHARDING) -> DIEN:
  """DIEN whose tokens are [e ; P_1 v_1 ; ... ; P_K v_K]."""
  tokens = ModalityTokens(schema, config.modality_token_dim, rngs=rngs)
  return DIEN(schema, config, rngs=rngs, catalog=catalog, sharding=sharding, content=tokens)


def din_multimodal_concat(schema, config, *, rngs, catalog=None, sharding=NO_SHARDING) -> DIN:
  """DIN whose tokens are [e ; P_1 v_1 ; ... ; P_K v_K] (raw vectors, linear projections)."""
  tokens = ModalityTokens(schema, config.modality_token_dim, rngs=rngs)
  return DIN(schema, config, rngs=rngs, catalog=catalog, sharding=sharding, content=tokens,
             content_in_head=False)


class SimScore(DIN):
  """DIN whose behaviour tokens are [e_j ; s_tj (K)] and target token [e_t ; 1 (K)]."""

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    self.side_dim = len(schema.modalities)
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     similarity=True)

  def attention_inputs(self, state, candidates, target):
    s = self.similarity.score(self.catalog, state.similarity, candidates, state.mask)
    self_similarity = jnp.ones_like(s[:, :, 0, :])  # [B, N, K], sharded like the batch
    return jnp.concatenate([target, self_similarity], -1), s


class DinSimTier(DIN):
  """DIN (ID tokens) plus SimTier(s): head([user ; e_t ; DIN pooled ; SimTier])."""

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    self.simtier = SimTier(
        len(schema.modalities), num_tiers=config.num_tiers,
        normalization=config.simtier_normalization, hidden=config.simtier_hidden,
        lookup_mode=config.lookup_mode, rngs=rngs)
    self.extra_dim = self.simtier.out_dim
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     similarity=True)

  def head_extras(self, state, candidates, *, train=False):
    s = self.similarity.score(self.catalog, state.similarity, candidates, state.mask)
    return [self.simtier(s, state.mask, train=train)]


class MultimodalTower(nnx.Module):
  """MAKE's multimodal module: DIN attention over modality tokens, an MLP, a logit.

  `tokens` maps K modality vectors [..., D_k] to a token [..., width]. With the attention's
  user state over the behaviour tokens, `__call__(state, target tokens [B, N, width])` ->
  (features [B, N, out_dim] = [pooled ; every hidden layer ; logit], logit [B, N]).
  """

  def __init__(self, schema: FeatureSchema, config, *, rngs: nnx.Rngs):
    self.tokens = ModalityTokens(schema, config.modality_token_dim, rngs=rngs)
    width = self.tokens.out_dim
    self.attention = DinAttention(width, hidden=config.din_hidden, rngs=rngs)
    self.tower = MLP(2 * width, config.make_hidden, activation=config.activation, rngs=rngs)
    self.logit = Linear(self.tower.out_dim, 1, rngs=rngs)
    self.out_dim = width + sum(config.make_hidden) + 1

  def __call__(self, state, target):
    pooled = self.attention.attend(state, target)
    hidden = self.tower.layer_outputs(jnp.concatenate([target, pooled], -1))
    logit = self.logit(hidden[-1])
    return jnp.concatenate([pooled, *hidden, logit], -1), logit[..., 0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class MakeState(DinState):
  """DIN's state plus the multimodal tower's attention over the behaviours' modality tokens."""

  mm: DinUserState


class MAKE(DIN):
  """ID DIN joined with a pre-trained multimodal tower: head([user ; e_t ; pooled ; tower]).

  Phase 'pretrain' trains only `mm` on the tower's own logit; phase 'main' trains the whole
  model, or everything but `mm` (whose outputs are then constants) with `make_freeze`.
  """

  READS_VECTORS = True  # its pre-trained multimodal tower
  State = MakeState

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    self.mm = MultimodalTower(schema, config, rngs=rngs)
    self.extra_dim = self.mm.out_dim
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding)

  def encode_extras(self, batch, rows):
    tokens = rows.map(lambda ids: self.mm.tokens(self.modality_vectors(ids)))
    return {"mm": self.mm.attention.encode_user(tokens, batch["hist_mask"])}

  def multimodal(self, state, candidates) -> tuple[jax.Array, jax.Array]:
    """The tower's (features [B, N, out_dim], logit [B, N])."""
    target = self.candidate_rows(state, candidates).map(
        lambda ids: self.mm.tokens(self.modality_vectors(ids))).take()
    return self.mm(state.mm, target)

  def head_extras(self, state, candidates, *, train=False):
    features, _ = self.multimodal(state, candidates)
    if self.config.make_freeze:
      features = jax.lax.stop_gradient(features)
    return [features]

  def training_loss(self, batch, *, phase="main", rngs=None):
    if phase == "pretrain":
      state = self.encode_user(batch)
      _, logit = self.multimodal(state, batch["item_id"][:, None])
      return bce_with_logits(logit[:, 0], batch["label"], batch.get("weight")), {}
    return super().training_loss(batch, phase=phase, rngs=rngs)

  def is_trainable(self, phase, path):
    if phase == "pretrain":
      return path[0] == "mm"
    return not (self.config.make_freeze and path[0] == "mm")
