"""Robustness to missing modalities: a finished run's best checkpoint evaluated on test with
a modality missing for a fraction of the items.

For each modality k of the run and each fraction p, the items of `dropped_items(V, p, seed, k)`
(a seeded random round(p * V) of them; the sets are nested, the 25% set inside the 50% set)
lose their k vectors at evaluation time (`catalog.without_vectors`: vectors zeroed, the
'<k>_missing' flag set where the dataset has one, the trained calibration kept). The masks
depend on the run's seed and the modality only, so the models of one seed see the same items
missing (paired comparisons) and the mean over seeds averages over masks too.

`evaluate_missing_modalities(workdir)` writes `workdir/robustness.json`:
  {"step": best step, "fractions": [0.0, 0.25, ...],
   "modalities": {k: {"0.25": {"auc", "gauc", "logloss", ...}, ...}}}
(fraction 0.0 is the unchanged test evaluation, as in results.json) and reads it back on a
later call with the same fractions.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence

import jax
import numpy as np
from etils import epath

from dmf_jax.core.catalog import without_vectors
from dmf_jax.train import experiment
from dmf_jax.train import loop, restore
from dmf_jax.train.checkpointing import CheckpointManager, catalog_of, with_catalog

FRACTIONS = (0.25, 0.5, 1.0)
RESULT_FILE = "robustness.json"


def dropped_items(num_items: int, fraction: float, seed: int, modality: str) -> np.ndarray:
  """bool [num_items]: round(fraction * num_items) items, the first of a permutation seeded by
  (seed, modality), so that a larger fraction's set holds a smaller one's."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"missing fraction {fraction} is not in [0, 1]")
  order = np.random.default_rng([seed, zlib.crc32(modality.encode())]).permutation(num_items)
  out = np.zeros(num_items, bool)
  out[order[:round(fraction * num_items)]] = True
  return out


def flag_field(schema, modality: str) -> str | None:
  """The dataset's '<modality>_missing' item side field, if it has one."""
  name = f"{modality}_missing"
  return name if name in {f.name for f in schema.item_features} else None


def evaluate_missing_modalities(workdir, fractions: Sequence[float] = FRACTIONS) -> dict:
  """See the module docstring. A run without modalities gets {"modalities": {}}."""
  workdir = epath.Path(workdir).expanduser()
  fractions = sorted({0.0, *(float(p) for p in fractions)})
  for p in fractions:
    dropped_items(1, p, 0, "")  # range check before anything is built
  path = workdir / RESULT_FILE
  if path.exists():
    cached = json.loads(path.read_text())
    if cached.get("fractions") == fractions:
      return cached
  config = restore.read_run_config(workdir)
  exp = experiment.build_experiment(config, dataset=restore.open_run_dataset(workdir, config))
  schema = exp.dataset.schema
  result = {"step": None, "fractions": fractions, "modalities": {}}
  if schema.modality_names:
    ckpt = CheckpointManager(workdir / "checkpoints", every_steps=config.checkpoint_every_steps,
                             keep=config.keep_checkpoints,
                             catalog_fingerprint=exp.catalog_fingerprint)
    step = ckpt.best_or_latest()
    live = catalog_of(exp.state)
    state = ckpt.restore(step, exp.partitioner.abstract_state(exp.shardings, exp.state),
                         catalog=live).state
    ckpt.close()
    predict = exp.partitioner.predict_step(exp.graphdef, exp.shardings)
    result["step"] = step
    for name in schema.modality_names:
      per_fraction = {}
      for p in fractions:
        missing = dropped_items(schema.num_items, p, int(config.seed), name)
        tables = without_vectors(live, name, missing, flag_field(schema, name))
        per_fraction[str(p)] = loop.evaluate_split(exp, predict, with_catalog(state, tables),
                                                   "test")
      result["modalities"][name] = per_fraction
  if jax.process_index() == 0:
    loop.write_json(path, result)
  return result
