"""Export a `Server` to one file that `dmf_jax.serve.exported.ExportedScorer` runs without
the model code: the serialized encode function, one score function per candidate size (the
padded candidate counts, `Server.candidate_sizes`), the weights (.npz, flat leaves) and a JSON
manifest of the request layout."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmf_jax.core.errors import UserError
from dmf_jax.serve.exported import FORMAT_VERSION
from dmf_jax.serve.request import check_candidate_sizes
from dmf_jax.serve.server import Server


def check_output(path: str, *, force: bool = False) -> str:
  """`path` as a file to write: refuses (`UserError`) an existing file unless `force`, a folder,
  and a missing parent folder."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    raise UserError(f"export output {path} is a folder: give a file path (e.g. {path}/model.dmfx)")
  if os.path.exists(path) and not force:
    raise UserError(f"{path} exists; pass force=True (--force) to replace it")
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UserError(f"export output {path}: its folder {parent} does not exist; create it first")
  return path


def export(server: Server, path: str, candidate_sizes: Sequence[int] | None = None, *,
           force: bool = False) -> None:
  """Writes one zip file: the serialized encode function, one score function per candidate size,
  the weights (.npz, flat leaves) and a JSON manifest of the request layout. An existing file
  is refused unless `force`; the file appears whole (written beside it, then renamed)."""
  path = check_output(path, force=force)
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
  sizes = check_candidate_sizes(candidate_sizes or server.candidate_sizes)
  for size in sizes:
    exp = jax.export.export(jax.jit(score_flat))(
        params_spec, state_spec, jax.ShapeDtypeStruct((size,), np.int32))
    files[f"score_candidates_{size}.bin"] = exp.serialize()
  weights = io.BytesIO()
  arrays = [np.asarray(x) for x in leaves]
  # .npz has no bfloat16: a bfloat16 model's weights are stored as their uint16 bit patterns.
  bf16 = [i for i, a in enumerate(arrays) if a.dtype == jnp.bfloat16]
  np.savez(weights, *[a.view(np.uint16) if i in bf16 else a for i, a in enumerate(arrays)])
  files["weights.npz"] = weights.getvalue()
  manifest = {
      "format_version": FORMAT_VERSION,
      "buckets": list(sizes),  # the candidate sizes (the format's key since version 1)
      "layout": server.layout.to_json(),
      "num_weights": len(leaves),
      "bfloat16_weights": bf16,
  }
  files["manifest.json"] = json.dumps(manifest, indent=2).encode()
  tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp")
  with zipfile.ZipFile(tmp, "w") as zf:
    for name, payload in files.items():
      zf.writestr(name, payload)
  os.replace(tmp, path)
