"""EM3: the multimodal fusion module trained end to end with the ranking model (the EM3 paper).

Composition, not inheritance: a `ContentEncoder` (a Fusion-Q-Former over the item's modality
vectors) is handed to a DIN or DMF ranker (`head`) as its content tower, so every item token
becomes [e ; c]. The target side runs the Q-Former fully trained; the behaviour side
(sequence=True) the same weights frozen plus LoRA adapters (`lora_rank` 0: fully trained there
too). Training adds a symmetric Content-ID InfoNCE between c and the item-id embedding of the
batch's target items (separate linear heads, L2-normalized; in-batch negatives, or
`contrastive_num_negatives` items sampled from the table as well); the targets' c is the one
the ranker's forward computed (`CTRModel.training_loss`), so the Q-Former runs on them once.
The content tower draws its initial weights from a stream of its own, so the ranker starts from
the plain ranker's draws for the same seed (`_content_rngs`).
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.sharding import NO_SHARDING
from dmf_jax.models.base import CTRModel
from dmf_jax.models.din import DIN, DinConfig
from dmf_jax.models.dmf import DMF, DmfConfig
from dmf_jax.nn import lora
from dmf_jax.nn.layers import Linear
from dmf_jax.nn.losses import symmetric_info_nce
from dmf_jax.nn.qformer import FusionQFormer
from dmf_jax.nn.similarity import l2_normalize

HEADS = {"din": DIN, "dmf": DMF}
CONTRASTIVE_NEGATIVES = ("in_batch", "sampled")
CONTENT_STREAM = 0xC0417E47  # folded into the ranker's next key: the content tower's own stream


@dataclasses.dataclass(frozen=True)
class EM3Config(DmfConfig, DinConfig):
  """The ranker it feeds (`em3_head`, configured by its own fields), the Fusion-Q-Former, LoRA
  on the behaviour side (lora_layers: a regex over the Q-Former's layer paths; lora_rank 0: the
  behaviour side fine-tunes the full module instead) and the Content-ID contrastive loss."""

  em3_head: str = checks.field("din", tuple(HEADS))  # the ranker the content tokens feed
  content_dim: int = checks.field(32, "positive_int")  # an item's content token width
  qformer_width: int = checks.field(32, "positive_int")  # the Q-Former's width
  qformer_queries: int = checks.field(2, "positive_int")  # its learned queries
  qformer_layers: int = checks.field(1, "positive_int")  # its layers
  qformer_heads: int = checks.field(2, "positive_int")  # its attention heads
  qformer_dropout: float = checks.field(0.0, "fraction")  # its dropout in training
  modality_dropout: float = checks.field(0.0, "fraction")  # a whole modality dropped, training
  lora_rank: int = checks.field(4, "non_negative_int")  # behaviour-side adapters (0: none)
  lora_alpha: float = 8.0  # their scale alpha / rank
  lora_layers: str = r"layers/.*|output"  # the Q-Former layers that get them (a regex)
  contrastive_weight: float = checks.field(0.1, "non_negative")  # the Content-ID loss's weight
  contrastive_temperature: float = checks.field(0.1, "positive")  # its softmax temperature
  contrastive_dim: int = checks.field(32, "positive_int")  # its heads' output width
  contrastive_negatives: str = checks.field("in_batch", CONTRASTIVE_NEGATIVES)  # or sampled
  contrastive_num_negatives: int = checks.field(256, "positive_int")  # sampled ones per batch

  @classmethod
  def search_space(cls) -> dict[str, list]:
    """The ranker's knobs, then the content tower's and the contrastive loss's, then the
    content tower's own learning rate (an optimizer field: `OptimizerConfig`)."""
    return {**super().search_space(),
            "content_dim": [16, 32, 64], "qformer_width": [16, 32, 64],
            "qformer_queries": [1, 2, 4], "qformer_layers": [1, 2],
            "qformer_dropout": [0.0, 0.1, 0.2], "modality_dropout": [0.0, 0.1, 0.2],
            "contrastive_weight": [0.0, 0.01, 0.03, 0.1],
            "contrastive_temperature": [0.05, 0.1, 0.2],
            "optimizer.content_learning_rate": [5e-4, 1e-3, 4e-3, 8e-3, 1.6e-2]}


class ContentEncoder(nnx.Module):
  """Item content c = Q-Former(modality vectors): K x [R, D_k] -> [R, content_dim], with the
  Content-ID contrastive loss as its training term."""

  def __init__(self, schema, config: EM3Config, *, rngs: nnx.Rngs):
    if not schema.modalities:
      raise ValueError("model 'em3' needs at least one modality in the schema")
    self.config = config
    self.num_items = schema.num_items
    self.fusion = FusionQFormer(
        [m.dim for m in schema.modalities], width=config.qformer_width,
        num_queries=config.qformer_queries, num_layers=config.qformer_layers,
        num_heads=config.qformer_heads, dropout=config.qformer_dropout,
        modality_dropout=config.modality_dropout, out_dim=config.content_dim, rngs=rngs)
    self.lora_paths = tuple(lora.add_lora(
        self.fusion, rank=config.lora_rank, alpha=config.lora_alpha,
        include=config.lora_layers, rngs=rngs) if config.lora_rank else ())
    self.content_head = Linear(config.content_dim, config.contrastive_dim, rngs=rngs)
    self.id_head = Linear(schema.item_id_dim, config.contrastive_dim, rngs=rngs)
    self.out_dim = config.content_dim
    # LoRA: the behaviour side is another function of the item than the target side, so the
    # candidates' content is computed for their own rows, not read off the history's.
    self.sides_differ = config.lora_rank > 0

  def __call__(self, vectors, present=None, *, sequence=False, train=False, rngs=None):
    """present [R, K] bool (None: a vector not all zero); sequence=True: the behaviour side
    (LoRA adapters on frozen base weights)."""
    adapted = sequence and self.sides_differ
    return self.fusion(vectors, present, adapted=adapted, train=train, rngs=rngs)

  def contrastive_loss(self, model: CTRModel, item_ids, *, content=None, train=False,
                       rngs=None) -> jax.Array:
    """Symmetric Content-ID InfoNCE over the items item_ids [B] (scalar); content [B,
    content_dim]: their content c if already computed (the training forward's), else the
    tower runs on them here."""
    cfg = self.config

    def embeddings(ids, content=None):
      if content is None:
        content = self(model.modality_vectors(ids), model.modality_present(ids), train=train,
                       rngs=rngs)
      return (l2_normalize(self.content_head(content)),
              l2_normalize(self.id_head(model.items.id_embedding(model.catalog, ids))))

    content, ids = embeddings(item_ids, content)
    if cfg.contrastive_negatives == "in_batch":
      return symmetric_info_nce(content, ids, item_ids, cfg.contrastive_temperature)
    if rngs is None:
      raise ValueError("em3: sampled contrastive negatives need `rngs` with a 'sample' stream")
    negatives = jax.random.randint(rngs.sample(), (cfg.contrastive_num_negatives,), 0,
                                   self.num_items)
    neg_content, neg_ids = embeddings(negatives)
    return symmetric_info_nce(content, ids, item_ids, cfg.contrastive_temperature,
                              neg_content, neg_ids, negatives)

  def loss_terms(self, model: CTRModel, batch, rngs, targets) -> dict:
    """{'contrastive_loss': (weight, loss)} (none when the weight is 0); targets [B,
    content_dim]: the content of the batch's targets, as the ranker's forward computed it
    (None: computed here)."""
    if self.config.contrastive_weight == 0:
      return {}
    loss = self.contrastive_loss(model, batch["item_id"], content=targets, train=True,
                                 rngs=rngs)
    return {"contrastive_loss": (self.config.contrastive_weight, loss)}


def build_em3(schema, config: EM3Config, *, rngs, catalog=None, sharding=NO_SHARDING) -> CTRModel:
  """The registry's `em3`: the `em3_head` ranker (DIN or DMF) over [e ; Q-Former content]."""
  content = ContentEncoder(schema, config, rngs=_content_rngs(rngs))
  return HEADS[config.em3_head](schema, config, rngs=rngs, catalog=catalog, sharding=sharding,
                                content=content)


def _content_rngs(rngs: nnx.Rngs) -> nnx.Rngs:
  """The content tower's own parameter stream, derived from the ranker's without drawing from
  it: the ranker then draws the keys its plain model draws for the same seed, so every ranker
  parameter of the plain model's shape starts equal to it (common random numbers: a paired
  comparison of EM3 with its ranker differs in the content tower, not in the ranker's draws)."""
  stream = rngs.params
  return nnx.Rngs(jax.random.fold_in(jax.random.fold_in(stream.key[...], stream.count[...]),
                                     CONTENT_STREAM))
