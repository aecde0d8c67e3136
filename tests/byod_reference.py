"""The bring-your-own-data builder as it was before it streamed (rows as Python lists, one
pass in memory): the reference the streamed builder's records are compared with."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
from etils import epath

from dmf_jax.core import hashing
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.core.errors import DataError
from dmf_jax.core.schema import FeatureSchema, FeatureSpec, ModalitySpec
from dmf_jax.data import sequences
from dmf_jax.data.byod import (MULTI_SEPARATOR, UNIQUE_FIELD_MIN_ROWS, _hash_spec, _require,
                               _vectors, _warn, read_config, read_ids_file)

CSV_FIELD_LIMIT = 1 << 20


def _decode(path: epath.Path) -> str:
  data = path.read_bytes()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file "
                    f"as UTF-8") from None


def read_table(path: epath.Path, required: list[str]) -> tuple[list[str], list[list[str]], list[int]]:
  """(header, rows as strings, source line numbers) of a CSV or Parquet file."""
  if path.suffix == ".parquet":
    try:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
      table = pq.read_table(str(path)).to_pydict()
    except Exception as e:  # pylint: disable=broad-except  (pyarrow's errors have no common base)
      raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    header = list(table)
    rows = [["" if v is None else str(v) for v in values] for values in zip(*table.values())]
    lines = list(range(1, len(rows) + 1))  # Parquet: row numbers
  else:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    rows, lines = [], []
    try:
      header = next(reader, None)
      if header is None:
        raise DataError(f"{path}: empty file (needs a header row)")
      for row in reader:
        if not row:
          continue
        if len(row) != len(header):
          raise DataError(f"{path}:{reader.line_num}: malformed row: {len(row)} fields, "
                          f"header has {len(header)}")
        rows.append(row)
        lines.append(reader.line_num)
    except csv.Error as e:
      raise DataError(f"{path}:{reader.line_num}: {e} (fields are limited to "
                      f"{CSV_FIELD_LIMIT} bytes)") from None
  missing = [c for c in required if c not in header]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; header is {header}")
  return header, rows, lines


def _number_column(path, rows, lines, col, name, *, integer: bool) -> np.ndarray:
  """Column `col` as int64 (`integer`: plain integers that fit in 64 bits) or as finite
  float64 values; the first bad value raises naming file, line and what was expected."""
  out = np.empty(len(rows), np.int64 if integer else np.float64)
  expected = "an integer" if integer else "a number"
  for k, (row, line) in enumerate(zip(rows, lines)):
    try:
      out[k] = int(row[col]) if integer else float(row[col])
    except ValueError:
      raise DataError(f"{path}:{line}: {name} {row[col]!r} is not {expected}") from None
    except OverflowError:
      raise DataError(f"{path}:{line}: {name} {row[col]!r} does not fit in 64 bits") from None
    if not integer and not math.isfinite(out[k]):
      raise DataError(f"{path}:{line}: {name} {row[col]!r} is not a finite number")
  return out


def _id_index(path, rows, lines, col, what) -> dict[str, int]:
  seen: dict[str, int] = {}
  for row, line in zip(rows, lines):
    key = row[col]
    if not key:
      raise DataError(f"{path}:{line}: empty {what} id")
    if key in seen:
      raise DataError(f"{path}:{line}: duplicate {what} id {key!r} (first at line {seen[key]})")
    seen[key] = line
  return {key: i for i, key in enumerate(sorted(seen))}


def _categorical(path, header, rows, lines, id_col, index, id_name, dim, declared_multi=None,
                 hashed=None, table=""):
  """Encodes every non-id column: specs and int32 arrays indexed by the dense id.

  declared_multi: the fields declared multi-valued (None: inferred, multi-valued when some
  value holds '|'). Single-valued fields: an empty value is the value "" ("missing", its own
  row). Multi-valued fields: an empty value is no values (all slots -1). Fields that `hashed`
  names as '<table>.<field>' are raw int64 ids of their values (`hashing.raw_id`).
  """
  hashed = hashed or {}
  for key in hashed:
    if key.startswith(f"{table}.") and key.partition(".")[2] not in header:
      raise DataError(f"{path}: 'hash' names {key!r}, not a column; header is {header}")
  if declared_multi is not None:
    unknown = sorted(set(declared_multi) - set(header) - {header[id_col]})
    if unknown:
      raise DataError(f"{path}: multi_valued names field(s) {unknown} that are not columns; "
                      f"header is {header}")
  specs, arrays = [], {}
  for col, field in enumerate(header):
    if col == id_col:
      continue
    spec = _hash_spec(hashed, f"{table}.{field}", field, dim)
    if spec is not None:
      arr = np.full(len(index), hashing.raw_id(""), np.int64)  # no row: the missing value
      arr[[index[row[id_col]] for row in rows]] = hashing.raw_ids(row[col] for row in rows)
      specs.append(spec)
      arrays[field] = arr
      continue
    multi = (field in declared_multi if declared_multi is not None
             else any(MULTI_SEPARATOR in row[col] for row in rows))
    values = ([row[col].split(MULTI_SEPARATOR) if row[col] else [] for row in rows] if multi
              else [[row[col]] for row in rows])
    vocab = {v: i for i, v in enumerate(sorted({v for vs in values for v in vs}))}
    # A multi-valued field has at least 2 slots (FeatureSpec: max_values > 1), -1 padded.
    width = max(2 if multi else 1, max((len(vs) for vs in values), default=1))
    arr = np.full((len(index), width) if multi else (len(index),), -1 if multi else 0, np.int32)
    for row, vs in zip(rows, values):
      ids = [vocab[v] for v in vs]
      if multi:
        arr[index[row[id_col]], :len(ids)] = ids
      else:
        arr[index[row[id_col]]] = ids[0]
    if not multi and len(rows) >= UNIQUE_FIELD_MIN_ROWS and len(vocab) == len(rows):
      _warn(f"{path}: column {field!r} has a distinct value on every one of its {len(rows)} "
            f"rows: as a categorical field it is a second {id_name} id (free text such as a "
            f"title belongs in a modality); drop the column unless that is intended")
    specs.append(FeatureSpec(field, max(1, len(vocab)), dim, max_values=width if multi else 1))
    arrays[field] = arr
  return specs, arrays



def prepare(root: epath.Path):
  """(schema, catalog, splits) as the builder of 2026-12-02 made them (in memory)."""
  root = epath.Path(root)
  config = read_config(root)
  seq_len = int(config.get("seq_len", 50))
  dim, field_dim = int(config.get("embedding_dim", 32)), int(config.get("field_dim", 8))
  multi = config.get("multi_valued", {})
  hashed = config.get("hash", {})

  path = _require(root, config["interactions"], "interactions")
  label_col = config.get("label") or config["rating"]["column"]
  header, rows, lines = read_table(path, ["user", "item", "timestamp", label_col])
  col = {h: i for i, h in enumerate(header)}
  if not rows:
    raise DataError(f"{path}: no interactions")
  timestamp = _number_column(path, rows, lines, col["timestamp"], "timestamp", integer=True)
  if "label" in config:
    label = _number_column(path, rows, lines, col[label_col], "label", integer=False)
    bad = ~np.isin(label, (0.0, 1.0))
    if bad.any():
      raise DataError(f"{path}:{lines[int(np.argmax(bad))]}: label must be 0 or 1")
  else:
    ratings = _number_column(path, rows, lines, col[label_col], "rating", integer=False)
    label = ratings >= float(config["rating"]["threshold"])

  # Items: the item table defines the vocabulary when given; otherwise the interactions do.
  items_side, item_specs = {}, []
  if config.get("items"):
    ipath = _require(root, config["items"], "items")
    iheader, irows, ilines = read_table(ipath, ["item"])
    item_index = _id_index(ipath, irows, ilines, iheader.index("item"), "item")
    item_specs, items_side = _categorical(ipath, iheader, irows, ilines, iheader.index("item"),
                                          item_index, "item", field_dim, multi.get("items"),
                                          hashed, "items")
  else:
    item_index = {v: i for i, v in enumerate(sorted({row[col["item"]] for row in rows}))}
  item = np.empty(len(rows), np.int32)
  for k, (row, line) in enumerate(zip(rows, lines)):
    try:
      item[k] = item_index[row[col["item"]]]
    except KeyError:
      raise DataError(f"{path}:{line}: unknown item id {row[col['item']]!r} "
                       f"(not in {config['items']})") from None

  for row, line in zip(rows, lines):
    if not row[col["user"]]:
      raise DataError(f"{path}:{line}: empty user id")
  user_index = {v: i for i, v in enumerate(sorted({row[col["user"]] for row in rows}))}
  user = np.asarray([user_index[row[col["user"]]] for row in rows], np.int32)
  user_id_spec = _hash_spec(hashed, "user", "user_id", dim)
  if user_id_spec is None:
    user_table = {"user_id": np.arange(len(user_index), dtype=np.int32)}
    user_specs = [FeatureSpec("user_id", len(user_index), dim)]
  else:  # raw ids, in the dense (sorted) order
    user_table = {"user_id": hashing.raw_ids(sorted(user_index))}
    user_specs = [user_id_spec]
  if config.get("users"):
    upath = _require(root, config["users"], "users")
    uheader, urows, ulines = read_table(upath, ["user"])
    uid = uheader.index("user")
    _id_index(upath, urows, ulines, uid, "user")  # duplicate check
    known = [(r, l) for r, l in zip(urows, ulines) if r[uid] in user_index]
    missing = sorted(set(user_index) - {r[uid] for r, _ in known})
    if missing:
      raise DataError(f"{upath}: no row for user id(s) {missing[:5]} of the interactions")
    specs, arrays = _categorical(upath, uheader, [r for r, _ in known], [l for _, l in known],
                                 uid, user_index, "user", field_dim, multi.get("users"),
                                 hashed, "users")
    user_specs += specs
    user_table |= arrays

  modalities = {}
  for name, files in (config.get("modalities") or {}).items():
    vec_path = _require(root, files["vectors"], f"{name} vectors")
    ids_path = _require(root, files["ids"], f"{name} ids")
    vectors = _vectors(vec_path)
    ids = read_ids_file(ids_path)
    if vectors.ndim != 2 or len(vectors) != len(ids):
      raise DataError(f"{vec_path}: shape {vectors.shape} does not match the {len(ids)} ids "
                       f"in {ids_path}")
    if not np.isfinite(vectors).all():
      row = int(np.argmax(~np.isfinite(vectors).all(axis=1)))
      raise DataError(f"{vec_path}: row {row} (item {ids[row]!r}) has NaN/inf")
    table = np.zeros((len(item_index), vectors.shape[1]), np.float32)
    seen: dict[str, int] = {}
    for row, key in enumerate(ids):
      if key in seen:
        raise DataError(f"{ids_path}:{row + 1}: duplicate item id {key!r}")
      seen[key] = row
      if key not in item_index:
        raise DataError(f"{ids_path}:{row + 1}: unknown item id {key!r}")
      table[item_index[key]] = vectors[row]
    modalities[name] = table

  item_id_spec = _hash_spec(hashed, "item", "item_id", dim)
  schema = FeatureSchema(
      num_items=len(item_index), item_id_dim=dim, seq_len=seq_len,
      item_features=tuple(item_specs), user_features=tuple(user_specs),
      modalities=tuple(ModalitySpec(k, v.shape[1]) for k, v in modalities.items()),
      item_id_hash_buckets=item_id_spec.hash_buckets if item_id_spec else 0,
      item_id_num_hashes=item_id_spec.num_hashes if item_id_spec else 1,
      item_id_hash_seed=item_id_spec.hash_seed if item_id_spec else 0,
  )
  # Raw item ids always: a later build (new items sort in between) maps rows by them.
  catalog = ItemCatalog(items_side, modalities, hashing.raw_ids(sorted(item_index)))
  splits = _examples_from_events(
      user, item, timestamp, label.astype(np.int32), user_table, seq_len,
      split=config.get("split", "per_user"),
  )
  return schema, catalog, splits


def _examples_from_events(
    user: np.ndarray,
    item: np.ndarray,
    timestamp: np.ndarray,
    label: np.ndarray,
    user_table: dict[str, np.ndarray],
    seq_len: int,
    split: np.ndarray | str = "per_user",
) -> dict[str, dict[str, np.ndarray]]:
  """Impression examples per split from raw events.

  Args:
    user, item, timestamp, label: [n] arrays of events in any order (user and item are
      dense indices, label 0/1).
    user_table: field name -> array indexed by user index ([num_users] or [num_users, M]).
    seq_len: L, the longest behaviour sequence kept.
    split: 'per_user' (chronological 80/10/10), 'global_time' (global time cut), or an
      explicit int array [n] of 0/1/2 given in the events' original order.

  Returns:
    {split name: {user/<field>, item_id, timestamp, label, hist_item_id [m, L], hist_len}}
    with each split's rows ordered by (user, timestamp, item).
  """
  order = sequences.order_events(user, item, timestamp)
  user, item, ts, label = user[order], item[order], timestamp[order], label[order]
  hist, hist_len, _ = sequences.build_histories(user, item, ts, label, seq_len)
  if isinstance(split, str):
    if split == "per_user":
      split = sequences.per_user_split(user)
    elif split == "global_time":
      split = np.asarray(sequences.global_time_split(ts))
    else:
      raise ValueError(f"split {split!r} is not one of ('per_user', 'global_time')")
  else:
    split = np.asarray(split)[order]
  out = {}
  for index, name in enumerate(sequences.SPLITS):
    sel = split == index
    rows = {f"user/{k}": np.asarray(v)[user[sel]] for k, v in user_table.items()}
    rows.update(
        item_id=item[sel].astype(np.int32), timestamp=ts[sel].astype(np.int64),
        label=label[sel].astype(np.float32), hist_item_id=hist[sel], hist_len=hist_len[sel],
    )
    out[name] = rows
  return out

