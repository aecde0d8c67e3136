"""Serving: encode a user once, score N candidates against it; jit-compiled and exportable.

  encode_user, score_candidates = make_serving_fns(graphdef)
  user_state = encode_user(params, user_features)          # once per request
  logits = score_candidates(params, user_state, item_ids)  # [N]

`params` is the model's whole state (`nnx.state(model)`: trainable Params plus the frozen
catalog and batch statistics). `Server` wraps both with request validation and pads N up to a
few static candidate sizes, so requests of any size reuse a handful of compiled programs.
`export(server, path)` serializes both functions with `jax.export` (weights alongside, in the
same file); `dmf_jax.serve.exported.ExportedScorer` runs them in a process without the model code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dmf_jax.core import hashing
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.nn import precision
from dmf_jax.serve.request import (DEFAULT_CANDIDATE_SIZES, RequestLayout, check_candidate_sizes,
                                   check_user_state, score_distinct)
from dmf_jax.train import restore


def make_serving_fns(graphdef: nnx.GraphDef):
  """(encode_user, score_candidates), both jitted pure functions of the model state."""

  def model(params):  # a working copy in the model's compute dtype (`nn.precision`)
    model = nnx.merge(graphdef, params)
    return precision.to_compute_dtype(model, model.config.compute_dtype)

  @jax.jit
  def encode_user(params, user):
    """One user's features (user/<field>, hist_item_id [L], hist_mask [L]) -> its state."""
    batch = {k: jnp.asarray(v)[None] for k, v in user.items()}  # a batch of one user
    return model(params).encode_user(batch)

  @jax.jit
  def score_candidates(params, user_state, item_ids):
    """item_ids int [N] -> logits [N]."""
    return model(params).score(user_state, item_ids[None])[0]

  return encode_user, score_candidates


class Server:
  """Request-level serving of a trained model (inference mode).

  `encode_user(user)` takes user/<field> values, the behaviour item ids (any length: the last
  `seq_len` are kept, most recent last) and returns the user state; `score(user_state, ids)`
  returns float32 logits [N], with N padded to the smallest candidate size >= N (requests larger
  than the largest size run in chunks of it; a repeated id is scored once). N = 0 gives an
  empty array; an empty history is valid (the attention and SimTier parts are zero). Requests
  are checked by `serve.request.RequestLayout` (the same checks as `ExportedScorer`):
  out-of-range, fractional or wrongly shaped ids raise a ValueError naming the field.
  """

  def __init__(self, model: nnx.Module,
               candidate_sizes: Sequence[int] = DEFAULT_CANDIDATE_SIZES):
    """`model`: a CTR model (`schema`, `encode_user(batch)`, `score(state, candidates)`)."""
    self.schema = model.schema
    self.candidate_sizes = check_candidate_sizes(candidate_sizes)
    self.step = None  # the checkpoint step, when served from a workdir
    # Each item's raw id (`dmf_jax.core.hashing`) where the catalog records them (BYOD builds;
    # from_workdir), else None: then add_items cannot tell a known item from a new one.
    self.raw_ids: np.ndarray | None = None
    self._set_model(model)

  def _set_model(self, model: nnx.Module) -> None:
    # Item ids index the model's catalog: the trained items and any added since.
    self.layout = dataclasses.replace(RequestLayout.from_schema(model.schema),
                                      num_items=model.catalog.num_items)
    self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # A bfloat16 model serves from Params cast once, here (the serving functions' own cast is
    # then a no-op: no per-request conversion of whole embedding tables).
    self.params = nnx.merge_state(
        precision.cast_params(params, model.config.compute_dtype), rest)
    # The jitted pure functions of (params, ...) (`make_serving_fns`): for export and timing.
    self.encode_fn, self.score_fn = make_serving_fns(self.graphdef)

  @property
  def num_items(self) -> int:
    """Items that can be scored (and appear in histories): ids [0, num_items)."""
    return self.layout.num_items

  def add_items(self, side: Mapping[str, Sequence] | None = None,
                vectors: Mapping[str, np.ndarray] | None = None,
                raw_ids: Sequence | None = None,
                numeric: Mapping[str, Sequence] | None = None) -> np.ndarray:
    """Adds n items unseen in training; returns their ids int64 [n] = [num_items, num_items + n).

    side: every item side field of the schema, n values each (vocabulary fields: ids in
      [0, vocab), multi-valued [n, M] padded with -1; hashed fields: raw values, strings or
      integers). vectors: every modality, float [n, D_k] (an all-zero row: missing).
    numeric: every item numeric field, n floats (NaN: missing).
    raw_ids: the items' raw ids (strings or integers), needed when item ids are hashed (the
      id embedding is then the hashed rows' trained one; otherwise the new items share the
      id table's out-of-vocabulary row). A raw id the catalog already holds (where it records
      raw ids: `self.raw_ids`), or one given twice, is refused with a `ValueError` naming it
      and its id: an item is added once, and a known item is scored by its id. Items are then scored from their side fields and
      vectors: the target-aware similarities and SimTier treat them like trained items.
    Recompiles on the next request; export afterwards to ship them (`export`).
    """
    schema = self.schema
    side = dict(side or {})
    for spec in schema.item_features:
      if spec.hashed and spec.name in side:
        side[spec.name] = hashing.raw_ids(side[spec.name])
    if raw_ids is not None:
      given, raw_ids = list(raw_ids), hashing.raw_ids(raw_ids)
      self._check_new_raw_ids(given, raw_ids)
    elif schema.item_id_spec.hashed:
      raise ValueError("add_items: the schema hashes item ids; give the new items' raw_ids")
    new = ItemCatalog({k: np.asarray(v) for k, v in side.items()},
                      {k: np.asarray(v) for k, v in (vectors or {}).items()}, raw_ids,
                      {k: np.asarray(v, np.float32) for k, v in (numeric or {}).items()})
    model = nnx.merge(self.graphdef, self.params)
    start = model.catalog.num_items
    model.catalog = model.catalog.extended(schema, new)
    self._set_model(model)
    if self.raw_ids is not None:
      self.raw_ids = (np.concatenate([self.raw_ids, raw_ids]) if raw_ids is not None else None)
    return np.arange(start, model.catalog.num_items, dtype=np.int64)

  def _check_new_raw_ids(self, given: list, raw: np.ndarray) -> None:
    _, first, counts = np.unique(raw, return_index=True, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f"add_items: raw id {given[first[counts > 1][0]]!r} is given twice")
    if self.raw_ids is not None:
      known = np.flatnonzero(np.isin(raw, self.raw_ids))
      if len(known):
        at = int(np.flatnonzero(self.raw_ids == raw[known[0]])[0])
        raise ValueError(f"add_items: raw id {given[known[0]]!r} is already in the catalog "
                         f"(item id {at}): score it by that id; add only new items")

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   candidate_sizes: Sequence[int] = DEFAULT_CANDIDATE_SIZES) -> "Server":
    """Serves the best (or a given) checkpoint of a training workdir, trained on a mesh or
    not (see `dmf_jax.train.restore.restore_run`)."""
    run = restore.restore_run(workdir, step)
    server = cls(run.model(), candidate_sizes)
    server.step, server.raw_ids = run.step, run.dataset.catalog.raw_ids
    return server

  @classmethod
  def from_train_state(cls, graphdef, state,
                       candidate_sizes: Sequence[int] = DEFAULT_CANDIDATE_SIZES):
    """For a graphdef built without mesh axes; for a workdir's run use `from_workdir`. Serves
    the state's `eval_params` (the parameters' moving average, when kept)."""
    return cls(nnx.merge(graphdef, state.eval_params, state.rest), candidate_sizes)

  def user_features(self, user: Mapping) -> dict[str, np.ndarray]:
    """Validated, padded request features: user/<field>, hist_item_id [L], hist_mask [L]."""
    return self.layout.user_features(user)

  def encode_user(self, user: Mapping):
    return self.encode_features(self.user_features(user))

  def encode_features(self, features: Mapping):
    """The user state of already prepared features (`user_features`), unchecked."""
    return self.encode_fn(self.params, features)

  def score(self, user_state, item_ids) -> np.ndarray:
    check_user_state(user_state)
    return self.score_ids(user_state, self.layout.item_ids("item_ids", item_ids))

  def score_ids(self, user_state, ids: np.ndarray) -> np.ndarray:
    """Logits of already checked ids (`layout.item_ids`): each distinct id scored once, in
    chunks of the candidate sizes (`score_distinct`)."""
    return score_distinct(ids, lambda padded: self.score_fn(self.params, user_state, padded),
                          self.candidate_sizes)
