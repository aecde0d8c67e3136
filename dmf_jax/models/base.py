"""What every CTR model shares: the common config, item and user encoders, batch checks, base class.

A model is two calls, used alike by training and serving:

  state = model.encode_user(batch)            # user fields and history: everything target-agnostic
  logits = model.score(state, candidates)     # candidates int [B, N] -> logits [B, N]

Training runs them with N = 1 (`model(batch)` -> [B]); serving with one user (B = 1) and N
candidates. Per-item work runs once per distinct item (`dmf_jax.core.rows`): the models see
item rows and row indices only.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.catalog import VECTOR_DTYPES, CatalogTables, ItemCatalog
from dmf_jax.core.rows import Rows, item_rows
from dmf_jax.core.schema import FeatureSchema
from dmf_jax.core.sharding import NO_SHARDING, ShardingRules, merge_leading, split_leading
from dmf_jax.nn.embedding import FeatureEmbedding
from dmf_jax.nn.layers import ACTIVATIONS, PredictionHead
from dmf_jax.nn.losses import bce_with_logits
from dmf_jax.nn.numeric import NumericFeatures
from dmf_jax.nn.precision import COMPUTE_DTYPES
from dmf_jax.nn.similarity import (LOOKUP_MODES, SIMILARITY_CALIBRATIONS, SIMILARITY_MODES,
                                   CatalogSimilarity, SimilarityHistory, resolve_lookup_mode)
from dmf_jax.nn.simtier import SIMTIER_NORMALIZATIONS

Batch = Mapping[str, jax.Array]


# ---------------------------------------------------------------------------------------------
# Configs: the common part, and the modality-centric part shared by DMF and the baselines
# ---------------------------------------------------------------------------------------------


HEAD_KINDS = ("mlp", "dcnv2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What every model has: the prediction head and the modalities it sees.

  Each family extends it (`DinConfig`, `DmfConfig`, ...); `models.registry` picks the family's
  class by model name. Validation lists every problem at once.
  """

  name: str = "dmf"  # the registered model (`models.registry.MODELS`)
  mlp_hidden: tuple[int, ...] = checks.field((256, 128, 64), "sizes")  # the head's tower widths
  activation: str = checks.field("relu", ACTIVATIONS)  # the tower's activation
  dropout: float = checks.field(0.0, "fraction")  # in the head (and BST's layers) in training
  # The head: 'mlp' (the tower only) or 'dcnv2' (`nn.layers.CrossNetwork` of cross_layers
  # layers, full rank or of rank cross_rank, stacked before the tower).
  head: str = checks.field("mlp", HEAD_KINDS)
  cross_layers: int = checks.field(3, "positive_int")  # DCNv2's cross layers
  cross_rank: int = checks.field(0, "non_negative_int")  # their rank (0: full rank)
  # Modalities the model sees (empty: all the dataset's); the experiment restricts the schema.
  modalities: tuple[str, ...] = checks.field((), "names")
  # How the catalog holds the frozen vectors on the devices ('bfloat16': half the memory;
  # lookups return float32 either way).
  vector_dtype: str = checks.field("float32", tuple(VECTOR_DTYPES))
  # The forward's dtype ('bfloat16': mixed precision, `nn.precision`); parameters, optimizer
  # state, logits, losses and softmax normalisation stay float32.
  compute_dtype: str = checks.field("float32", tuple(COMPUTE_DTYPES))

  def __post_init__(self):
    problems = checks.check_fields(self) + self.cross_field_problems()
    if problems:
      raise checks.Problems([f"model config: {p}" for p in problems])

  def cross_field_problems(self) -> list[str]:
    """Rules that tie fields together (families extend this)."""
    return []

  @property
  def pretrain_epochs(self) -> int:
    """Epochs of a 'pretrain' phase before the main one (0: none; MAKE has one)."""
    return 0

  @classmethod
  def search_space(cls) -> dict[str, list]:
    """The values `train.tuning` tries for the family's fields ({field: values}); each family
    adds its own knobs to its parents'."""
    return {"dropout": [0.0, 0.1, 0.2, 0.3],
            "mlp_hidden": [(256, 128, 64), (128, 64), (512, 256, 128)]}

  @classmethod
  def from_mapping(cls, values: Mapping) -> "ModelConfig":
    """From a dict or ConfigDict; unknown keys are an error that lists the valid ones."""
    return checks.dataclass_from_mapping(cls, values, "model config")


def prediction_head(in_dim: int, config: ModelConfig, *, rngs: nnx.Rngs) -> PredictionHead:
  """The head of `config` over [B, in_dim] features: its tower, and DCNv2's cross layers
  when config.head == 'dcnv2'."""
  return PredictionHead(
      in_dim, config.mlp_hidden, activation=config.activation, dropout=config.dropout,
      cross_layers=config.cross_layers if config.head == "dcnv2" else 0,
      cross_rank=config.cross_rank, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class MultimodalConfig(ModelConfig):
  """Target-aware similarity and SimTier: DMF's modality-centric settings, shared by the
  similarity baselines so that comparisons differ in architecture only."""

  # Cosines of the frozen vectors, or of learned projections of them ('projected').
  similarity: str = checks.field("frozen", SIMILARITY_MODES)
  projection_dim: int = checks.field(64, "positive_int")  # the projections' width
  # Frozen similarity from a precomputed all-pairs cosine matrix when the catalog has at most
  # this many items (0: never); the same function, one gather instead of two vector gathers.
  pairwise_similarity_max_items: int = checks.field(4096, "non_negative_int")
  # 'catalog_range': frozen cosines are mapped from the catalog's typical range (random item
  # pairs, 0.5-99.5 percentiles) onto [-1, 1] before bucketing / SimTier ('none': raw cosine).
  similarity_calibration: str = checks.field("none", SIMILARITY_CALIBRATIONS)
  num_tiers: int = checks.field(20, "positive_int")  # SimTier's histogram bins over [-1, 1]
  simtier_normalization: str = checks.field("log1p", SIMTIER_NORMALIZATIONS)  # of the counts
  simtier_hidden: tuple[int, ...] = checks.field((64, 32), "sizes")  # SimTier's MLP widths
  # How small lookups run: DTA's bucket scores and mass, SimTier's counts, the pairwise cosine
  # matrix ('gather': scalar gathers and segment sums; 'one_hot': the same sums as matmuls;
  # 'auto': one_hot on TPU, where a scalar gather costs a whole memory tile).
  lookup_mode: str = checks.field("auto", LOOKUP_MODES)

  @classmethod
  def search_space(cls) -> dict[str, list]:
    return {**super().search_space(), "num_tiers": [10, 20, 40]}

  def cross_field_problems(self) -> list[str]:
    problems = super().cross_field_problems()
    if self.similarity_calibration != "none" and self.similarity != "frozen":
      problems.append("similarity_calibration needs similarity='frozen' (a projected "
                      "similarity is learned, the catalog's range does not apply)")
    return problems


# ---------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------


class ItemEncoder(nnx.Module):
  """Item id -> e = [id embedding ; side-field embeddings ; numeric fields]: int [...] ->
  float32 [..., d] (numeric fields: `nn.numeric`, from the catalog's values).

  Fields are concatenated in schema order (kept in `names`: an nnx.Dict's iteration order is
  not preserved by split/merge). Id V (one past the catalog) is the id table's OOV row; a
  hashed id table (`FeatureSchema.item_id_hash_buckets`) is read at the catalog's hashed rows.
  """

  def __init__(self, schema: FeatureSchema, *, rngs: nnx.Rngs, sharding: ShardingRules):
    self.item_id = FeatureEmbedding(schema.item_id_spec, rngs=rngs, sharding=sharding)
    self.names = tuple(f.name for f in schema.item_features)
    self.fields = nnx.Dict(
        {f.name: FeatureEmbedding(f, rngs=rngs, sharding=sharding) for f in schema.item_features}
    )
    self.numeric = NumericFeatures(schema.item_numeric, rngs=rngs)

  def id_embedding(self, catalog: CatalogTables, item_ids: jax.Array) -> jax.Array:
    """The item-id part: int [...] -> [..., item_id_dim]. Items past the trained vocabulary
    (added to the catalog at serving) read the OOV row, or their hashed rows."""
    if catalog.hashed_ids:  # the item's hashed rows, from its raw id in the catalog
      return self.item_id(catalog.id_rows(item_ids))
    return self.item_id.table.lookup(self.item_id.table.safe_ids(item_ids))

  def __call__(self, catalog: CatalogTables, item_ids: jax.Array) -> jax.Array:
    parts = [self.id_embedding(catalog, item_ids)]
    for name in self.names:
      parts.append(self.fields[name](catalog.side_values(name, item_ids)))
    parts += self.numeric({name: catalog.numeric_values(name, item_ids)
                           for name in self.numeric.names})
    return jnp.concatenate(parts, axis=-1)


class UserEncoder(nnx.Module):
  """User profile fields `user/<name>` (categorical, then numeric) -> [B, user_dim]
  (user_dim may be 0)."""

  def __init__(self, schema: FeatureSchema, *, rngs: nnx.Rngs, sharding: ShardingRules):
    self.names = tuple(f.name for f in schema.user_features)  # schema order (see ItemEncoder)
    self.fields = nnx.Dict(
        {f.name: FeatureEmbedding(f, rngs=rngs, sharding=sharding) for f in schema.user_features}
    )
    self.numeric = NumericFeatures(schema.user_numeric, rngs=rngs)

  def __call__(self, batch: Batch, batch_size: int) -> jax.Array:
    parts = [self.fields[name](batch[f"user/{name}"]) for name in self.names]
    parts += self.numeric({name: batch[f"user/{name}"] for name in self.numeric.names})
    if not parts:
      return jnp.zeros((batch_size, 0), jnp.float32)
    return jnp.concatenate(parts, axis=-1)


class ContentTower(Protocol):
  """An item-content tower appended to the ID tokens (EM3's Q-Former, the Vector baseline's
  projections): K modality vectors [R, D_k] and whether each item has each (present bool
  [R, K]) -> [R, out_dim]; `sequence` marks the behaviour side. Optional members:
  `sides_differ` (True: the behaviour side is another function of the item, e.g. EM3's LoRA,
  so the candidates' content is computed for their own rows, not read off the history's), and
  training losses `loss_terms(model, batch, rngs, targets)` -> {name: (weight, loss)}, where
  targets [B, out_dim] is its output for the batch's target items as the training forward
  computed it (so a loss over the targets' content does not encode them again; None if the
  forward did not)."""

  out_dim: int

  def __call__(self, vectors: list[jax.Array], present: jax.Array, *, sequence: bool = False,
               train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array: ...


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
  for spec in schema.user_numeric:
    key = f"user/{spec.name}"
    checks.check_floating(f"batch[{key!r}]", batch[key])
    checks.check_shape(f"batch[{key!r}]", batch[key], (item_id.shape[0],))


# ---------------------------------------------------------------------------------------------
# One forward's item encodings: the same distinct rows are encoded once
# ---------------------------------------------------------------------------------------------


# id(ids [S, U]) -> (ids, tokens [S, U, d]) of the forward in progress (`CTRModel.item_tokens`).
_ENCODED_ROWS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "encoded_item_rows", default=None)

# {'tokens': the candidates' tokens [B, N, d]} of the training forward in progress
# (`CTRModel.training_loss`: a content tower's loss terms read the targets' content there).
_CANDIDATE_TOKENS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "candidate_tokens", default=None)


@contextlib.contextmanager
def _fresh_dict(var: contextvars.ContextVar[dict | None]):
  """Within the block, `var` holds a new empty dict (yielded)."""
  held = {}
  token = var.set(held)
  try:
    yield held
  finally:
    var.reset(token)


def _encoded_once():
  """Within the block, `item_tokens` of the same batch-unique rows is computed once."""
  return _fresh_dict(_ENCODED_ROWS)


def _candidate_tokens_kept():
  """Within the block, `candidate_tokens` keeps its output in the yielded dict."""
  return _fresh_dict(_CANDIDATE_TOKENS)


# ---------------------------------------------------------------------------------------------
# The users' state between `encode_user` and `score`
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class UserState:
  """What every family's state holds (each family extends it with its own fields).

  user [B, u]; mask bool [B, L]; candidate_rows: the targets' Rows among a training batch's
  distinct items (set by `CTRModel.__call__`; None: `score` finds the candidates' rows).
  """

  user: jax.Array
  mask: jax.Array
  candidate_rows: Rows | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class SimilarityState(UserState):
  """A state with the similarities' history side (None for a model built without them)."""

  similarity: SimilarityHistory | None = None


# ---------------------------------------------------------------------------------------------
# The base model
# ---------------------------------------------------------------------------------------------


class CTRModel(nnx.Module):
  """Catalog, item and user encoders, optional similarities and content tower, the head.

  Subclasses build `self.head` and implement `encode_user` and `score`. The catalog holds the
  modality vectors only for a model that reads them (similarities, a content tower, or
  READS_VECTORS, e.g. MAKE's own tower): an ID-only model leaves them on the host.
  """

  READS_VECTORS = False  # True: the model calls `modality_vectors` itself

  def __init__(
      self,
      schema: FeatureSchema,
      config: ModelConfig,
      *,
      rngs: nnx.Rngs,
      catalog: ItemCatalog | None = None,
      sharding: ShardingRules = NO_SHARDING,
      similarity: bool = False,
      content: ContentTower | None = None,
  ):
    """similarity=True: the model uses target-aware similarities (config: a MultimodalConfig);
    it needs a modality, and frozen cosines come from a precomputed all-pairs matrix for small
    catalogs. `content`: a tower whose output is appended to every item token."""
    if (similarity or content is not None) and not schema.modalities:
      raise ValueError(f"model {config.name!r} needs at least one modality in the schema")
    pairwise = (similarity and config.similarity == "frozen"
                and schema.num_items <= config.pairwise_similarity_max_items)
    self.schema = schema
    self.config = config
    self.catalog = CatalogTables(
        schema, catalog, sharding, pairwise=pairwise, vector_dtype=config.vector_dtype,
        pairwise_lookup=resolve_lookup_mode(config.lookup_mode) if similarity else "gather",
        vectors=similarity or content is not None or self.READS_VECTORS)
    self.items = ItemEncoder(schema, rngs=rngs, sharding=sharding)
    self.users = UserEncoder(schema, rngs=rngs, sharding=sharding)
    self.similarity = CatalogSimilarity(
        schema.modality_names, [m.dim for m in schema.modalities], mode=config.similarity,
        projection_dim=config.projection_dim, calibration=config.similarity_calibration,
        dtype=self.dtype, rngs=rngs,
    ) if similarity else None
    self.content = content

  @property
  def dtype(self):
    """The forward's dtype (`config.compute_dtype`): item and user features enter it here."""
    return COMPUTE_DTYPES[self.config.compute_dtype]

  # -- items ----------------------------------------------------------------------------------

  @property
  def token_dim(self) -> int:
    """Width d of an item token: the ID side [e] plus the content tower's output, if any."""
    return self.schema.item_dim + (self.content.out_dim if self.content is not None else 0)

  def item_rows(self, item_ids: jax.Array, positions: int | None = None) -> Rows:
    """The distinct items of `item_ids` (int [...]) as Rows of ids (`core.rows.item_rows`;
    positions: all the item positions of the batch). Ids index the catalog (the trained items,
    plus any added at serving). Eagerly, out-of-range ids raise (under jit they read the id
    table's OOV row and the last item's catalog entry)."""
    checks.check_integer(self.items.item_id.table.name, item_ids)
    checks.check_ids_in_range(self.items.item_id.table.name, item_ids, self.catalog.num_items)
    return item_rows(item_ids, self.catalog.num_items, positions)

  def history_rows(self, batch: Batch) -> Rows:
    """Rows of the behaviours hist_item_id [B, L]: the batch's own distinct items when the
    input pipeline sent them (`core.rows.batch_unique_rows`: per data shard, fewer rows than
    the catalog), else `item_rows` (the catalog, or every position)."""
    unique = self._unique_rows(batch, "hist_item_row")
    return unique if unique is not None else self.item_rows(batch["hist_item_id"])

  def _unique_rows(self, batch: Batch, key: str) -> Rows | None:
    """Rows(unique_items [S, U], batch[key], shards=S) when the batch has them and U is below
    the catalog's V + 1 rows (the catalog path is cheaper otherwise); else None."""
    unique = batch.get("unique_items")
    if unique is None or unique.shape[1] >= self.catalog.num_items + 1:
      return None
    checks.check_integer("batch['unique_items']", unique)
    checks.check_ids_in_range("batch['unique_items']", unique, self.catalog.num_items)
    checks.check_shape(f"batch[{key!r}]", batch[key], batch["item_id"].shape
                       if key == "item_row" else batch["hist_item_id"].shape)
    return Rows(jnp.asarray(unique, jnp.int32), jnp.asarray(batch[key], jnp.int32),
                shards=unique.shape[0])

  def modality_vectors(self, item_ids: jax.Array | None = None) -> list[jax.Array]:
    """K arrays [..., D_k] of frozen vectors (compute dtype), in schema order; item_ids None:
    every item's, [V, D_k], the tables as stored (`CatalogTables.readable_whole` only)."""
    return [(self.catalog.all_vectors(name) if item_ids is None
             else self.catalog.vectors(name, item_ids)).astype(self.dtype)
            for name in self.schema.modality_names]

  def modality_present(self, item_ids: jax.Array | None = None) -> jax.Array:
    """Whether each item has each modality (a vector not all zero): bool [..., K]; item_ids
    None: every item's, [V, K]."""
    return jnp.stack([self.catalog.all_present(name) if item_ids is None
                      else self.catalog.has_vectors(name, item_ids)
                      for name in self.schema.modality_names], axis=-1)

  def item_content(self, rows: Rows, *, sequence: bool = False, train: bool = False,
                   rngs: nnx.Rngs | None = None) -> Callable[[jax.Array], jax.Array]:
    """The content tower as a function of the rows' ids: int [R] -> [R, out_dim]. Over the
    whole catalog (`rows.catalog`, tables not row-sharded) it reads the vector tables as
    stored, with no gather of V + 1 rows, and repeats item V - 1's output as row V (the
    out-of-range ids read the last item's catalog entry: `CatalogTables.safe_ids`)."""
    whole = rows.catalog and not rows.shards and self.catalog.readable_whole

    def content(ids):
      ids = None if whole else ids  # the whole catalog: its tables as stored, rows [0, V)
      out = self.content(self.modality_vectors(ids), self.modality_present(ids),
                         sequence=sequence, train=train, rngs=rngs)
      return jnp.concatenate([out, out[-1:]]) if whole else out
    return content

  def item_tokens(self, rows: Rows, *, sequence: bool = False, train: bool = False,
                  rngs: nnx.Rngs | None = None) -> Rows:
    """Rows of ids -> Rows of tokens [R, token_dim] = [e ; content] (sequence: behaviour side).

    In a training forward over a batch's distinct items the history and the targets name the
    same rows: without a content tower their tokens are the same function of the ids, so
    they are encoded once (`_encoded_once`); the encoding's backward pass, and a row-sparse
    table's update, then see each distinct item once instead of once per side."""
    content = None if self.content is None else self.item_content(
        rows, sequence=sequence, train=train, rngs=rngs)

    def encode(ids):
      e = self.items(self.catalog, ids).astype(self.dtype)
      if content is None:
        return e
      return jnp.concatenate([e, content(ids)], axis=-1)

    encoded = _ENCODED_ROWS.get()
    if encoded is None or not rows.shards or self.content is not None:
      return rows.map(encode)
    ids, tokens = encoded.get(id(rows.values), (None, None))
    if ids is not rows.values:  # held, so the id cannot name another array meanwhile
      ids, tokens = encoded[id(rows.values)] = rows.values, rows.map(encode).values
    return Rows(tokens, rows.index, rows.shards)

  def candidate_rows(self, state: UserState, candidates: jax.Array) -> Rows:
    """Rows of the candidates int [B, N], counting the users' B x L history positions too (in
    a training forward over a batch with unique rows: the targets' rows among them)."""
    if state.candidate_rows is not None:
      return state.candidate_rows
    if getattr(self.content, "sides_differ", False):  # the history's rows are another function
      return self.item_rows(candidates)
    return self.item_rows(candidates, candidates.size + state.mask.size)

  def candidate_tokens(self, state: UserState, candidates: jax.Array, *, train: bool = False,
                       rngs: nnx.Rngs | None = None) -> jax.Array:
    """Candidate ids int [B, N] -> their tokens [B, N, token_dim]."""
    rows = self.candidate_rows(state, candidates)
    tokens = self.item_tokens(rows, train=train, rngs=rngs).take()
    kept = _CANDIDATE_TOKENS.get()
    if kept is not None:
      kept["tokens"] = tokens
    return tokens

  def user_embedding(self, batch: Batch) -> jax.Array:
    """[B, user_dim] from the batch's user/<field> arrays (compute dtype)."""
    return self.users(batch, batch["hist_mask"].shape[0]).astype(self.dtype)

  # -- similarities (`nn.similarity.CatalogSimilarity`, for the models built with them) ----

  @property
  def takes_record_similarities(self) -> bool:
    """Whether batches may carry their own frozen cosines 'hist_similarity' [B, L, K] (the
    input pipeline's `data.pipeline.RecordSimilarities`)."""
    return self.similarity is not None and self.similarity.takes_records(self.catalog)

  def similarities(self, batch: Batch) -> jax.Array:
    """Each example's target-aware similarities s [B, L, K] (0 at masked positions)."""
    history = self.similarity.record(self.catalog, batch)
    if history is None:
      history = self.similarity.history(self.catalog, self.history_rows(batch))
    return self.similarity.score(self.catalog, history, batch["item_id"][:, None],
                                 batch["hist_mask"])[:, 0]

  # -- the forward ----------------------------------------------------------------------------

  def encode_user(self, batch: Batch, *, train: bool = False, rngs: nnx.Rngs | None = None
                  ) -> UserState:
    """user/<field> arrays, hist_item_id [B, L], hist_mask [B, L] -> the users' state (the
    family's `UserState`, every leaf with leading dim B)."""
    raise NotImplementedError

  def score(self, state: UserState, candidates: jax.Array, *, train: bool = False,
            rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, N] of candidates int [B, N] against each user's state."""
    raise NotImplementedError

  def predict(self, state: UserState, features: list[jax.Array], *, train: bool = False,
              rngs: nnx.Rngs | None = None) -> jax.Array:
    """head([user ; *features]): features [B, N, f_i] -> logits [B, N].

    The head runs on the B * N rows as a 2-D batch (XLA's CPU backend runs the weight
    gradients of [B, 1, F] inputs markedly slower)."""
    user = state.user
    b, n = features[0].shape[:2]
    user = jnp.broadcast_to(user[:, None], (b, n, user.shape[-1]))
    x = merge_leading(jnp.concatenate([user, *features], -1))
    return split_leading(self.head(x, train=train, rngs=rngs), b, n)

  def __call__(self, batch: Batch, *, train: bool = False, rngs: nnx.Rngs | None = None
               ) -> jax.Array:
    """Logits [B]: each example's user against its own target item."""
    return self.forward(batch, train=train, rngs=rngs)[1]

  def forward(self, batch: Batch, *, train: bool = False, rngs: nnx.Rngs | None = None
              ) -> tuple[UserState, jax.Array]:
    """(the users' state, logits [B]) of a training or evaluation batch: `encode_user`, then
    `score` of each example's own target, with what the input pipeline sent (the records'
    similarities, the targets' rows among the batch's distinct items: each encoded once)."""
    validate_batch(self.schema, batch)
    with _encoded_once():
      state = self.encode_user(batch, train=train, rngs=rngs)
      record = (self.similarity.record(self.catalog, batch) if self.similarity is not None
                else None)
      if record is not None:  # the history side's vector reads are then dead code under jit
        state = dataclasses.replace(state, similarity=record)
      targets = self._unique_rows(batch, "item_row")
      if targets is not None:  # the targets' rows among the batch's distinct items
        state = dataclasses.replace(
            state, candidate_rows=Rows(targets.values, targets.index[:, None], targets.shards))
      return state, self.score(state, batch["item_id"][:, None], train=train, rngs=rngs)[:, 0]

  # -- training hooks: the loss of a phase and which parameters it updates. Phases run in
  # order: 'pretrain' for `config.pretrain_epochs` epochs (when > 0), then 'main'.

  def training_loss(self, batch: Batch, *, phase: str = "main", rngs: nnx.Rngs | None = None
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, extra scalar metrics) of one training batch: the CTR loss plus the
    content tower's weighted terms, if it has any (given the tower's output for the targets
    from the forward's target tokens [e ; c], not computed again)."""
    with _candidate_tokens_kept() as kept:
      logits = self(batch, train=True, rngs=rngs)
    ctr = bce_with_logits(logits, batch["label"], batch.get("weight"))
    terms = getattr(self.content, "loss_terms", None)
    if terms is None:
      return ctr, {}
    loss, extras = ctr, {"ctr_loss": ctr}
    # [B, content out_dim]; None where the family's score did not read candidate tokens
    targets = kept["tokens"][:, 0, self.schema.item_dim:] if "tokens" in kept else None
    for name, (weight, value) in terms(self, batch, rngs, targets).items():
      loss, extras[name] = loss + weight * value, value
    return loss, extras

  def is_trainable(self, phase: str, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (attribute names from the model) is updated in `phase`."""
    del phase, path
    return True
