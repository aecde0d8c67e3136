"""byod_ctr: bring your own data — interactions, optional user/item tables, modality vectors.

The manual folder holds a `dataset.json` that names the files (see README "Bring your own data"):

  {
    "interactions": "interactions.csv",          # or .parquet; columns user, item, timestamp
    "label": "label",                            # a 0/1 column, or
    "rating": {"column": "rating", "threshold": 4},   # label = rating >= threshold
    "users": "users.csv",                        # optional: user,<field>,...
    "items": "items.csv",                        # optional: item,<field>,... ('a|b' multi-valued)
    "modalities": {"text": {"vectors": "text.npy", "ids": "text_ids.txt"}},
    "seq_len": 50,                               # optional, default 50
    "split": "per_user",                         # or "global_time" (cold-start report)
    "embedding_dim": 32, "field_dim": 8          # optional
  }

User and item ids are arbitrary strings, mapped to dense indices in sorted order. Every check
names the file (and line): missing files, malformed rows, unknown item ids, duplicate ids,
vectors with NaN/inf or a row count that does not match their id list.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data.common import CtrBuilder
from dmf_jax import sequences
from dmf_jax.catalog import ItemCatalog
from dmf_jax.schema import FeatureSchema, FeatureSpec, ModalitySpec

CONFIG_FILE = "dataset.json"
MULTI_SEPARATOR = "|"
KNOWN_KEYS = {"interactions", "label", "rating", "users", "items", "modalities", "seq_len",
              "split", "embedding_dim", "field_dim"}


def _require(root: epath.Path, name: str, what: str) -> epath.Path:
  path = root / name
  if not path.exists():
    raise FileNotFoundError(f"missing {what} file {path} (named in {root / CONFIG_FILE})")
  return path


def read_table(path: epath.Path, required: list[str]) -> tuple[list[str], list[list[str]], list[int]]:
  """(header, rows as strings, source line numbers) of a CSV or Parquet file."""
  if path.suffix == ".parquet":
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(str(path)).to_pydict()
    header = list(table)
    rows = [[str(v) for v in values] for values in zip(*table.values())]
    lines = list(range(1, len(rows) + 1))  # Parquet: row numbers
  else:
    reader = csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline=""))
    try:
      header = next(reader)
    except StopIteration:
      raise ValueError(f"{path}: empty file (needs a header row)") from None
    rows, lines = [], []
    for row in reader:
      if not row:
        continue
      if len(row) != len(header):
        raise ValueError(f"{path}:{reader.line_num}: malformed row: {len(row)} fields, "
                         f"header has {len(header)}")
      rows.append(row)
      lines.append(reader.line_num)
  missing = [c for c in required if c not in header]
  if missing:
    raise ValueError(f"{path}: missing column(s) {missing}; header is {header}")
  return header, rows, lines


def _int_column(path, rows, lines, col, name):
  out = np.empty(len(rows), np.int64)
  for k, (row, line) in enumerate(zip(rows, lines)):
    try:
      out[k] = int(float(row[col])) if name != "timestamp" else int(row[col])
    except ValueError:
      raise ValueError(f"{path}:{line}: {name} {row[col]!r} is not a number") from None
  return out


def _float_column(path, rows, lines, col, name):
  out = np.empty(len(rows), np.float64)
  for k, (row, line) in enumerate(zip(rows, lines)):
    try:
      out[k] = float(row[col])
    except ValueError:
      raise ValueError(f"{path}:{line}: {name} {row[col]!r} is not a number") from None
  return out


def _id_index(path, rows, lines, col, what) -> dict[str, int]:
  seen: dict[str, int] = {}
  for row, line in zip(rows, lines):
    key = row[col]
    if key in seen:
      raise ValueError(f"{path}:{line}: duplicate {what} id {key!r} (first at line {seen[key]})")
    seen[key] = line
  return {key: i for i, key in enumerate(sorted(seen))}


def _categorical(path, header, rows, lines, id_col, index, id_name, dim):
  """Encodes every non-id column: specs and int32 arrays indexed by the dense id."""
  specs, arrays = [], {}
  for col, field in enumerate(header):
    if col == id_col:
      continue
    values = [row[col].split(MULTI_SEPARATOR) if row[col] else [] for row in rows]
    vocab = {v: i for i, v in enumerate(sorted({v for vs in values for v in vs}))}
    width = max(1, max((len(vs) for vs in values), default=1))
    multi = any(MULTI_SEPARATOR in row[col] for row in rows)
    arr = np.full((len(index), width) if multi else (len(index),), -1 if multi else 0, np.int32)
    for row, vs in zip(rows, values):
      ids = [vocab[v] for v in vs]
      if multi:
        arr[index[row[id_col]], :len(ids)] = ids
      elif ids:
        arr[index[row[id_col]]] = ids[0]
    if not multi and any(not vs for vs in values):
      line = lines[[not vs for vs in values].index(True)]
      raise ValueError(f"{path}:{line}: empty value in column {field!r} for {id_name}")
    specs.append(FeatureSpec(field, max(1, len(vocab)), dim, max_values=width if multi else 1))
    arrays[field] = arr
  return specs, arrays


def read_ids_file(path: epath.Path) -> list[str]:
  ids = [line.strip() for line in path.read_text().splitlines()]
  if any(not i for i in ids):
    raise ValueError(f"{path}:{ids.index('') + 1}: empty item id")
  return ids


class ByodCtr(CtrBuilder):
  """Your own logged impressions and frozen item embeddings (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {CONFIG_FILE} and the files it names in manual_dir."

  def _config(self, root: epath.Path) -> dict:
    path = root / CONFIG_FILE
    if not path.exists():
      raise FileNotFoundError(f"missing {path}: the bring-your-own-data folder must describe its "
                              f"files in {CONFIG_FILE} (see README)")
    try:
      config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON: {e}") from None
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
      raise ValueError(f"{path}: unknown key(s) {unknown}; valid: {sorted(KNOWN_KEYS)}")
    if "interactions" not in config:
      raise ValueError(f"{path}: 'interactions' is required")
    if ("label" in config) == ("rating" in config):
      raise ValueError(f"{path}: give exactly one of 'label' or 'rating'")
    return config

  def _prepare(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir)
    config = self._config(root)
    seq_len = int(config.get("seq_len", 50))
    dim, field_dim = int(config.get("embedding_dim", 32)), int(config.get("field_dim", 8))

    path = _require(root, config["interactions"], "interactions")
    label_col = config.get("label") or config["rating"]["column"]
    header, rows, lines = read_table(path, ["user", "item", "timestamp", label_col])
    col = {h: i for i, h in enumerate(header)}
    if not rows:
      raise ValueError(f"{path}: no interactions")
    timestamp = _int_column(path, rows, lines, col["timestamp"], "timestamp")
    if "label" in config:
      label = _float_column(path, rows, lines, col[label_col], "label")
      bad = ~np.isin(label, (0.0, 1.0))
      if bad.any():
        raise ValueError(f"{path}:{lines[int(np.argmax(bad))]}: label must be 0 or 1")
    else:
      ratings = _float_column(path, rows, lines, col[label_col], "rating")
      label = ratings >= float(config["rating"]["threshold"])

    # Items: the item table defines the vocabulary when given; otherwise the interactions do.
    items_side, item_specs = {}, []
    if config.get("items"):
      ipath = _require(root, config["items"], "items")
      iheader, irows, ilines = read_table(ipath, ["item"])
      item_index = _id_index(ipath, irows, ilines, iheader.index("item"), "item")
      item_specs, items_side = _categorical(ipath, iheader, irows, ilines, iheader.index("item"),
                                            item_index, "item", field_dim)
    else:
      item_index = {v: i for i, v in enumerate(sorted({row[col["item"]] for row in rows}))}
    item = np.empty(len(rows), np.int32)
    for k, (row, line) in enumerate(zip(rows, lines)):
      try:
        item[k] = item_index[row[col["item"]]]
      except KeyError:
        raise ValueError(f"{path}:{line}: unknown item id {row[col['item']]!r} "
                         f"(not in {config['items']})") from None

    user_index = {v: i for i, v in enumerate(sorted({row[col["user"]] for row in rows}))}
    user = np.asarray([user_index[row[col["user"]]] for row in rows], np.int32)
    user_table = {"user_id": np.arange(len(user_index), dtype=np.int32)}
    user_specs = [FeatureSpec("user_id", len(user_index), dim)]
    if config.get("users"):
      upath = _require(root, config["users"], "users")
      uheader, urows, ulines = read_table(upath, ["user"])
      uid = uheader.index("user")
      _id_index(upath, urows, ulines, uid, "user")  # duplicate check
      known = [(r, l) for r, l in zip(urows, ulines) if r[uid] in user_index]
      missing = sorted(set(user_index) - {r[uid] for r, _ in known})
      if missing:
        raise ValueError(f"{upath}: no row for user id(s) {missing[:5]} of the interactions")
      specs, arrays = _categorical(upath, uheader, [r for r, _ in known], [l for _, l in known],
                                   uid, user_index, "user", field_dim)
      user_specs += specs
      user_table |= arrays

    modalities = {}
    for name, files in (config.get("modalities") or {}).items():
      vec_path = _require(root, files["vectors"], f"{name} vectors")
      ids_path = _require(root, files["ids"], f"{name} ids")
      with vec_path.open("rb") as f:
        try:
          vectors = np.load(f)
        except (ValueError, OSError, EOFError) as e:
          raise ValueError(f"{vec_path}: not a readable .npy file: {e}") from None
      ids = read_ids_file(ids_path)
      if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"{vec_path}: shape {vectors.shape} does not match the {len(ids)} ids "
                         f"in {ids_path}")
      if not np.isfinite(vectors).all():
        row = int(np.argmax(~np.isfinite(vectors).all(axis=1)))
        raise ValueError(f"{vec_path}: row {row} (item {ids[row]!r}) has NaN/inf")
      table = np.zeros((len(item_index), vectors.shape[1]), np.float32)
      seen: dict[str, int] = {}
      for row, key in enumerate(ids):
        if key in seen:
          raise ValueError(f"{ids_path}:{row + 1}: duplicate item id {key!r}")
        seen[key] = row
        if key not in item_index:
          raise ValueError(f"{ids_path}:{row + 1}: unknown item id {key!r}")
        table[item_index[key]] = vectors[row]
      modalities[name] = table

    schema = FeatureSchema(
        num_items=len(item_index), item_id_dim=dim, seq_len=seq_len,
        item_features=tuple(item_specs), user_features=tuple(user_specs),
        modalities=tuple(ModalitySpec(k, v.shape[1]) for k, v in modalities.items()),
    )
    catalog = ItemCatalog(items_side, modalities)
    splits = sequences.examples_from_events(
        user, item, timestamp, label.astype(np.int32), user_table, seq_len,
        split=config.get("split", "per_user"),
    )
    return schema, catalog, splits
