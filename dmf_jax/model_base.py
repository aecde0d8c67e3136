"""The parts every CTR model shares: its config, item and user encoders, batch checks, base class.

`dmf_jax.models` builds the models (and re-exports these names); `dmf_jax.baselines` and
`dmf_jax.em3` add the other families on the same base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax import checks
from dmf_jax.attention import DIN_NORMALIZATIONS
from dmf_jax.catalog import CatalogTables, ItemCatalog
from dmf_jax.embedding import FeatureEmbedding
from dmf_jax.fusion import CMM_MODES
from dmf_jax.layers import ACTIVATIONS
from dmf_jax.losses import bce_with_logits
from dmf_jax.schema import FeatureSchema
from dmf_jax.sharding import NO_SHARDING, ShardingRules, take_rows
from dmf_jax.similarity import SIMILARITY_MODES, TargetAwareSimilarity
from dmf_jax.simtier import SIMTIER_NORMALIZATIONS

Batch = Mapping[str, jax.Array]
EM3_HEADS = ("din", "dmf")
SIMILARITY_CALIBRATIONS = ("none", "catalog_range")
CONTRASTIVE_NEGATIVES = ("in_batch", "sampled")


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
  # 'catalog_range': frozen cosines are mapped from the catalog's typical range (random item
  # pairs, 0.5-99.5 percentiles) onto [-1, 1] before bucketing / SimTier ('none': raw cosine).
  similarity_calibration: str = "none"
  # Prediction head.
  mlp_hidden: tuple[int, ...] = (256, 128, 64)
  activation: str = "relu"
  dropout: float = 0.0
  # Modalities the model sees (empty: all the dataset's); the experiment restricts the schema.
  modalities: tuple[str, ...] = ()
  # Baselines: width of each projected modality token (din_mm_concat, make); MAKE's multimodal
  # tower, its pre-training epochs and whether it stays frozen after joining (else joint).
  modality_token_dim: int = 32
  make_hidden: tuple[int, ...] = (64, 32)
  make_pretrain_epochs: int = 2
  make_freeze: bool = False
  # EM3 (dmf_jax.em3): the ranking head it feeds ('din' or 'dmf'); the Fusion-Q-Former; LoRA
  # on the behaviour side (lora_layers: a regex over the Q-Former's layer paths; lora_rank 0:
  # the behaviour side fine-tunes the full module instead); the Content-ID contrastive loss.
  em3_head: str = "din"
  content_dim: int = 32
  qformer_width: int = 32
  qformer_queries: int = 2
  qformer_layers: int = 1
  qformer_heads: int = 2
  qformer_dropout: float = 0.0
  modality_dropout: float = 0.0
  lora_rank: int = 4
  lora_alpha: float = 8.0
  lora_layers: str = r"layers/.*|output"
  contrastive_weight: float = 0.1
  contrastive_temperature: float = 0.1
  contrastive_dim: int = 32
  contrastive_negatives: str = "in_batch"
  contrastive_num_negatives: int = 256
  # Catalogs with at most this many items encode every item once per step and gather (item
  # tokens, DTA's ID keys and values, EM3's Q-Former without dropout) instead of encoding each
  # behaviour position: the same function, B * L / V times less per-item work (0: never).
  item_table_max_items: int = 4096

  def __post_init__(self):
    problems = []  # every problem is reported at once
    for field in ("num_heads", "head_dim", "num_buckets", "bucket_dim", "projection_dim",
                  "num_tiers", "cmm_dim", "modality_token_dim", "content_dim", "qformer_width",
                  "qformer_queries", "qformer_layers", "qformer_heads", "contrastive_dim",
                  "contrastive_num_negatives"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append(f"model config: {field} must be a positive int, got {value!r}")
    for field in ("simtier_hidden", "din_hidden", "mlp_hidden", "make_hidden"):
      value = tuple(getattr(self, field))
      if not value or any(not isinstance(v, int) or v < 1 for v in value):
        problems.append(f"model config: {field} must be a non-empty list of positive ints, got {value!r}")
      object.__setattr__(self, field, value)
    choices = dict(
        similarity=SIMILARITY_MODES, simtier_normalization=SIMTIER_NORMALIZATIONS,
        cmm=CMM_MODES, din_normalization=DIN_NORMALIZATIONS, activation=ACTIVATIONS,
    )
    for field, allowed in choices.items():
      if getattr(self, field) not in allowed:
        problems.append(f"model config: {field}={getattr(self, field)!r} is not one of {allowed}")
    if not 0.0 <= self.dropout < 1.0:
      problems.append(f"model config: dropout must be in [0, 1), got {self.dropout}")
    if not 0.0 <= self.cmm_alpha <= 1.0:
      problems.append(f"model config: cmm_alpha must be in [0, 1], got {self.cmm_alpha}")
    if self.similarity_calibration not in SIMILARITY_CALIBRATIONS:
      problems.append(f"model config: similarity_calibration={self.similarity_calibration!r} "
                       f"is not one of {SIMILARITY_CALIBRATIONS}")
    if self.similarity_calibration != "none" and self.similarity != "frozen":
      problems.append("model config: similarity_calibration needs similarity='frozen' (a "
                       "projected similarity is learned, the catalog's range does not apply)")
    for field in ("pairwise_similarity_max_items", "item_table_max_items"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 0:
        problems.append(f"model config: {field} must be an int >= 0")
    if isinstance(self.modalities, str) or any(not isinstance(m, str) for m in self.modalities):
      problems.append(f"model config: modalities must be a list of names, got {self.modalities!r}")
    object.__setattr__(self, "modalities", tuple(self.modalities))
    if not isinstance(self.make_pretrain_epochs, int) or self.make_pretrain_epochs < 0:
      problems.append("model config: make_pretrain_epochs must be an int >= 0")
    if self.em3_head not in EM3_HEADS:
      problems.append(f"model config: em3_head={self.em3_head!r} is not one of {EM3_HEADS}")
    if self.contrastive_negatives not in CONTRASTIVE_NEGATIVES:
      problems.append(f"model config: contrastive_negatives={self.contrastive_negatives!r} is "
                       f"not one of {CONTRASTIVE_NEGATIVES}")
    if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
      problems.append("model config: lora_rank must be an int >= 0 (0: no LoRA)")
    if self.contrastive_weight < 0 or self.contrastive_temperature <= 0:
      problems.append("model config: contrastive_weight must be >= 0 and "
                       "contrastive_temperature > 0")
    for field in ("qformer_dropout", "modality_dropout"):
      if not 0.0 <= getattr(self, field) < 1.0:
        problems.append(f"model config: {field} must be in [0, 1)")
    if problems:
      raise checks.Problems(problems)

  @property
  def pretrain_epochs(self) -> int:
    """Epochs of a 'pretrain' phase before the main one (MAKE pre-trains its multimodal module)."""
    return self.make_pretrain_epochs if self.name == "make" else 0

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

  def table(self, catalog: CatalogTables) -> jax.Array:
    """Every item's token and, last, the out-of-range token: [num_items + 1, d].

    Row `table_rows(ids)` equals `self(catalog, ids)`, for any int ids under jit.
    """
    ids = jnp.arange(self.item_id.table.vocab_size + 1)  # the catalog reads id V as item V - 1
    parts = [self.item_id.table.all_rows()]
    for name in self.names:
      parts.append(self.fields[name](catalog.side_values(name, ids)))
    return jnp.concatenate(parts, axis=-1)

  def table_rows(self, item_ids: jax.Array) -> jax.Array:
    """Rows of `table` for item ids: int [...] -> int32 [...]; eagerly, out-of-range ids raise."""
    checks.check_integer(self.item_id.table.name, item_ids)
    checks.check_ids_in_range(self.item_id.table.name, item_ids, self.item_id.table.vocab_size)
    return self.item_id.table.safe_ids(item_ids)


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
      similarity: bool = False,
  ):
    """similarity=True: the model uses target-aware similarities (`similarities`); it needs a
    modality, and frozen cosines come from a precomputed all-pairs matrix for small catalogs."""
    if similarity and not schema.modalities:
      raise ValueError(f"model {config.name!r} needs at least one modality in the schema")
    pairwise = (similarity and config.similarity == "frozen"
                and schema.num_items <= config.pairwise_similarity_max_items)
    self.schema = schema
    self.config = config
    self.catalog = CatalogTables(schema, catalog, sharding, pairwise=pairwise)
    self.items = ItemEncoder(schema, rngs=rngs, sharding=sharding)
    self.users = UserEncoder(schema, rngs=rngs, sharding=sharding)
    self.similarity = TargetAwareSimilarity(
        [m.dim for m in schema.modalities], mode=config.similarity,
        projection_dim=config.projection_dim, rngs=rngs,
    ) if similarity else None

  @property
  def uses_item_table(self) -> bool:
    """Whether `embed` encodes every catalog item once and gathers (small catalogs)."""
    return self.schema.num_items <= self.config.item_table_max_items

  def item_table_pays(self, positions: int) -> bool:
    """Whether encoding the whole (small) catalog is less work than `positions` encodings."""
    return self.uses_item_table and positions > self.schema.num_items

  @property
  def item_token_dim(self) -> int:
    """Width d of the item tokens `embed` returns (subclasses may append to the ID side)."""
    return self.schema.item_dim

  def embed(self, batch: Batch, *, train: bool = False, rngs: nnx.Rngs | None = None
            ) -> dict[str, jax.Array]:
    """user [B, u], target [B, d], behaviors [B, L, d], mask [B, L].

    With `uses_item_table` (and more behaviour positions B * L than items V) also
    item_table [V + 1, d] and behavior_rows int32 [B, L] such that
    behaviors == item_table[behavior_rows] (else both None): per-item work (a projection of
    the tokens) can then run on V + 1 rows instead of B * L positions, and jit drops
    `behaviors` when nothing reads it.
    """
    del train, rngs  # used by subclasses whose item tokens have dropout
    validate_batch(self.schema, batch)
    item_id, hist = batch["item_id"], batch["hist_item_id"]
    x = dict(user=self.users(batch, item_id.shape[0]), mask=batch["hist_mask"],
             item_table=None, behavior_rows=None)
    if not self.item_table_pays(hist.size):
      return x | dict(target=self.items(self.catalog, item_id),
                      behaviors=self.items(self.catalog, hist))
    table, rows = self.items.table(self.catalog), self.items.table_rows(hist)
    return x | dict(target=take_rows(table, self.items.table_rows(item_id)),
                    behaviors=take_rows(table, rows), item_table=table, behavior_rows=rows)

  def modality_vectors(self, item_ids: jax.Array) -> list[jax.Array]:
    """K arrays [..., D_k] of frozen vectors, in schema order."""
    return [self.catalog.vectors(name, item_ids) for name in self.schema.modality_names]

  def encode_modalities(self, encode, *item_ids: jax.Array) -> list[jax.Array]:
    """`encode(self.modality_vectors(ids))` for each id array: [..., D] each.

    `encode` maps K arrays [..., D_k] to [..., D] item by item. Small catalogs (see
    `uses_item_table`) with more positions than items encode the V catalog items once and
    gather rows: the same values and gradients, V instead of sum(ids.size) encodings.
    """
    if not self.item_table_pays(sum(ids.size for ids in item_ids)):
      return [encode(self.modality_vectors(ids)) for ids in item_ids]
    table = encode([self.catalog.all_vectors(name) for name in self.schema.modality_names])
    return [self.catalog.rows(table, ids) for ids in item_ids]

  def similarities(self, batch: Batch) -> jax.Array:
    """Target-aware similarities s [B, L, K] (0 at masked positions)."""
    if self.similarity is None:
      raise ValueError(f"model {self.config.name!r} was built without similarities")
    mask = batch["hist_mask"][..., None]
    if self.catalog.has_pairwise:
      sims = [self.catalog.pairwise_similarity(name, batch["item_id"], batch["hist_item_id"])
              for name in self.schema.modality_names]
      return jnp.stack(self.calibrate(sims), axis=-1) * mask
    s = self.similarity(
        self.modality_vectors(batch["item_id"]),
        self.modality_vectors(batch["hist_item_id"]),
        batch["hist_mask"],
    )
    if self.config.similarity_calibration == "none":
      return s
    return jnp.stack(self.calibrate(list(jnp.moveaxis(s, -1, 0))), axis=-1) * mask

  def calibrate(self, sims: list[jax.Array]) -> list[jax.Array]:
    """Per-modality cosines (schema order) -> calibrated per `similarity_calibration`."""
    if self.config.similarity_calibration == "none":
      return sims
    return [self.catalog.calibrate(name, s) for name, s in zip(self.schema.modality_names, sims)]

  def __call__(self, batch: Batch, *, train: bool = False, rngs: nnx.Rngs | None = None):
    raise NotImplementedError

  # Training hooks: the loss of a phase and which parameters it updates. Phases run in order:
  # 'pretrain' for `config.pretrain_epochs` epochs (when > 0), then 'main'.

  def training_loss(self, batch: Batch, *, phase: str = "main", rngs: nnx.Rngs | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, extra scalar metrics) of one training batch."""
    logits = self(batch, train=True, rngs=rngs)
    return bce_with_logits(logits, batch["label"], batch.get("weight")), {}

  def is_trainable(self, phase: str, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (attribute names from the model) is updated in `phase`."""
    del phase, path
    return True

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
