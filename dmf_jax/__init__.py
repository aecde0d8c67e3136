"""dmf_jax: Decoupled Multimodal Fusion (DMF) and EM3 for CTR prediction in JAX/Flax NNX.

The public API (imported on first use, so `import dmf_jax.serve.exported` stays light):

  training     default_config, train_and_evaluate, evaluate_checkpoint, load_model
  data         prepare (build once, then open a dataset), BuiltDataset
  models       build_model, register_model, model_config, ModelConfig, CTRModel, Rows,
               DIN, DinConfig, DMF, DmfConfig, EM3Config
  serving      Server (from_workdir, encode_user, score), export, ExportedScorer
  modules      EmbeddingTable, FeatureEmbedding, TargetAwareSimilarity,
               SimilarityBucketEmbedding, DinAttention, MultiHeadTargetAttention,
               EarlyFusionTargetAttention, DecoupledTargetAttention, SimTier, CMM, MLP,
               CrossNetwork, PredictionHead, FusionQFormer, AdaptableLinear
  schema       FeatureSpec, ModalitySpec, FeatureSchema, ItemCatalog
  metrics      auc, gauc, logloss, EvalAccumulator
  errors       UserError, ConfigError, DataError

  import dmf_jax
  config = dmf_jax.default_config()
  config.dataset_config = "tiny"
  results = dmf_jax.train_and_evaluate(config, "/tmp/run")
  server = dmf_jax.Server.from_workdir("/tmp/run")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "default_config": "dmf_jax.train.config",
    "train_and_evaluate": "dmf_jax.train.loop",
    "evaluate_checkpoint": "dmf_jax.train.loop",
    "load_model": "dmf_jax.train.restore",
    "prepare": "dmf_jax.data",
    "BuiltDataset": "dmf_jax.data.format",
    "build_model": "dmf_jax.models.registry",
    "register_model": "dmf_jax.models.registry",
    "model_config": "dmf_jax.models.registry",
    "ModelConfig": "dmf_jax.models.base",
    "CTRModel": "dmf_jax.models.base",
    "Rows": "dmf_jax.core.rows",
    "DIN": "dmf_jax.models.din",
    "DinConfig": "dmf_jax.models.din",
    "DMF": "dmf_jax.models.dmf",
    "DmfConfig": "dmf_jax.models.dmf",
    "EM3Config": "dmf_jax.models.em3",
    "Server": "dmf_jax.serve.server",
    "export": "dmf_jax.serve.export",
    "ExportedScorer": "dmf_jax.serve.exported",
    "EmbeddingTable": "dmf_jax.nn.embedding",
    "FeatureEmbedding": "dmf_jax.nn.embedding",
    "TargetAwareSimilarity": "dmf_jax.nn.similarity",
    "SimilarityBucketEmbedding": "dmf_jax.nn.similarity",
    "DinAttention": "dmf_jax.nn.attention",
    "MultiHeadTargetAttention": "dmf_jax.nn.attention",
    "EarlyFusionTargetAttention": "dmf_jax.nn.attention",
    "DecoupledTargetAttention": "dmf_jax.nn.attention",
    "SimTier": "dmf_jax.nn.simtier",
    "CMM": "dmf_jax.nn.cmm",
    "MLP": "dmf_jax.nn.layers",
    "CrossNetwork": "dmf_jax.nn.layers",
    "PredictionHead": "dmf_jax.nn.layers",
    "FusionQFormer": "dmf_jax.nn.qformer",
    "AdaptableLinear": "dmf_jax.nn.lora",
    "FeatureSpec": "dmf_jax.core.schema",
    "ModalitySpec": "dmf_jax.core.schema",
    "FeatureSchema": "dmf_jax.core.schema",
    "ItemCatalog": "dmf_jax.core.catalog",
    "auc": "dmf_jax.train.metrics",
    "gauc": "dmf_jax.train.metrics",
    "logloss": "dmf_jax.train.metrics",
    "EvalAccumulator": "dmf_jax.train.metrics",
    "UserError": "dmf_jax.core.errors",
    "ConfigError": "dmf_jax.core.errors",
    "DataError": "dmf_jax.core.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
  if name in _API:
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'dmf_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_API))
