"""Warm starts: a run's initial state from another run's best checkpoint (the daily-update
flow: a newer build with more users and items, `config.init_from`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dmf_jax.core import hashing
from dmf_jax.train import config as config_lib
from dmf_jax.train import steps as training
from dmf_jax.train.restore import restore_run


def warm_start(exp, source_workdir: str, *, optimizer_state: bool, log=print):
  """The initial state of `exp` (a `train.experiment.Experiment`) with the weights (and
  optionally the optimizer state) of another run's best checkpoint: a newer build with more
  users/items.

  Arrays are matched by their path in the state. Same shape: copied. An embedding table whose
  vocabulary grew (or shrank) keeps the rows of the ids both builds know and its OOV row;
  new ids keep this run's initialisation. Item rows are matched by raw id where both catalogs
  hold raw ids (BYOD builds do), other fields by index (ids that a later build only appends,
  as generated data and append-only id maps do; BYOD sorts its user and side-field
  vocabularies, so hash those that grow).
  Hashed tables have a fixed size and are copied whole. Any other shape change (other model
  dimensions) raises a `ConfigError` naming the arrays. With optimizer_state, the optimizer
  state (moments, step count: the learning-rate schedule continues) is carried the same way.
  """
  source = restore_run(source_workdir)
  if source.config.model != exp.config.model:
    raise config_lib.ConfigError(
        f"invalid config:\n  - init_from: {source_workdir} trained model "
        f"{source.config.model!r}, this run trains {exp.config.model!r}")
  schema, old_schema = exp.dataset.schema, source.dataset.schema
  specs = {("items", "item_id", "table", "embedding"): (schema.item_id_spec,
                                                       old_schema.item_id_spec)}
  for group, attr in (("item_features", "items"), ("user_features", "users")):
    old = {f.name: f for f in getattr(old_schema, group)}
    for f in getattr(schema, group):
      if f.name in old:
        specs[(attr, "fields", f.name, "table", "embedding")] = (f, old[f.name])
  item_map = None  # new item row -> old item row (-1: new), by raw id
  new_raw, old_raw = exp.dataset.catalog.raw_ids, source.dataset.catalog.raw_ids
  if new_raw is not None and old_raw is not None:
    item_map = hashing.match_raw_ids(new_raw, old_raw)

  def row_map(table_path, new_spec, old_spec):
    if table_path[:2] == ("items", "item_id") and item_map is not None:
      return item_map
    known = min(new_spec.vocab_size, old_spec.vocab_size)
    return np.where(np.arange(new_spec.vocab_size) < known, np.arange(new_spec.vocab_size), -1)

  old_leaves = {training.param_path_names(k): v
                for k, v in jax.tree_util.tree_leaves_with_path(source.state)}
  problems, grown = [], []

  def carry(group, keypath, new):
    path = (group, *training.param_path_names(keypath))
    old = old_leaves.get(path)
    if old is None:
      return new
    old = np.asarray(old)
    if old.shape == new.shape:
      return old.astype(new.dtype)
    table = next((t for t in specs if path[-len(t):] == t), None)
    if table is None or old.ndim != 2 or old.shape[1] != new.shape[1] or (
        specs[table][0].hashed or specs[table][1].hashed):
      problems.append(f"{'/'.join(path)}: {old.shape} in {source_workdir}, {new.shape} here")
      return new
    new_spec, old_spec = specs[table]
    mapping = row_map(table, new_spec, old_spec)
    out = np.array(new)
    have = mapping >= 0
    out[:new_spec.vocab_size][have] = old[mapping[have]]
    out[new_spec.vocab_size] = old[old_spec.vocab_size]  # the OOV row
    grown.append(f"{'/'.join(path)}: {int(have.sum())} of {new_spec.vocab_size} rows carried")
    return out.astype(new.dtype)

  state = exp.state
  params = jax.tree_util.tree_map_with_path(functools.partial(carry, "params"),
                                            jax.device_get(state.params))
  opt_state = state.opt_state
  if optimizer_state:
    opt_state = jax.tree_util.tree_map_with_path(functools.partial(carry, "opt_state"),
                                                 jax.device_get(state.opt_state))
  if problems:
    raise config_lib.ConfigError(
        f"invalid config:\n  - init_from: {source_workdir}'s state does not fit this model "
        f"(other dimensions?):\n    " + "\n    ".join(problems[:8]))
  log(f"initialised from {source_workdir} (step {source.step}): weights"
      + (" and optimizer state" if optimizer_state else "")
      + ("; " + "; ".join(sorted(set(grown))) if grown else ""))
  params = jax.device_put(params, exp.shardings.params)
  state = dataclasses.replace(
      state, params=params, opt_state=jax.device_put(opt_state, exp.shardings.opt_state))
  if isinstance(state, training.AveragedTrainState):
    # The moving average restarts with this run's steps (its first step replaces it whole).
    state = dataclasses.replace(state, ema=jax.tree.map(jnp.copy, params))
  return state
