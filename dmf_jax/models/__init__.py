"""CTR models: base (CTRModel), one file per family with its config, and the registry."""
