"""byod_ctr: bring your own data — interactions, optional user/item tables, modality vectors.

The manual folder holds a `dataset.json` that names the files (see README "Bring your own data"):

  {
    "interactions": "interactions.csv",          # or .parquet; columns user, item, timestamp
    "label": "label",                            # a 0/1 column, or
    "rating": {"column": "rating", "threshold": 4},   # label = rating >= threshold
    "users": "users.csv",                        # optional: user,<field>,...
    "items": "items.csv",                        # optional: item,<field>,... ('a|b' multi-valued)
    "multi_valued": {"items": ["tags"]},         # optional: declares the multi-valued fields
    "modalities": {"text": {"vectors": "text.npy", "ids": "text_ids.txt"}},
    "seq_len": 50,                               # optional, default 50
    "split": "per_user",                         # or "global_time" (cold-start report)
    "embedding_dim": 32, "field_dim": 8,         # optional
    "hash": {"user": 2000000, "item": 1000000,   # optional: hashed tables of that many rows,
             "items.brand": 50000,               # for the ids and any single-valued field
             "num_hashes": 2, "seed": 0}         # (<table>.<field>); see dmf_jax.core.hashing
  }

A hashed field keeps each value's raw 64-bit id in the records and the catalog (hashed when
read), so ids that a later build or a serving request brings are valid (`FeatureSpec`).

User and item ids are arbitrary strings, mapped to dense indices in sorted order. Side fields:
an empty value is the field's "missing" value (its own embedding row); a field is
multi-valued when `multi_valued` lists it for its table, or — for a table that
`multi_valued` does not mention — when some row holds `|`. Files are UTF-8 (a BOM is
accepted). Every check names the file (and line): missing files, malformed rows, unknown item
ids, duplicate ids, non-integer timestamps, non-finite ratings, vectors with NaN/inf or a row
count that does not match their id list.

Each distinct source is its own build: the build's config name is `src-<12 hex digits>`, a
fingerprint of `dataset.json` and of every file it names (`dmf_jax.data.sources`), so
changed files give a new build and never a stale one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dmf_jax.core import hashing
from dmf_jax.data import sequences
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.data import sources
from dmf_jax.data.common import CtrBuilder
from dmf_jax.core.errors import ConfigError, DataError, MissingFileError
from dmf_jax.core.schema import FeatureSchema, FeatureSpec, ModalitySpec

CONFIG_FILE = "dataset.json"
MULTI_SEPARATOR = "|"
KNOWN_KEYS = {"interactions", "label", "rating", "users", "items", "multi_valued", "modalities",
              "seq_len", "split", "embedding_dim", "field_dim", "hash"}
SPLITS = ("per_user", "global_time")
BUILD_NAME = re.compile(r"^src-[0-9a-f]{12}$")
# A single-valued field with a distinct value on every row, and at least this many rows, is
# probably an id or free text (a title): reported, since it only adds a second id embedding.
UNIQUE_FIELD_MIN_ROWS = 100
CSV_FIELD_LIMIT = 1 << 20  # bytes per CSV field (csv's default is 128 KiB)


def _require(root: epath.Path, name, what: str) -> epath.Path:
  if not isinstance(name, str) or not name:
    raise DataError(f"{root / CONFIG_FILE}: {what} must be a file name, got {name!r}")
  path = root / name
  if not path.exists():
    raise MissingFileError(f"missing {what} file {path} (named in {root / CONFIG_FILE})")
  return path


def read_config(root: epath.Path) -> dict:
  """`dataset.json` of a bring-your-own-data folder, checked (every error names the key)."""
  path = root / CONFIG_FILE
  if not path.exists():
    raise MissingFileError(f"missing {path}: the bring-your-own-data folder must describe its "
                           f"files in {CONFIG_FILE} (see README)")
  try:
    config = json.loads(path.read_text(encoding="utf-8-sig"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: invalid JSON: {e}") from None
  if not isinstance(config, dict):
    raise DataError(f"{path}: expected a JSON object, got {type(config).__name__}")
  unknown = sorted(set(config) - KNOWN_KEYS)
  if unknown:
    raise DataError(f"{path}: unknown key(s) {unknown}; valid: {sorted(KNOWN_KEYS)}")
  if "interactions" not in config:
    raise DataError(f"{path}: 'interactions' is required")
  if ("label" in config) == ("rating" in config):
    raise DataError(f"{path}: give exactly one of 'label' or 'rating'")
  if "label" in config and not isinstance(config["label"], str):
    raise DataError(f"{path}: 'label' must name a 0/1 column, got {config['label']!r}")
  if "rating" in config:
    rating = config["rating"]
    if (not isinstance(rating, dict) or not isinstance(rating.get("column"), str)
        or "threshold" not in rating):
      raise DataError(f"{path}: 'rating' must be an object {{\"column\": NAME, \"threshold\": "
                      f"NUMBER}}, got {rating!r}")
    threshold = rating["threshold"]
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)):
      raise DataError(f"{path}: rating 'threshold' must be a finite number, got {threshold!r}")
  for key, default in (("seq_len", 50), ("embedding_dim", 32), ("field_dim", 8)):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise DataError(f"{path}: '{key}' must be a positive integer, got {value!r}")
  if config.get("split", "per_user") not in SPLITS:
    raise DataError(f"{path}: 'split' must be one of {SPLITS}, got {config.get('split')!r}")
  multi = config.get("multi_valued", {})
  if (not isinstance(multi, dict) or set(multi) - {"items", "users"}
      or any(not isinstance(v, list) or any(not isinstance(f, str) for f in v)
             for v in multi.values())):
    raise DataError(f"{path}: 'multi_valued' must map 'items' and/or 'users' to lists of field "
                    f"names, got {multi!r}")
  hashed = config.get("hash", {})
  if not isinstance(hashed, dict):
    raise DataError(f"{path}: 'hash' must be an object, got {hashed!r}")
  for key, value in hashed.items():
    table, _, field = key.partition(".")
    if not (key in ("user", "item", "num_hashes", "seed")
            or (table in ("users", "items") and field)):
      raise DataError(f"{path}: 'hash' key {key!r} is not 'user', 'item', 'num_hashes', 'seed' "
                      f"or '<users|items>.<field>'")
    low, high = {"num_hashes": (1, 4), "seed": (0, 2**31)}.get(key, (1, 2**31 - 2))
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
      raise DataError(f"{path}: 'hash' {key!r} must be an integer in [{low}, {high}], got "
                      f"{value!r}")
    if field and field in multi.get(table, []):
      raise DataError(f"{path}: 'hash' {key!r}: a hashed field must be single-valued, "
                      f"'multi_valued' lists it")
  mods = config.get("modalities") or {}
  if not isinstance(mods, dict) or any(
      not isinstance(f, dict) or set(f) != {"vectors", "ids"} for f in mods.values()):
    raise DataError(f"{path}: 'modalities' must map each name to {{\"vectors\": FILE, \"ids\": "
                    f"FILE}}, got {mods!r}")
  return config


def source_files(root: epath.Path, config: dict) -> dict[str, epath.Path]:
  """dataset.json and every file it names, by role."""
  files = {CONFIG_FILE: root / CONFIG_FILE,
           "interactions": _require(root, config["interactions"], "interactions")}
  for table in ("users", "items"):
    if config.get(table):
      files[table] = _require(root, config[table], table)
  for name, entry in (config.get("modalities") or {}).items():
    files[f"{name} vectors"] = _require(root, entry["vectors"], f"{name} vectors")
    files[f"{name} ids"] = _require(root, entry["ids"], f"{name} ids")
  return files


def build_name(root: epath.Path) -> str:
  """The build (config) name of the sources in `root`: src-<12 hex digits of their digest>."""
  digest, _ = sources.source_fingerprint(source_files(root, read_config(root)))
  return f"src-{digest[:12]}"


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


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def _hash_spec(hashed: dict, key: str, name: str, dim: int) -> FeatureSpec | None:
  """The hashed spec of `key` ('user', 'item', '<table>.<field>') when `hash` names it."""
  if key not in hashed:
    return None
  return FeatureSpec.hashed_field(name, hashed[key], dim, num_hashes=hashed.get("num_hashes", 1),
                                  seed=hashed.get("seed", 0))


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


def read_ids_file(path: epath.Path) -> list[str]:
  ids = [line.strip() for line in _decode(path).splitlines()]
  if any(not i for i in ids):
    raise DataError(f"{path}:{ids.index('') + 1}: empty item id")
  return ids


def _vectors(vec_path: epath.Path) -> np.ndarray:
  with vec_path.open("rb") as f:
    try:
      vectors = np.load(f, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise DataError(f"{vec_path}: not a readable .npy file: {e}") from None
  if not isinstance(vectors, np.ndarray) or not (
      np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
    raise DataError(f"{vec_path}: vectors must be numbers (float), got dtype "
                    f"{getattr(vectors, 'dtype', type(vectors).__name__)}")
  return vectors


class ByodCtr(CtrBuilder):
  """Your own logged impressions and frozen item embeddings (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {CONFIG_FILE} and the files it names in manual_dir."

  @classmethod
  def resolve_config(cls, config: str | None, data_dir: str,
                     manual_dir: str | None) -> tfds.core.BuilderConfig:
    """The build of `manual_dir`'s sources (or, without one, the only build in `data_dir`).

    `config` may be empty (or 'default'), or a build name `src-...` (which must match the
    sources in `manual_dir` when one is given)."""
    given = None if config in (None, "", "default") else config
    if given is not None and not BUILD_NAME.match(given):
      raise ConfigError(
          f"dataset_config: byod_ctr has no config {given!r}: its builds are named by their "
          f"sources (src-<fingerprint>); leave dataset_config empty")
    if manual_dir:
      name = build_name(epath.Path(manual_dir).expanduser())
      if given is not None and given != name:
        raise ConfigError(
            f"dataset_config: {given} is not the build of the files in {manual_dir} (they are "
            f"{name}, changed since?); leave dataset_config empty to use them")
      return tfds.core.BuilderConfig(name=name, description=f"sources in {manual_dir}")
    built = cls.builds(data_dir)
    if given is not None:
      if given not in built:
        raise ConfigError(f"dataset_config: no byod_ctr build {given} under {data_dir}; "
                          f"builds: {sorted(built) or 'none'}")
      return tfds.core.BuilderConfig(name=given)
    if len(built) != 1:
      listing = "; ".join(f"{k} (from {v})" for k, v in sorted(built.items())) or "none"
      raise ConfigError(
          f"manual_dir: byod_ctr needs the folder of your files (manual_dir) to choose a build; "
          f"builds under {data_dir}: {listing}")
    return tfds.core.BuilderConfig(name=next(iter(built)))

  @staticmethod
  def builds(data_dir: str) -> dict[str, str]:
    """{build name: the manual_dir it was built from} of the finished builds in `data_dir`."""
    root = epath.Path(data_dir).expanduser() / "byod_ctr"
    out = {}
    if root.exists():
      for config_dir in sorted(root.iterdir()):
        record = config_dir / str(ByodCtr.VERSION) / sources.BUILD_FILE
        if BUILD_NAME.match(config_dir.name) and record.exists():
          files = json.loads(record.read_text()).get("sources", {})
          out[config_dir.name] = str(epath.Path(files.get(CONFIG_FILE, {}).get("path", "?")).parent)
    return out

  def source_files(self, manual_dir: epath.Path | None) -> dict[str, epath.Path]:
    return source_files(manual_dir, read_config(manual_dir))

  def _prepare(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir)
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
    splits = sequences.examples_from_events(
        user, item, timestamp, label.astype(np.int32), user_table, seq_len,
        split=config.get("split", "per_user"),
    )
    return schema, catalog, splits
