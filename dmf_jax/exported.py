"""Run an exported DMF scorer without the model code (only jax and numpy are imported).

  scorer = ExportedScorer("model.dmfx")
  state = scorer.encode_user({"user/user_id": 3, ..., "hist_item_id": [5, 9, 2]})
  logits = scorer.score(state, item_ids)   # float32 [N]
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping

import jax
import numpy as np

FORMAT_VERSION = 1


class ExportedScorer:
  def __init__(self, path: str):
    try:
      with zipfile.ZipFile(path) as zf:
        files = {name: zf.read(name) for name in zf.namelist()}
    except (OSError, zipfile.BadZipFile) as e:
      raise ValueError(f"{path}: not a readable exported scorer ({e})") from None
    if "manifest.json" not in files:
      raise ValueError(f"{path}: no manifest.json (not an exported dmf_jax scorer)")
    self.manifest = json.loads(files["manifest.json"])
    if self.manifest.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{path}: format version {self.manifest.get('format_version')} "
                       f"is not {FORMAT_VERSION}")
    npz = np.load(io.BytesIO(files["weights.npz"]))
    self.weights = [jax.device_put(npz[f"arr_{i}"]) for i in range(self.manifest["num_weights"])]
    self._encode = jax.export.deserialize(files["encode_user.bin"])
    self.buckets = sorted(self.manifest["buckets"])
    self._score = {b: jax.export.deserialize(files[f"score_candidates_{b}.bin"])
                   for b in self.buckets}

  def encode_user(self, user: Mapping) -> list:
    seq_len, num_items = self.manifest["seq_len"], self.manifest["num_items"]
    features = {}
    for key, shape in self.manifest["user_features"].items():
      if key not in user:
        raise KeyError(f"missing user feature {key!r}")
      features[key] = np.asarray(user[key], np.int32).reshape(shape)
    history = np.asarray(user.get("hist_item_id", []), np.int64).reshape(-1)
    if np.any((history < 0) | (history >= num_items)):
      raise ValueError(f"hist_item_id: ids must be in [0, {num_items})")
    history = history[-seq_len:]
    features["hist_item_id"] = np.zeros(seq_len, np.int32)
    features["hist_item_id"][:len(history)] = history
    features["hist_mask"] = np.arange(seq_len) < len(history)
    return self._encode.call(self.weights, features)

  def score(self, user_state: list, item_ids) -> np.ndarray:
    ids = np.asarray(item_ids, np.int64).reshape(-1)
    if np.any((ids < 0) | (ids >= self.manifest["num_items"])):
      raise ValueError(f"item_ids: ids must be in [0, {self.manifest['num_items']})")
    largest, out = self.buckets[-1], []
    for start in range(0, len(ids), largest):
      chunk = ids[start:start + largest]
      size = next(b for b in self.buckets if b >= len(chunk))
      padded = np.zeros(size, np.int32)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._score[size].call(self.weights, user_state, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros(0, np.float32)
