"""dmf_jax: Decoupled Multimodal Fusion (DMF) and EM3 for CTR prediction in JAX/Flax NNX.

Modules (each importable on its own):
  schema      FeatureSpec / ModalitySpec / FeatureSchema: declared features and batch layout
  catalog     ItemCatalog: per-item side fields and frozen multimodal vectors
  embedding   EmbeddingTable, FeatureEmbedding (OOV row, pooling, row sharding)
  similarity  cosine similarity, bucketize, TargetAwareSimilarity, SimilarityBucketEmbedding
  attention   DinAttention, MultiHeadTargetAttention, EarlyFusionTargetAttention,
              DecoupledTargetAttention (+ DTAUserState for serving)
  simtier     simtier_histogram, SimTier
  fusion      CMM
  layers      Dice, MLP, PredictionHead
  models      ModelConfig, build_model, the registry (din, dmf, dmf_early_fusion, ...)
  losses      bce_with_logits
  training    TrainState, pure train / predict steps
  metrics     auc, gauc, logloss, EvalAccumulator
"""

__version__ = "0.1.0"
