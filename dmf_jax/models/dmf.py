"""DMF: Decoupled Multimodal Fusion (the DMF paper) and its ablations.

  logit = head([user ; e_t ; CMM(r_ME, r_MC)])
  r_ME  = fusion attention over the behaviour tokens with similarity-bucket side information
          (DTA, or early fusion: the same function)
  r_MC  = SimTier(s_t), the histogram of target-aware similarities

use_me=False replaces the fusion attention by ID-only multi-head target attention; use_mc=False
drops SimTier and CMM.
"""

from __future__ import annotations

import dataclasses

import jax

from dmf_jax.core import checks
from dmf_jax.core.sharding import NO_SHARDING
from dmf_jax.models.base import CTRModel, MultimodalConfig, SimilarityState, prediction_head
from dmf_jax.nn.attention import (
    DecoupledTargetAttention,
    EarlyFusionTargetAttention,
    HeadsUserState,
    MultiHeadTargetAttention,
    TokensUserState,
)
from dmf_jax.nn.cmm import CMM, CMM_MODES
from dmf_jax.nn.similarity import bucketize
from dmf_jax.nn.simtier import SimTier

ATTENTIONS = {"dta": DecoupledTargetAttention, "early_fusion": EarlyFusionTargetAttention}


@dataclasses.dataclass(frozen=True)
class DmfConfig(MultimodalConfig):
  """Fusion attention (ME path) and CMM, on top of the similarity and SimTier settings."""

  num_heads: int = checks.field(2, "positive_int")  # the fusion attention's heads
  head_dim: int = checks.field(32, "positive_int")  # and their width
  num_buckets: int = checks.field(32, "positive_int")  # similarity buckets over [-1, 1]
  bucket_dim: int = checks.field(16, "positive_int")  # a similarity bucket's embedding width
  cmm: str = checks.field("concat", CMM_MODES)  # how CMM joins the ME and MC representations
  cmm_dim: int = checks.field(64, "positive_int")  # their common width (weighted, gate)
  cmm_alpha: float = checks.field(0.5, "unit_interval")  # the ME side's weight ('weighted')

  @classmethod
  def search_space(cls) -> dict[str, list]:
    return {**super().search_space(), "num_heads": [1, 2, 4], "head_dim": [8, 16, 32]}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DmfState(SimilarityState):
  """user, mask, the similarities' history side, and the attention's user part (DTA: per-head
  W^id e_j; ID-only: K and V; early fusion: the tokens)."""

  attention: HeadsUserState | TokensUserState


class DMF(CTRModel):
  """DTA (modality-enriched) + SimTier (modality-centric) + CMM.

  attention: 'dta' or 'early_fusion' (same function). `content`: a tower appended to the item
  tokens (EM3).
  """

  def __init__(
      self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING,
      attention: str = "dta", use_me: bool = True, use_mc: bool = True, content=None,
  ):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     similarity=True, content=content)
    if attention not in ATTENTIONS:
      raise ValueError(f"DMF attention {attention!r} is not one of {tuple(ATTENTIONS)}")
    d, k = self.token_dim, len(schema.modalities)
    self.use_me, self.use_mc = use_me, use_mc
    if use_me:
      self.attention = ATTENTIONS[attention](
          id_dim=d, num_buckets=config.num_buckets, bucket_dim=config.bucket_dim,
          num_modalities=k, num_heads=config.num_heads, head_dim=config.head_dim, rngs=rngs,
          lookup_mode=config.lookup_mode,
      )
    else:
      self.attention = MultiHeadTargetAttention(
          id_dim=d, num_heads=config.num_heads, head_dim=config.head_dim, rngs=rngs
      )
    rep_dim = self.attention.out_dim
    if use_mc:
      self.simtier = SimTier(
          k, num_tiers=config.num_tiers, normalization=config.simtier_normalization,
          hidden=config.simtier_hidden, lookup_mode=config.lookup_mode, rngs=rngs,
      )
      self.cmm = CMM(
          rep_dim, self.simtier.out_dim, mode=config.cmm, dim=config.cmm_dim,
          alpha=config.cmm_alpha, rngs=rngs,
      )
      rep_dim = self.cmm.out_dim
    self.head = prediction_head(schema.user_dim + d + rep_dim, config, rngs=rngs)

  def encode_user(self, batch, *, train=False, rngs=None):
    """The users' `DmfState`."""
    mask, rows = batch["hist_mask"], self.history_rows(batch)
    tokens = self.item_tokens(rows, sequence=True, train=train, rngs=rngs)
    return DmfState(user=self.user_embedding(batch), mask=mask,
                    similarity=self.similarity.history(self.catalog, rows),
                    attention=self.attention.encode_user(tokens, mask))

  def score(self, state, candidates, *, train=False, rngs=None):
    """Per candidate: its similarities (one product per modality against the prepared
    history), their buckets, the attention with bucket side information, SimTier, the head."""
    target = self.candidate_tokens(state, candidates, train=train, rngs=rngs)  # [B, N, d]
    s = self.similarity.score(self.catalog, state.similarity, candidates, state.mask)
    side = bucketize(s, self.config.num_buckets) if self.use_me else None
    rep = self.attention.attend(state.attention, target, side)
    if self.use_mc:
      rep = self.cmm(rep, self.simtier(s, state.mask, train=train))
    return self.predict(state, [target, rep], train=train, rngs=rngs)
