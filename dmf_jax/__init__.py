"""dmf_jax: Decoupled Multimodal Fusion (DMF) and EM3 for CTR prediction in JAX/Flax NNX.

The public API (imported on first use, so `import dmf_jax.exported` stays light):

  training     default_config, train_and_evaluate, evaluate_checkpoint, load_model
  data         prepare (build once, then open a dataset), BuiltDataset
  models       build_model, register_model, ModelConfig, CTRModel, DIN, DMF
  serving      Server (from_workdir, encode_user, score), export, ExportedScorer
  modules      EmbeddingTable, FeatureEmbedding, TargetAwareSimilarity,
               SimilarityBucketEmbedding, DinAttention, MultiHeadTargetAttention,
               EarlyFusionTargetAttention, DecoupledTargetAttention, SimTier, CMM, MLP,
               PredictionHead, FusionQFormer, AdaptableLinear
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
    "default_config": "dmf_jax.config",
    "train_and_evaluate": "dmf_jax.train_lib",
    "evaluate_checkpoint": "dmf_jax.train_lib",
    "load_model": "dmf_jax.train_lib",
    "prepare": "dmf_jax.data",
    "BuiltDataset": "dmf_jax.data_format",
    "build_model": "dmf_jax.models",
    "register_model": "dmf_jax.models",
    "ModelConfig": "dmf_jax.models",
    "CTRModel": "dmf_jax.models",
    "DIN": "dmf_jax.models",
    "DMF": "dmf_jax.models",
    "Server": "dmf_jax.serving",
    "export": "dmf_jax.serving",
    "ExportedScorer": "dmf_jax.exported",
    "EmbeddingTable": "dmf_jax.embedding",
    "FeatureEmbedding": "dmf_jax.embedding",
    "TargetAwareSimilarity": "dmf_jax.similarity",
    "SimilarityBucketEmbedding": "dmf_jax.similarity",
    "DinAttention": "dmf_jax.attention",
    "MultiHeadTargetAttention": "dmf_jax.attention",
    "EarlyFusionTargetAttention": "dmf_jax.attention",
    "DecoupledTargetAttention": "dmf_jax.attention",
    "SimTier": "dmf_jax.simtier",
    "CMM": "dmf_jax.fusion",
    "MLP": "dmf_jax.layers",
    "PredictionHead": "dmf_jax.layers",
    "FusionQFormer": "dmf_jax.qformer",
    "AdaptableLinear": "dmf_jax.lora",
    "FeatureSpec": "dmf_jax.schema",
    "ModalitySpec": "dmf_jax.schema",
    "FeatureSchema": "dmf_jax.schema",
    "ItemCatalog": "dmf_jax.catalog",
    "auc": "dmf_jax.metrics",
    "gauc": "dmf_jax.metrics",
    "logloss": "dmf_jax.metrics",
    "EvalAccumulator": "dmf_jax.metrics",
    "UserError": "dmf_jax.errors",
    "ConfigError": "dmf_jax.errors",
    "DataError": "dmf_jax.errors",
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
