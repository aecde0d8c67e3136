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
from dmf_jax.serve_request import DEFAULT_BUCKETS, RequestLayout, check_buckets, chunks

FORMAT_VERSION = 2  # 2: the manifest holds the request layout (vocabularies)


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
  valid (the attention and SimTier parts are zero). Requests are checked by
  `serve_request.RequestLayout` (the same checks as `ExportedScorer`): out-of-range,
  fractional or wrongly shaped ids raise a ValueError naming the field.
  """

  def __init__(self, model: CTRModel, buckets: Sequence[int] = DEFAULT_BUCKETS):
    self.schema = model.schema
    self.layout = RequestLayout.from_schema(model.schema)
    self.buckets = check_buckets(buckets)
    self.graphdef, self.params = nnx.split(model)
    self._encode, self._score = make_serving_fns(self.graphdef)
    self.step = None  # the checkpoint step, when served from a workdir

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None,
                   buckets: Sequence[int] = DEFAULT_BUCKETS) -> "Server":
    """Serves the best (or a given) checkpoint of a training workdir, trained on a mesh or
    not (see `train_lib.load_model`)."""
    from dmf_jax import train_lib  # pylint: disable=g-import-not-at-top  (the training layer)

    model, _, step = train_lib.load_model(workdir, step)
    server = cls(model, buckets)
    server.step = step
    return server

  @classmethod
  def from_train_state(cls, graphdef, state, buckets: Sequence[int] = DEFAULT_BUCKETS):
    """For a graphdef built without mesh axes; for a workdir's run use `from_workdir`."""
    return cls(nnx.merge(graphdef, state.params, state.rest), buckets)

  def user_features(self, user: Mapping) -> dict[str, np.ndarray]:
    """Validated, padded request features: user/<field>, hist_item_id [L], hist_mask [L]."""
    return self.layout.user_features(user)

  def encode_user(self, user: Mapping):
    return self.encode_features(self.user_features(user))

  def encode_features(self, features: Mapping):
    """The user state of already prepared features (`user_features`), unchecked."""
    return self._encode(self.params, features)

  def bucket(self, n: int) -> int:
    return next((b for b in self.buckets if b >= n), self.buckets[-1])

  def score(self, user_state, item_ids) -> np.ndarray:
    return self.score_ids(user_state, self.layout.item_ids("item_ids", item_ids))

  def score_ids(self, user_state, ids: np.ndarray) -> np.ndarray:
    """Logits of already checked ids (`layout.item_ids`), in bucket-sized chunks."""
    out = [np.asarray(self._score(self.params, user_state, padded))[:n]
           for padded, n in chunks(ids, self.buckets)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export(server: Server, path: str, buckets: Sequence[int] | None = None) -> None:
  """Writes one zip file: the serialized encode function, one score function per bucket size,
  the weights (.npz, flat leaves) and a JSON manifest of the request layout."""
  leaves, treedef = jax.tree.flatten(server.params)
  user = server.user_features(server.layout.example_user())
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
  sizes = check_buckets(buckets or server.buckets)
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
      "layout": server.layout.to_json(),
      "num_weights": len(leaves),
  }
  files["manifest.json"] = json.dumps(manifest, indent=2).encode()
  with zipfile.ZipFile(path, "w") as zf:
    for name, payload in files.items():
      zf.writestr(name, payload)
