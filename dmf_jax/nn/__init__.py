"""Neural-network modules: embeddings, similarity, attention, SimTier, CMM, layers, Q-Former, LoRA, losses."""
