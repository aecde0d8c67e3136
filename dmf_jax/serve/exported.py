"""Run an exported DMF scorer without the model code (only jax, numpy and serve_request).

  scorer = ExportedScorer("model.dmfx")
  state = scorer.encode_user({"user/user_id": 3, ..., "hist_item_id": [5, 9, 2]})
  logits = scorer.score(state, item_ids)   # float32 [N]

Requests are checked exactly as `serving.Server` checks them (`serve_request.RequestLayout`,
stored in the export's manifest): every user field against its vocabulary, every history and
candidate id against the catalog, integral ids of the right rank only. A damaged file (not a
zip, a missing member, a bad manifest, undecodable weights or programs) raises one ValueError
naming the file and the part.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dmf_jax.serve.request import (RequestLayout, check_candidate_sizes, check_user_state,
                                   score_distinct)

FORMAT_VERSION = 2


class ExportedScorer:
  def __init__(self, path: str):
    self.path = str(path)
    try:
      with zipfile.ZipFile(path) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
      raise ValueError(f"{path}: not a readable exported scorer ({e})") from None
    manifest = self._manifest(files)
    try:
      self.layout = RequestLayout.from_json(manifest["layout"])
      self.candidate_sizes = check_candidate_sizes(manifest["buckets"])
      num_weights = int(manifest["num_weights"])
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{path}: manifest.json is damaged ({type(e).__name__}: {e})") from None
    self.manifest = manifest
    try:
      npz = np.load(io.BytesIO(self._member(files, "weights.npz")), allow_pickle=False)
      bf16 = set(manifest.get("bfloat16_weights", []))  # stored as uint16 bit patterns
      self.weights = [jax.device_put(npz[f"arr_{i}"].view(jnp.bfloat16) if i in bf16
                                     else npz[f"arr_{i}"]) for i in range(num_weights)]
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise ValueError(f"{path}: weights.npz is damaged ({type(e).__name__}: {e})") from None
    self._encode = self._program(files, "encode_user.bin")
    self._score = {n: self._program(files, f"score_candidates_{n}.bin")
                   for n in self.candidate_sizes}

  def _member(self, files: dict, name: str) -> bytes:
    if name not in files:
      raise ValueError(f"{self.path}: no {name} (not a complete exported dmf_jax scorer)")
    return files[name]

  def _manifest(self, files: dict) -> dict:
    try:
      manifest = json.loads(self._member(files, "manifest.json"))
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f"{self.path}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
      raise ValueError(f"{self.path}: manifest.json is damaged (not an object)")
    if manifest.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{self.path}: format version {manifest.get('format_version')} is not "
                       f"{FORMAT_VERSION}; export it again with this version "
                       f"(python -m experiments.export)")
    return manifest

  def _program(self, files: dict, name: str):
    try:
      return jax.export.deserialize(bytearray(self._member(files, name)))
    except ValueError as e:
      if str(e).startswith(self.path):
        raise
      raise ValueError(f"{self.path}: {name} is damaged ({type(e).__name__}: {e})") from None
    except Exception as e:  # pylint: disable=broad-except  (flatbuffers raises anything)
      raise ValueError(f"{self.path}: {name} is damaged ({type(e).__name__}: {e})") from None

  def encode_user(self, user: Mapping) -> list:
    return self._encode.call(self.weights, self.layout.user_features(user))

  def score(self, user_state: list, item_ids) -> np.ndarray:
    check_user_state(user_state)
    ids = self.layout.item_ids("item_ids", item_ids)
    return score_distinct(
        ids, lambda padded: self._score[len(padded)].call(self.weights, user_state, padded),
        self.candidate_sizes)
