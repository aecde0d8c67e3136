"""Serving: encode a user once, score N candidates against it; jit-compiled and exportable.

  encode_user, score_candidates = make_serving_fns(graphdef)
  user_state = encode_user(params, user_features)          # once per request
  logits = score_candidates(params, user_state, item_ids)  # [N]

`params` is the model's whole state (`nnx.state(model)`: trainable Params plus the frozen
catalog and batch statistics). `Server` wraps both with request validation and pads N up to a
few static bucket sizes, so requests of any size reuse a handful of compiled programs.
`export(server, path)` serializes both functions with `jax.export` (weights alongside, in the
same file); `dmf_jax.exported.ExportedScorer` runs them in a process without the model code.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from dmf_jax.models import CTRModel

DEFAULT_BUCKETS = (16, 128, 1024, 4096)
FORMAT_VERSION = 1


def make_serving_fns(graphdef: nnx.GraphDef):
  """(encode_user, score_candidates), both jitted pure functions of the model state."""

  @jax.jit
  def encode_user(params, user):
    return nnx.merge(graphdef, params).encode_user(user)

  @jax.jit
  def score_candidates(params, user_state, item_ids):
    return nnx.merge(graphdef, params).score_candidates(user_state, item_ids)

  return encode_user, score_candidates


class Server:
  """Request-level serving of a trained model (inference mode).

  `encode_user(user)` takes user/<field> values, the behaviour item ids (any length: the last
  `seq_len` are kept, most recent last) and returns the user state; `score(user_state, ids)`
  returns float32 logits [N], with N padded to the smallest bucket >= N (requests larger than
  the largest bucket run in chunks of it). N = 0 gives an empty array; an empty history is
  valid (the attention and SimTier parts are zero). Out-of-range ids raise a ValueError.
  """

  def __init__(self, model: CTRModel, buckets: Sequence[int] = DEFAULT_BUCKETS):
    if not buckets or any(b < 1 for b in buckets):
      raise ValueError(f"bucket sizes must be positive, got {buckets}")
    self.schema = model.schema
    self.buckets = tuple(sorted(buckets))
    self.graphdef, self.params = nnx.split(model)
    self._encode, self._score = make_serving_fns(self.graphdef)

  @classmethod
  def from_train_state(cls, graphdef, state, buckets: Sequence[int] = DEFAULT_BUCKETS):
    """For a model trained without a mesh; for mesh-trained runs use train_lib.serving_model."""
    return cls(nnx.merge(graphdef, state.params, state.rest), buckets)

  def user_features(self, user: Mapping) -> dict[str, np.ndarray]:
    """Validated, padded request features: user/<field>, hist_item_id [L], hist_mask [L]."""
    out = {}
    for spec in self.schema.user_features:
      key = f"user/{spec.name}"
      if key not in user:
        raise KeyError(f"user features miss {key!r}; expected {self.schema.batch_keys()[:-5]}")
      value = np.asarray(user[key], np.int32)
      if value.shape != ((spec.max_values,) if spec.multi_valued else ()):
        raise ValueError(f"{key}: expected shape {(spec.max_values,) if spec.multi_valued else ()},"
                         f" got {value.shape}")
      low = -1 if spec.multi_valued else 0
      if np.any(value < low) or np.any(value >= spec.vocab_size):
        raise ValueError(f"{key}: value out of range [0, {spec.vocab_size})")
      out[key] = value
    history = np.asarray(user.get("hist_item_id", []), np.int64).reshape(-1)
    self._check_items("hist_item_id", history)
    seq_len = self.schema.seq_len
    history = history[-seq_len:]
    padded = np.zeros(seq_len, np.int32)
    padded[:len(history)] = history
    out["hist_item_id"] = padded
    out["hist_mask"] = np.arange(seq_len) < len(history)
    return out

  def _check_items(self, name: str, ids: np.ndarray) -> None:
    bad = (ids < 0) | (ids >= self.schema.num_items)
    if bad.any():
      raise ValueError(f"{name}: item id {int(ids[bad][0])} is out of range "
                       f"[0, {self.schema.num_items})")

  def encode_user(self, user: Mapping):
    return self._encode(self.params, self.user_features(user))

  def bucket(self, n: int) -> int:
    return next((b for b in self.buckets if b >= n), self.buckets[-1])

  def score(self, user_state, item_ids) -> np.ndarray:
    ids = np.asarray(item_ids, np.int64).reshape(-1)
    self._check_items("item_ids", ids)
    out = []
    for start in range(0, len(ids), self.buckets[-1]):
      chunk = ids[start:start + self.buckets[-1]]
      padded = np.zeros(self.bucket(len(chunk)), np.int32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._score(self.params, user_state, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export(server: Server, path: str, buckets: Sequence[int] | None = None) -> None:
  """Writes one zip file: the serialized encode function, one score function per bucket size,
  the weights (.npz, flat leaves) and a JSON manifest of the request layout."""
  leaves, treedef = jax.tree.flatten(server.params)
  user = server.user_features({f"user/{f.name}": np.zeros(f.max_values, np.int32)
                               if f.multi_valued else 0 for f in server.schema.user_features})
  state_tree = jax.tree.structure(jax.eval_shape(server._encode, server.params, user))

  def encode_flat(flat_params, user_features):
    state = server._encode(jax.tree.unflatten(treedef, flat_params), user_features)
    return jax.tree.leaves(state)

  def score_flat(flat_params, flat_state, item_ids):
    params = jax.tree.unflatten(treedef, flat_params)
    return server._score(params, jax.tree.unflatten(state_tree, flat_state), item_ids)

  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  params_spec = [spec(x) for x in leaves]
  user_spec = {k: spec(v) for k, v in user.items()}
  encode_exp = jax.export.export(jax.jit(encode_flat))(params_spec, user_spec)
  state_spec = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in encode_exp.out_avals]
  files = {"encode_user.bin": encode_exp.serialize()}
  sizes = tuple(buckets or server.buckets)
  for size in sizes:
    exp = jax.export.export(jax.jit(score_flat))(
        params_spec, state_spec, jax.ShapeDtypeStruct((size,), np.int32))
    files[f"score_candidates_{size}.bin"] = exp.serialize()
  weights = io.BytesIO()
  np.savez(weights, *[np.asarray(x) for x in leaves])
  files["weights.npz"] = weights.getvalue()
  manifest = {
      "format_version": FORMAT_VERSION,
      "buckets": list(sizes),
      "num_items": server.schema.num_items,
      "seq_len": server.schema.seq_len,
      "user_features": {k: list(np.shape(v)) for k, v in user.items() if k.startswith("user/")},
      "num_weights": len(leaves),
  }
  files["manifest.json"] = json.dumps(manifest, indent=2).encode()
  with zipfile.ZipFile(path, "w") as zf:
    for name, payload in files.items():
      zf.writestr(name, payload)
