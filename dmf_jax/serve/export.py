"""Export a `Server` to one file that `dmf_jax.serve.exported.ExportedScorer` runs without
the model code: the serialized encode function, one score function per bucket size, the
weights (.npz, flat leaves) and a JSON manifest of the request layout."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence

import jax
import numpy as np

from dmf_jax.serve.exported import FORMAT_VERSION
from dmf_jax.serve.request import check_buckets
from dmf_jax.serve.server import Server


def export(server: Server, path: str, buckets: Sequence[int] | None = None) -> None:
  """Writes one zip file: the serialized encode function, one score function per bucket size,
  the weights (.npz, flat leaves) and a JSON manifest of the request layout."""
  leaves, treedef = jax.tree.flatten(server.params)
  user = server.user_features(server.layout.example_user())
  state_tree = jax.tree.structure(jax.eval_shape(server.encode_fn, server.params, user))

  def encode_flat(flat_params, user_features):
    state = server.encode_fn(jax.tree.unflatten(treedef, flat_params), user_features)
    return jax.tree.leaves(state)

  def score_flat(flat_params, flat_state, item_ids):
    params = jax.tree.unflatten(treedef, flat_params)
    return server.score_fn(params, jax.tree.unflatten(state_tree, flat_state), item_ids)

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
