"""CTR models built from a `FeatureSchema` and a `ModelConfig`, created by name from a registry.

Every model maps a batch (see `dmf_jax.schema`) to logits [B]:
  din               ID only: DIN activation-unit attention over the behaviour sequence.
  dmf               DTA (modality-enriched) + SimTier (modality-centric) + CMM.
  dmf_early_fusion  the same function as `dmf` through early-fusion attention (slower).
  dmf_no_me         ablation: the ME path loses its similarity-bucket side information
                    (ID-only multi-head target attention) and keeps SimTier.
  dmf_no_mc         ablation: DTA only, no SimTier and no CMM.
  din_mm_concat, simscore, simtier, make   baselines (see `dmf_jax.baselines`).
  em3               Fusion-Q-Former content tokens, LoRA sequence side, Content-ID loss
                    (see `dmf_jax.em3`), with a DIN or DMF head.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax.numpy as jnp
from flax import nnx

from dmf_jax import baselines
from dmf_jax.attention import (
    DecoupledTargetAttention,
    DinAttention,
    EarlyFusionTargetAttention,
    MultiHeadTargetAttention,
)
from dmf_jax.catalog import ItemCatalog
from dmf_jax.fusion import CMM
from dmf_jax.layers import PredictionHead
from dmf_jax.model_base import (  # re-exported: the public model API lives here
    Batch,
    CTRModel,
    ItemEncoder,
    ModelConfig,
    UserEncoder,
    validate_batch,
)
from dmf_jax.schema import FeatureSchema
from dmf_jax.sharding import NO_SHARDING, ShardingRules
from dmf_jax.similarity import bucketize
from dmf_jax.simtier import SimTier

__all__ = ["Batch", "CTRModel", "ItemEncoder", "ModelConfig", "UserEncoder", "validate_batch",
           "DIN", "DMF", "MODELS", "register_model", "model_names", "build_model"]


class DIN(CTRModel):
  """ID-only DIN: head([user ; e_t ; sum_j w_j e_j])."""

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding)
    d = self.item_token_dim
    self.attention = DinAttention(
        d, hidden=config.din_hidden, normalization=config.din_normalization, rngs=rngs
    )
    self.head = PredictionHead(
        schema.user_dim + 2 * d, config.mlp_hidden, activation=config.activation,
        dropout=config.dropout, rngs=rngs,
    )

  def __call__(self, batch, *, train=False, rngs=None):
    x = self.embed(batch, train=train, rngs=rngs)
    r = self.attention(x["target"], x["behaviors"], x["mask"])
    return self.head(jnp.concatenate([x["user"], x["target"], r], -1), train=train, rngs=rngs)


class DMF(CTRModel):
  """Decoupled Multimodal Fusion: head([user ; e_t ; CMM(r_ME, r_MC)]).

  attention: 'dta' or 'early_fusion' (same function). use_me=False replaces the fusion attention
  by ID-only multi-head target attention; use_mc=False drops SimTier and CMM.
  """

  def __init__(
      self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING,
      attention: str = "dta", use_me: bool = True, use_mc: bool = True,
  ):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     similarity=True)
    if attention not in ("dta", "early_fusion"):
      raise ValueError(f"DMF attention {attention!r} is not one of ('dta', 'early_fusion')")
    d, k = self.item_token_dim, len(schema.modalities)
    self.use_me, self.use_mc = use_me, use_mc
    if use_me:
      cls = DecoupledTargetAttention if attention == "dta" else EarlyFusionTargetAttention
      self.attention = cls(
          id_dim=d, num_buckets=config.num_buckets, bucket_dim=config.bucket_dim,
          num_modalities=k, num_heads=config.num_heads, head_dim=config.head_dim, rngs=rngs,
      )
    else:
      self.attention = MultiHeadTargetAttention(
          id_dim=d, num_heads=config.num_heads, head_dim=config.head_dim, rngs=rngs
      )
    rep_dim = self.attention.out_dim
    if use_mc:
      self.simtier = SimTier(
          k, num_tiers=config.num_tiers, normalization=config.simtier_normalization,
          hidden=config.simtier_hidden, rngs=rngs,
      )
      self.cmm = CMM(
          rep_dim, self.simtier.out_dim, mode=config.cmm, dim=config.cmm_dim,
          alpha=config.cmm_alpha, rngs=rngs,
      )
      rep_dim = self.cmm.out_dim
    self.head = PredictionHead(
        schema.user_dim + d + rep_dim, config.mlp_hidden, activation=config.activation,
        dropout=config.dropout, rngs=rngs,
    )

  def __call__(self, batch, *, train=False, rngs=None):
    x = self.embed(batch, train=train, rngs=rngs)
    s = self.similarities(batch)
    side = [bucketize(s, self.config.num_buckets)] if self.use_me else []
    if x["item_table"] is None:
      rep = self.attention(x["target"], x["behaviors"], *side, x["mask"])
    else:  # the same function, per-item work on the table rows
      rep = self.attention.call_from_table(x["target"], x["item_table"], x["behavior_rows"],
                                           *side, x["mask"])
    if self.use_mc:
      rep = self.cmm(rep, self.simtier(s, x["mask"], train=train))
    return self.head(jnp.concatenate([x["user"], x["target"], rep], -1), train=train, rngs=rngs)

  def encode_user(self, user: Batch) -> dict:
    """Everything target-agnostic, computed once per request.

    user [u] profile embedding; mask [L]; prepared (unit, projected) behaviour vectors per
    modality [L, D'_k]; and the attention's user part: DTA's per-head K/V of the ID tokens,
    the ID-only attention's K/V, or (early fusion) the raw behaviour embeddings [L, d].
    """
    mask = jnp.asarray(user["hist_mask"])
    behaviors = self.items(self.catalog, jnp.asarray(user["hist_item_id"]))
    one = {k[5:]: jnp.asarray(v)[None] for k, v in user.items() if k.startswith("user/")}
    hist = jnp.asarray(user["hist_item_id"])
    state = {
        "user": self.users({f"user/{k}": v for k, v in one.items()}, 1)[0],
        "mask": mask,
        "hist_item_id": hist,
    }
    if not self.catalog.has_pairwise:
      state["vectors"] = [self.similarity.prepare(k, v)
                          for k, v in enumerate(self.modality_vectors(hist))]
    if isinstance(self.attention, DecoupledTargetAttention):
      state["attention"] = self.attention.encode_user(behaviors, mask)
    elif isinstance(self.attention, MultiHeadTargetAttention):
      state["attention"] = self.attention.encode_user(behaviors)
    else:
      state["attention"] = behaviors
    return state

  def score_candidates(self, user_state: dict, item_ids: jax.Array) -> jax.Array:
    """Logits [N]: one matrix product per modality for the similarities, then per-candidate
    bucket lookups (DTA), or early fusion's full per-candidate keys and values."""
    mask = user_state["mask"]
    target = self.items(self.catalog, item_ids)  # [N, d]
    if self.catalog.has_pairwise:
      sims = [self.catalog.pairwise_similarity(name, item_ids, user_state["hist_item_id"])
              for name in self.schema.modality_names]
    else:
      sims = [
          jnp.clip(self.similarity.prepare(k, t) @ h.T, -1.0, 1.0)
          for k, (t, h) in enumerate(zip(self.modality_vectors(item_ids), user_state["vectors"]))
      ]
    s = jnp.stack(self.calibrate(sims), axis=-1) * mask[None, :, None]  # [N, L, K]
    if not self.use_me:
      rep = self.attention.score_candidates(user_state["attention"], mask, target)
    elif isinstance(self.attention, DecoupledTargetAttention):
      rep = self.attention.score_candidates(
          user_state["attention"], target, bucketize(s, self.config.num_buckets))
    else:
      rep = self.attention.score_candidates(
          user_state["attention"], mask, target, bucketize(s, self.config.num_buckets))
    if self.use_mc:
      masks = jnp.broadcast_to(mask, s.shape[:2])
      rep = self.cmm(rep, self.simtier(s, masks))
    user = jnp.broadcast_to(user_state["user"], (target.shape[0], user_state["user"].shape[-1]))
    return self.head(jnp.concatenate([user, target, rep], -1))


ModelFactory = Callable[..., CTRModel]


def _em3(schema, config, **kwargs) -> CTRModel:
  from dmf_jax import em3  # pylint: disable=g-import-not-at-top  (em3 builds on DIN and DMF)

  return em3.build_em3(schema, config, **kwargs)


MODELS: dict[str, ModelFactory] = {
    "din": DIN,
    "dmf": functools.partial(DMF, attention="dta"),
    "dmf_early_fusion": functools.partial(DMF, attention="early_fusion"),
    "dmf_no_me": functools.partial(DMF, use_me=False),
    "dmf_no_mc": functools.partial(DMF, use_mc=False),
    "din_mm_concat": baselines.DinMultimodalConcat,
    "simscore": baselines.SimScore,
    "simtier": baselines.DinSimTier,
    "make": baselines.MAKE,
    "em3": _em3,
}


def register_model(name: str, factory: ModelFactory) -> None:
  """Adds a model factory `(schema, config, *, rngs, catalog, sharding) -> CTRModel`."""
  if name in MODELS:
    raise ValueError(f"model {name!r} is already registered")
  MODELS[name] = factory


def model_names() -> Sequence[str]:
  return tuple(sorted(MODELS))


def build_model(
    config: ModelConfig | Mapping,
    schema: FeatureSchema,
    *,
    rngs: nnx.Rngs,
    catalog: ItemCatalog | None = None,
    sharding: ShardingRules = NO_SHARDING,
) -> CTRModel:
  """The registered model `config.name`, built for `schema`."""
  if not isinstance(config, ModelConfig):
    config = ModelConfig.from_mapping(config)
  if config.name not in MODELS:
    raise ValueError(f"unknown model {config.name!r}; valid models: {', '.join(model_names())}")
  return MODELS[config.name](schema, config, rngs=rngs, catalog=catalog, sharding=sharding)
