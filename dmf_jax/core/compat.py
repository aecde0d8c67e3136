"""Compatibility with what earlier versions of this package wrote, in one place.

Each shim keeps something a user already has working: a recorded run that must still resume,
evaluate and serve, or a checkpoint that must still load. Each says when it can go: when no
run or checkpoint written before that change needs to be read any more (a major version that
says so in its release notes).
"""

from __future__ import annotations

from collections.abc import Iterable

# Model fields earlier versions had, accepted and ignored so that their runs still evaluate,
# serve and resume (`models.registry.model_config`, `train.runs`):
#   item_table_max_items: one item-token path now chooses the rows by shape (`core.rows`).
RETIRED_MODEL_FIELDS = ("item_table_max_items",)

# Config fields added after runs were recorded ({dotted field: the value that means the old
# behaviour}): at that value a field is left out of a run's identity (`train.runs`), so an
# older run resumes. A field added to an existing model family goes here; a new family needs
# no entry (a run's identity is its own family's fields).
ADDED_FIELDS = {"init_from": "", "init_from_optimizer": False,
                "model_config.vector_dtype": "float32", "optimizer.sparse_min_rows": 0,
                "model_config.head": "mlp", "model_config.cross_layers": 3,
                "model_config.cross_rank": 0, "model_config.bst_dim": 32,
                "model_config.bst_heads": 2, "model_config.bst_layers": 1,
                "model_config.bst_ffn_dim": 64, "model_config.dien_aux_weight": 1.0,
                "model_config.compute_dtype": "float32",
                "model_config.lookup_mode": "auto", "optimizer.content_learning_rate": None,
                "optimizer.ema_decay": 0.0}


# The order in which `train.tuning` draws the model knobs that searches recorded before the
# families owned their search spaces drew (one flat list then): those come first, in this
# order, so a recorded (model, trials, seed) samples the same trials; other knobs follow in
# their family's order. Can go when no recorded search needs to be re-run or resumed.
TUNING_DRAW_ORDER = ("dropout", "mlp_hidden", "din_hidden", "num_heads", "head_dim",
                     "num_tiers", "bst_dim", "bst_layers", "modality_token_dim")


# Flags a binary renamed ({binary: {old name: new name}}), kept as aliases so that older
# command lines still run: `experiments.export --buckets` (the serving candidate sizes).
RENAMED_FLAGS = {"export": {"buckets": "candidate_sizes"}}


def checkpoint_holds_catalog(saved_keys: Iterable[str], catalog_key: str) -> bool:
  """Whether a checkpoint has the older layout with the frozen catalog inside the saved state
  (`rest/<catalog_key>/...`); current checkpoints keep only its fingerprint
  (`train.checkpointing`), and the catalog comes from the dataset build."""
  return any(k.startswith(f"rest/{catalog_key}/") for k in saved_keys)
