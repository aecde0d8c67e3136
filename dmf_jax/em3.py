"""EM3: the multimodal fusion module trained end to end with the ranking model (DESIGN.md §4).

Each item token becomes [e ; c]: the ID-side embedding e and a content embedding c from a
Fusion-Q-Former over the item's modality vectors. The target side runs the Q-Former fully
trained; the behaviour sequence (L items per example) runs the same weights frozen plus LoRA
adapters (`lora_rank` 0: fully trained there too). The tokens feed a DIN or a DMF head
(`em3_head`). Training adds a symmetric Content-ID InfoNCE between c and the item-id embedding
of the batch's target items (separate linear heads, L2-normalized; in-batch negatives, or
`contrastive_num_negatives` items sampled from the table as well).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax import lora
from dmf_jax.losses import bce_with_logits, symmetric_info_nce
from dmf_jax.model_base import CTRModel
from dmf_jax.models import DIN, DMF
from dmf_jax.qformer import FusionQFormer
from dmf_jax.sharding import NO_SHARDING
from dmf_jax.similarity import l2_normalize


class _EM3(CTRModel):
  """The content side shared by both heads; mixed in before DIN or DMF."""

  def _build_content(self, schema, config, rngs):
    if not schema.modalities:
      raise ValueError("model 'em3' needs at least one modality in the schema")
    self.fusion = FusionQFormer(
        [m.dim for m in schema.modalities], width=config.qformer_width,
        num_queries=config.qformer_queries, num_layers=config.qformer_layers,
        num_heads=config.qformer_heads, dropout=config.qformer_dropout,
        modality_dropout=config.modality_dropout, out_dim=config.content_dim, rngs=rngs)
    self.lora_paths = tuple(lora.add_lora(
        self.fusion, rank=config.lora_rank, alpha=config.lora_alpha,
        include=config.lora_layers, rngs=rngs) if config.lora_rank else ())
    self.content_head = nnx.Linear(config.content_dim, config.contrastive_dim, rngs=rngs)
    self.id_head = nnx.Linear(schema.item_id_dim, config.contrastive_dim, rngs=rngs)

  @property
  def item_token_dim(self) -> int:
    return self.schema.item_dim + self.config.content_dim

  def content(self, item_ids, *, sequence: bool = False, train=False, rngs=None):
    """Content embeddings [..., content_dim]; sequence=True: the behaviour side (LoRA).

    Small catalogs without active dropout: the Q-Former runs once over all items (a table
    [num_items, content_dim]) and the ids gather from it — the same values and gradients as
    running it per position, B * L / num_items times fewer Q-Former evaluations.
    """
    adapted = sequence and self.config.lora_rank > 0
    cfg = self.config
    dropout = train and (cfg.modality_dropout > 0 or cfg.qformer_dropout > 0)
    if not dropout and self.uses_item_table:
      vectors = [self.catalog.all_vectors(name) for name in self.schema.modality_names]
      return self.catalog.rows(self.fusion(vectors, adapted=adapted), item_ids)
    return self.fusion(self.modality_vectors(item_ids), adapted=adapted, train=train, rngs=rngs)

  def embed(self, batch, *, train=False, rngs=None):
    x = super().embed(batch)
    x["item_table"] = x["behavior_rows"] = None  # the tokens below differ by side (LoRA)
    x["target"] = jnp.concatenate(
        [x["target"], self.content(batch["item_id"], train=train, rngs=rngs)], -1)
    x["behaviors"] = jnp.concatenate(
        [x["behaviors"],
         self.content(batch["hist_item_id"], sequence=True, train=train, rngs=rngs)], -1)
    return x

  def contrastive_loss(self, item_ids, *, train=False, rngs=None) -> jax.Array:
    """Symmetric Content-ID InfoNCE over the items item_ids [B] (scalar)."""
    cfg = self.config

    def embeddings(ids):
      content = l2_normalize(self.content_head(self.content(ids, train=train, rngs=rngs)))
      return content, l2_normalize(self.id_head(self.items.item_id(ids)))

    content, ids = embeddings(item_ids)
    if cfg.contrastive_negatives == "in_batch":
      return symmetric_info_nce(content, ids, item_ids, cfg.contrastive_temperature)
    if rngs is None:
      raise ValueError("em3: sampled contrastive negatives need `rngs` with a 'sample' stream")
    negatives = jax.random.randint(rngs.sample(), (cfg.contrastive_num_negatives,), 0,
                                   self.schema.num_items)
    neg_content, neg_ids = embeddings(negatives)
    return symmetric_info_nce(content, ids, item_ids, cfg.contrastive_temperature,
                              neg_content, neg_ids, negatives)

  def training_loss(self, batch, *, phase="main", rngs=None):
    logits = self(batch, train=True, rngs=rngs)
    ctr = bce_with_logits(logits, batch["label"], batch.get("weight"))
    if self.config.contrastive_weight == 0:
      return ctr, {"ctr_loss": ctr}
    contrastive = self.contrastive_loss(batch["item_id"], train=True, rngs=rngs)
    return ctr + self.config.contrastive_weight * contrastive, {
        "ctr_loss": ctr, "contrastive_loss": contrastive}

  # Serving: the generic path (the DMF decomposition does not know the content tokens).
  encode_user = CTRModel.encode_user
  score_candidates = CTRModel.score_candidates


class EM3Din(_EM3, DIN):
  """EM3 tokens [e ; c] through DIN attention."""

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    DIN.__init__(self, schema, config, rngs=rngs, catalog=catalog, sharding=sharding)
    self._build_content(schema, config, rngs)


class EM3Dmf(_EM3, DMF):
  """EM3 tokens [e ; c] through DMF (DTA on the tokens with frozen-similarity buckets, SimTier,
  CMM)."""

  def __init__(self, schema, config, *, rngs, catalog=None, sharding=NO_SHARDING):
    DMF.__init__(self, schema, config, rngs=rngs, catalog=catalog, sharding=sharding)
    self._build_content(schema, config, rngs)


def build_em3(schema, config, *, rngs, catalog=None, sharding=NO_SHARDING) -> CTRModel:
  """The registry's `em3`: EM3Din or EM3Dmf as `config.em3_head` says."""
  cls = EM3Din if config.em3_head == "din" else EM3Dmf
  return cls(schema, config, rngs=rngs, catalog=catalog, sharding=sharding)
