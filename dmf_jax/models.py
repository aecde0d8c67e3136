"""CTR models built from a `FeatureSchema` and a `ModelConfig`, created by name from a registry.

Every model maps a batch (see `dmf_jax.schema`) to logits [B]:
  din               ID only: DIN activation-unit attention over the behaviour sequence.
  dmf               DTA (modality-enriched) + SimTier (modality-centric) + CMM.
  dmf_early_fusion  the same function as `dmf` through early-fusion attention (slower).
  dmf_no_me         ablation: the ME path loses its similarity-bucket side information
                    (ID-only multi-head target attention) and keeps SimTier.
  dmf_no_mc         ablation: DTA only, no SimTier and no CMM.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax import checks
from dmf_jax.attention import (
    DIN_NORMALIZATIONS,
    DecoupledTargetAttention,
    DinAttention,
    EarlyFusionTargetAttention,
    MultiHeadTargetAttention,
)
from dmf_jax.catalog import CatalogTables, ItemCatalog
from dmf_jax.embedding import FeatureEmbedding
from dmf_jax.fusion import CMM, CMM_MODES
from dmf_jax.layers import ACTIVATIONS, PredictionHead
from dmf_jax.schema import FeatureSchema
from dmf_jax.sharding import NO_SHARDING, ShardingRules
from dmf_jax.similarity import SIMILARITY_MODES, TargetAwareSimilarity, bucketize
from dmf_jax.simtier import SIMTIER_NORMALIZATIONS, SimTier

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the model family; defaults follow DESIGN.md (choices in BUILD_NOTES.md)."""

  name: str = "dmf"
  # Fusion attention (ME path).
  num_heads: int = 2
  head_dim: int = 32
  num_buckets: int = 32
  bucket_dim: int = 16
  similarity: str = "frozen"
  projection_dim: int = 64
  # SimTier (MC path).
  num_tiers: int = 20
  simtier_normalization: str = "log1p"
  simtier_hidden: tuple[int, ...] = (64, 32)
  # CMM.
  cmm: str = "concat"
  cmm_dim: int = 64
  cmm_alpha: float = 0.5
  # DIN attention.
  din_hidden: tuple[int, ...] = (80, 40)
  din_normalization: str = "none"
  # Frozen similarity from a precomputed all-pairs cosine matrix when the catalog has at most
  # this many items (0: never); the same function, one gather instead of two vector gathers.
  pairwise_similarity_max_items: int = 4096
  # Prediction head.
  mlp_hidden: tuple[int, ...] = (256, 128, 64)
  activation: str = "relu"
  dropout: float = 0.0

  def __post_init__(self):
    for field in ("num_heads", "head_dim", "num_buckets", "bucket_dim", "projection_dim",
                  "num_tiers", "cmm_dim"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model config: {field} must be a positive int, got {value!r}")
    for field in ("simtier_hidden", "din_hidden", "mlp_hidden"):
      value = tuple(getattr(self, field))
      if not value or any(not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"model config: {field} must be a non-empty list of positive ints, got {value!r}")
      object.__setattr__(self, field, value)
    choices = dict(
        similarity=SIMILARITY_MODES, simtier_normalization=SIMTIER_NORMALIZATIONS,
        cmm=CMM_MODES, din_normalization=DIN_NORMALIZATIONS, activation=ACTIVATIONS,
    )
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        raise ValueError(f"model config: {field}={getattr(self, field)!r} is not one of {allowed}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model config: dropout must be in [0, 1), got {self.dropout}")
    if not 0.0 <= self.cmm_alpha <= 1.0:
      raise ValueError(f"model config: cmm_alpha must be in [0, 1], got {self.cmm_alpha}")
    if self.pairwise_similarity_max_items < 0:
      raise ValueError("model config: pairwise_similarity_max_items must be >= 0")

  @classmethod
  def from_mapping(cls, values: Mapping) -> "ModelConfig":
    """From a dict or ConfigDict; unknown keys are an error that lists the valid ones."""
    return checks.dataclass_from_mapping(cls, values, "model config")


class ItemEncoder(nnx.Module):
  """Item id -> e = [id embedding ; side-field embeddings]: int [...] -> float32 [..., d].

  Fields are concatenated in schema order (kept in `names`: an nnx.Dict's iteration order is
  not preserved by split/merge).
  """

  def __init__(self, schema: FeatureSchema, *, rngs: nnx.Rngs, sharding: ShardingRules):
    self.item_id = FeatureEmbedding(schema.item_id_spec, rngs=rngs, sharding=sharding)
    self.names = tuple(f.name for f in schema.item_features)
    self.fields = nnx.Dict(
        {f.name: FeatureEmbedding(f, rngs=rngs, sharding=sharding) for f in schema.item_features}
    )

  def __call__(self, catalog: CatalogTables, item_ids: jax.Array) -> jax.Array:
    parts = [self.item_id(item_ids)]
    for name in self.names:
      parts.append(self.fields[name](catalog.side_values(name, item_ids)))
    return jnp.concatenate(parts, axis=-1)


class UserEncoder(nnx.Module):
  """User profile fields `user/<name>` -> [B, user_dim] (user_dim may be 0)."""

  def __init__(self, schema: FeatureSchema, *, rngs: nnx.Rngs, sharding: ShardingRules):
    self.names = tuple(f.name for f in schema.user_features)  # schema order (see ItemEncoder)
    self.fields = nnx.Dict(
        {f.name: FeatureEmbedding(f, rngs=rngs, sharding=sharding) for f in schema.user_features}
    )

  def __call__(self, batch: Batch, batch_size: int) -> jax.Array:
    parts = [self.fields[name](batch[f"user/{name}"]) for name in self.names]
    if not parts:
      return jnp.zeros((batch_size, 0), jnp.float32)
    return jnp.concatenate(parts, axis=-1)


def validate_batch(schema: FeatureSchema, batch: Batch) -> None:
  """Keys, ranks, dtypes and the consistency of B and L across a batch's arrays."""
  required = [k for k in schema.batch_keys() if k not in ("label", "weight")]
  missing = [k for k in required if k not in batch]
  if missing:
    raise KeyError(f"batch is missing {missing}; it has {sorted(batch)}")
  item_id, hist, mask = batch["item_id"], batch["hist_item_id"], batch["hist_mask"]
  checks.check_rank("batch['item_id']", item_id, 1)
  checks.check_rank("batch['hist_item_id']", hist, 2)
  checks.check_integer("batch['item_id']", item_id)
  checks.check_integer("batch['hist_item_id']", hist)
  checks.check_bool("batch['hist_mask']", mask)
  checks.check_shape("batch['hist_item_id']", hist, (item_id.shape[0], None))
  checks.check_same_dims(
      [("hist_item_id", hist.shape[1]), ("hist_mask", mask.shape[-1])], "L (sequence length)"
  )
  checks.check_shape("batch['hist_mask']", mask, hist.shape)
  for spec in schema.user_features:
    key = f"user/{spec.name}"
    expected = (item_id.shape[0], spec.max_values) if spec.multi_valued else (item_id.shape[0],)
    checks.check_shape(f"batch[{key!r}]", batch[key], expected)


class CTRModel(nnx.Module):
  """Shared parts: catalog, item and user encoders, and the batch embedding step."""

  def __init__(
      self,
      schema: FeatureSchema,
      config: ModelConfig,
      *,
      rngs: nnx.Rngs,
      catalog: ItemCatalog | None = None,
      sharding: ShardingRules = NO_SHARDING,
      pairwise_similarity: bool = False,
  ):
    self.schema = schema
    self.config = config
    self.catalog = CatalogTables(schema, catalog, sharding, pairwise=pairwise_similarity)
    self.items = ItemEncoder(schema, rngs=rngs, sharding=sharding)
    self.users = UserEncoder(schema, rngs=rngs, sharding=sharding)

  def embed(self, batch: Batch) -> dict[str, jax.Array]:
    """user [B, u], target [B, d], behaviors [B, L, d], mask [B, L]."""
    validate_batch(self.schema, batch)
    item_id = batch["item_id"]
    return dict(
        user=self.users(batch, item_id.shape[0]),
        target=self.items(self.catalog, item_id),
        behaviors=self.items(self.catalog, batch["hist_item_id"]),
        mask=batch["hist_mask"],
    )

  def modality_vectors(self, item_ids: jax.Array) -> list[jax.Array]:
    """K arrays [..., D_k] of frozen vectors, in schema order."""
    return [self.catalog.vectors(name, item_ids) for name in self.schema.modality_names]

  def __call__(self, batch: Batch, *, train: bool = False, rngs: nnx.Rngs | None = None):
    raise NotImplementedError

  # Serving: one user, N candidates. The generic path repeats the user for every candidate and
  # runs the training-time forward; models with a cheaper decomposition (DMF) override both.

  def encode_user(self, user: Batch) -> dict:
    """One user's request features -> a target-agnostic state (a pytree of arrays).

    `user` holds user/<field> (scalar, or [M]), hist_item_id [L] and hist_mask [L].
    """
    return {k: jnp.asarray(v) for k, v in user.items()}

  def score_candidates(self, user_state: dict, item_ids: jax.Array) -> jax.Array:
    """Logits [N] of N candidate items (int [N]) for the encoded user."""
    n = item_ids.shape[0]
    batch = {k: jnp.broadcast_to(v, (n, *jnp.shape(v))) for k, v in user_state.items()}
    batch["item_id"] = item_ids
    return self(batch, train=False)


class DIN(CTRModel):
  """ID-only DIN: head([user ; e_t ; sum_j w_j e_j])."""

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding)
    d = schema.item_dim
    self.attention = DinAttention(
        d, hidden=config.din_hidden, normalization=config.din_normalization, rngs=rngs
    )
    self.head = PredictionHead(
        schema.user_dim + 2 * d, config.mlp_hidden, activation=config.activation,
        dropout=config.dropout, rngs=rngs,
    )

  def __call__(self, batch, *, train=False, rngs=None):
    x = self.embed(batch)
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
    pairwise = (config.similarity == "frozen"
                and schema.num_items <= config.pairwise_similarity_max_items)
    super().__init__(schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                     pairwise_similarity=pairwise)
    if not schema.modalities:
      raise ValueError(f"model {config.name!r} needs at least one modality in the schema")
    if attention not in ("dta", "early_fusion"):
      raise ValueError(f"DMF attention {attention!r} is not one of ('dta', 'early_fusion')")
    d, k = schema.item_dim, len(schema.modalities)
    self.use_me, self.use_mc = use_me, use_mc
    self.similarity = TargetAwareSimilarity(
        [m.dim for m in schema.modalities], mode=config.similarity,
        projection_dim=config.projection_dim, rngs=rngs,
    )
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

  def similarities(self, batch: Batch) -> jax.Array:
    """Target-aware similarities s [B, L, K] (0 at masked positions)."""
    if self.catalog.has_pairwise:
      sims = [self.catalog.pairwise_similarity(name, batch["item_id"], batch["hist_item_id"])
              for name in self.schema.modality_names]
      return jnp.stack(sims, axis=-1) * batch["hist_mask"][..., None]
    return self.similarity(
        self.modality_vectors(batch["item_id"]),
        self.modality_vectors(batch["hist_item_id"]),
        batch["hist_mask"],
    )

  def __call__(self, batch, *, train=False, rngs=None):
    x = self.embed(batch)
    s = self.similarities(batch)
    if self.use_me:
      buckets = bucketize(s, self.config.num_buckets)
      rep = self.attention(x["target"], x["behaviors"], buckets, x["mask"])
    else:
      rep = self.attention(x["target"], x["behaviors"], x["mask"])
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
    s = jnp.stack(sims, axis=-1) * mask[None, :, None]  # [N, L, K]
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

MODELS: dict[str, ModelFactory] = {
    "din": DIN,
    "dmf": functools.partial(DMF, attention="dta"),
    "dmf_early_fusion": functools.partial(DMF, attention="early_fusion"),
    "dmf_no_me": functools.partial(DMF, use_me=False),
    "dmf_no_mc": functools.partial(DMF, use_mc=False),
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
