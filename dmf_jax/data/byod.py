"""byod_ctr: bring your own data — interactions, optional user/item tables, modality vectors.

The manual folder holds a `dataset.json` that names the files (see README "Bring your own data"):

  {
    "interactions": "interactions.csv",          # or .parquet; columns user, item, timestamp
    "label": "label",                            # a 0/1 column, or
    "rating": {"column": "rating", "threshold": 4},   # label = rating >= threshold
    "users": "users.csv",                        # optional: user,<field>,...
    "items": "items.csv",                        # optional: item,<field>,... ('a|b' multi-valued)
    "multi_valued": {"items": ["tags"]},         # optional: declares the multi-valued fields
    "numeric": {"items": ["price"],              # optional: numeric columns of the tables,
                "users": {"age_years": "log1p",  # with their normalisation (default standard)
                          "income": {"normalization": "bucketize", "num_buckets": 20}}},
    "modalities": {"text": {"vectors": "text.npy", "ids": "text_ids.txt"}},
    "seq_len": 50,                               # optional, default 50
    "split": "per_user",                         # or "global_time" (cold-start report)
    "embedding_dim": 32, "field_dim": 8,         # optional
    "hash": {"user": 2000000, "item": 1000000,   # optional: hashed tables of that many rows,
             "items.brand": 50000,               # for the ids and any single-valued field
             "num_hashes": 2, "seed": 0}         # (<table>.<field>); see dmf_jax.core.hashing
  }

Numeric columns: an empty cell is a missing value (the model sees a missing flag, or the
bucket of missing values); any other value must be a finite number (NaN/inf are rejected with
the file and line). Each field's normalisation is fitted on the training split's examples only
(`dmf_jax.data.numeric`), at build time, and stored in dmf_schema.json.

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

import dataclasses
import functools
import json
import math
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tensorflow_datasets as tfds
from etils import epath

from dmf_jax.core import hashing
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.core.errors import ConfigError, DataError, MissingFileError
from dmf_jax.core.schema import FeatureSchema, FeatureSpec, ModalitySpec, NumericSpec
from dmf_jax.data import columnar
from dmf_jax.data import numeric as numeric_lib
from dmf_jax.data import partitions
from dmf_jax.data import sequences
from dmf_jax.data import sources
from dmf_jax.data.common import CtrBuilder, Parts
from dmf_jax.data.format import read_vocabularies  # noqa: F401  (raw ids -> indices, for serving)

CONFIG_FILE = "dataset.json"
MULTI_SEPARATOR = "|"
KNOWN_KEYS = {"interactions", "label", "rating", "users", "items", "multi_valued", "modalities",
              "seq_len", "split", "embedding_dim", "field_dim", "hash", "numeric"}
SPLITS = ("per_user", "global_time")
BUILD_NAME = re.compile(r"^src-[0-9a-f]{12}$")
# A single-valued field with a distinct value on every row, and at least this many rows, is
# probably an id or free text (a title): reported, since it only adds a second id embedding.
UNIQUE_FIELD_MIN_ROWS = 100


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
  numeric_specs(path, config)  # checks the 'numeric' entry
  mods = config.get("modalities") or {}
  if not isinstance(mods, dict) or any(
      not isinstance(f, dict) or set(f) != {"vectors", "ids"} for f in mods.values()):
    raise DataError(f"{path}: 'modalities' must map each name to {{\"vectors\": FILE, \"ids\": "
                    f"FILE}}, got {mods!r}")
  return config


def numeric_specs(path: epath.Path, config: dict) -> dict[str, dict[str, NumericSpec]]:
  """The 'numeric' entry as {'items'|'users': {field: unfitted NumericSpec}}, checked."""
  numeric = config.get("numeric", {})
  if not isinstance(numeric, dict) or set(numeric) - {"items", "users"}:
    raise DataError(f"{path}: 'numeric' must map 'items' and/or 'users' to their numeric "
                    f"columns, got {numeric!r}")
  out = {}
  for table, fields in numeric.items():
    if isinstance(fields, list):
      fields = {f: {} for f in fields}
    if not isinstance(fields, dict) or not all(isinstance(f, str) and f for f in fields):
      raise DataError(f"{path}: 'numeric' {table!r} must be a list of column names or an object "
                      f"{{column: normalisation}}, got {fields!r}")
    if not config.get(table):
      raise DataError(f"{path}: 'numeric' names {table} columns, but there is no {table!r} file")
    specs = {}
    for field, setting in fields.items():
      if isinstance(setting, str):
        setting = {"normalization": setting}
      if not isinstance(setting, dict) or set(setting) - {"normalization", "num_buckets", "dim"}:
        raise DataError(f"{path}: 'numeric' {table}.{field}: expected a normalisation name or "
                        f"an object with normalization, num_buckets, dim; got {setting!r}")
      try:
        specs[field] = NumericSpec(field, **setting)
      except ValueError as e:
        raise DataError(f"{path}: 'numeric' {table}.{field}: {e}") from None
      for other in ("multi_valued", "hash"):
        listed = config.get(other, {})
        if field in listed.get(table, []) or f"{table}.{field}" in listed:
          raise DataError(f"{path}: 'numeric' {table}.{field} is also named in {other!r}")
    out[table] = specs
  return out


def _numeric_columns(table: columnar.Chunk, specs: dict[str, NumericSpec], dense: np.ndarray,
                     num_ids: int) -> dict[str, np.ndarray]:
  """The numeric columns of a side table: float32 [num_ids] by dense id, NaN = missing."""
  missing = [f for f in specs if f not in table.reader.header]
  if missing:
    raise DataError(f"{table.reader.path}: 'numeric' names {missing}, not columns; header is "
                    f"{table.reader.header}")
  out = {}
  for field in specs:
    values = np.full(num_ids, np.nan, np.float32)
    values[dense] = table.optional_numbers(field, f"numeric {field}")
    out[field] = values
  return out


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



def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr, flush=True)


def _hash_spec(hashed: dict, key: str, name: str, dim: int) -> FeatureSpec | None:
  """The hashed spec of `key` ('user', 'item', '<table>.<field>') when `hash` names it."""
  if key not in hashed:
    return None
  return FeatureSpec.hashed_field(name, hashed[key], dim, num_hashes=hashed.get("num_hashes", 1),
                                  seed=hashed.get("seed", 0))


def _check_ids(table: columnar.Chunk, column: str, what: str) -> None:
  """Every id non-empty and distinct (errors name the line, and a duplicate's first line)."""
  ids = table.strings(column)
  table.first(pc.equal(ids, ""), f"empty {what} id")
  order = pc.sort_indices(ids).to_numpy()
  sorted_ids = ids.take(pa.array(order))
  if len(order) > 1:
    repeat = pc.equal(sorted_ids[1:], sorted_ids[:-1]).to_numpy(zero_copy_only=False)
    if repeat.any():
      # The first row (in file order) whose id an earlier row holds.
      row = int(np.maximum(order[1:], order[:-1])[repeat].min())
      key = ids[row].as_py()
      first = int(np.flatnonzero(pc.equal(ids, key).to_numpy(zero_copy_only=False))[0])
      raise DataError(f"{table.reader.location(row)}: duplicate {what} id {key!r} (first at "
                      f"line {table.reader.line(first)})")


def _categorical(table: columnar.Chunk, id_column: str, dense: np.ndarray, num_ids: int,
                 id_name: str, dim: int, declared_multi=None, hashed=None, table_name="",
                 numeric=(), vocabularies: dict | None = None):
  """Encodes every non-id column of a side table: specs and arrays indexed by the dense id.

  dense: each row's dense id. declared_multi: the fields declared multi-valued (None:
  inferred, multi-valued when some value holds '|'). Single-valued fields: an empty value is
  the value "" ("missing", its own row). Multi-valued fields: an empty value is no values (all
  slots -1). Fields that `hashed` names as '<table>.<field>' are raw int64 ids of their values
  (`hashing.raw_id`). Columns in `numeric` are left out (`_numeric_columns`). Vocabularies
  are the sorted distinct values; `vocabularies` (when given) receives each vocabulary field's
  values in index order, as '<table>.<field>'.
  """
  path, header = table.reader.path, table.reader.header
  hashed = hashed or {}
  for key in hashed:
    if key.startswith(f"{table_name}.") and key.partition(".")[2] not in header:
      raise DataError(f"{path}: 'hash' names {key!r}, not a column; header is {header}")
  if declared_multi is not None:
    unknown = sorted(set(declared_multi) - set(header) - {id_column})
    if unknown:
      raise DataError(f"{path}: multi_valued names field(s) {unknown} that are not columns; "
                      f"header is {header}")
  specs, arrays = [], {}
  for field in header:
    if field == id_column or field in numeric:
      continue
    text = table.strings(field)
    spec = _hash_spec(hashed, f"{table_name}.{field}", field, dim)
    if spec is not None:
      arr = np.full(num_ids, hashing.raw_id(""), np.int64)  # no row: the missing value
      arr[dense] = hashing.raw_ids(text.to_pylist())
      specs.append(spec)
      arrays[field] = arr
      if vocabularies is not None:
        vocabularies[f"{table_name}.{field}"] = None  # hashed: raw values as they are
      continue
    multi = (field in declared_multi if declared_multi is not None
             else bool(len(text)) and pc.any(pc.match_substring(text, MULTI_SEPARATOR)).as_py())
    if multi:
      arr, vocab = _multi_valued(text, dense, num_ids)
      vocab_size = len(vocab)
    else:
      vocab = columnar.sorted_unique(text)
      arr = np.zeros(num_ids, np.int32)
      arr[dense] = columnar.lookup(text, vocab)
      vocab_size = len(vocab)
      if len(text) >= UNIQUE_FIELD_MIN_ROWS and vocab_size == len(text):
        _warn(f"{path}: column {field!r} has a distinct value on every one of its {len(text)} "
              f"rows: as a categorical field it is a second {id_name} id (free text such as a "
              f"title belongs in a modality); drop the column unless that is intended")
    if vocabularies is not None:
      vocabularies[f"{table_name}.{field}"] = vocab.to_pylist()
    width = arr.shape[1] if multi else 1
    specs.append(FeatureSpec(field, max(1, vocab_size), dim, max_values=width))
    arrays[field] = arr
  return specs, arrays


def _multi_valued(text: pa.Array, dense: np.ndarray, num_ids: int) -> tuple[np.ndarray, pa.Array]:
  """'a|b' values as int32 [num_ids, width] vocabulary indices, -1 padded (width >= 2: a
  multi-valued FeatureSpec has max_values > 1); and the vocabulary (sorted values)."""
  empty = pc.equal(text, "").to_numpy(zero_copy_only=False)
  lists = pc.split_pattern(text, MULTI_SEPARATOR)
  lengths = np.where(empty, 0, pc.list_value_length(lists).to_numpy(zero_copy_only=False))
  flat = pc.list_flatten(lists)
  keep = np.repeat(~empty, pc.list_value_length(lists).to_numpy(zero_copy_only=False))
  values = flat.filter(pa.array(keep))
  vocab = columnar.sorted_unique(values)
  codes = columnar.lookup(values, vocab).astype(np.int32)
  width = max(2, int(lengths.max(initial=1)))
  row = np.repeat(np.arange(len(text)), lengths)
  slot = np.arange(len(codes)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
  arr = np.full((num_ids, width), -1, np.int32)
  arr[dense[row], slot] = codes
  return arr, vocab


def _labels(chunk: columnar.Chunk, config: dict) -> np.ndarray:
  """The chunk's 0/1 labels (the label column, or rating >= threshold), checked."""
  if "label" in config:
    label = chunk.numbers(config["label"], "label")
    chunk.first(~np.isin(label, (0.0, 1.0)), "label must be 0 or 1")
    return label.astype(np.int8)
  ratings = chunk.numbers(config["rating"]["column"], "rating")
  return (ratings >= float(config["rating"]["threshold"])).astype(np.int8)


@dataclasses.dataclass
class _Scan:
  """What the first pass over the interactions finds: users (sorted) with their event
  counts, and the items they name (sorted; used when there is no item table)."""

  users: pa.Array
  user_counts: np.ndarray
  items: pa.Array
  num_events: int


def _scan(reader: columnar.TableReader, config: dict, item_vocab: pa.Array | None) -> _Scan:
  """Pass 1: checks every interaction (one chunk at a time) and counts events per user."""
  counts, items, num_events = [], [], 0
  for chunk in reader.chunks():
    chunk.integers("timestamp", "timestamp")
    _labels(chunk, config)
    item = chunk.strings("item")
    if item_vocab is not None:
      unknown = columnar.lookup(item, item_vocab) < 0
      if unknown.any():
        row = int(np.argmax(unknown))
        raise chunk.reader.error(chunk.first_row + row, f"unknown item id {item[row].as_py()!r} "
                                 f"(not in {config['items']})")
    else:
      items.append(pc.unique(item))
    user = chunk.strings("user")
    chunk.first(pc.equal(user, ""), "empty user id")
    counts.append(pa.table({"user": user}).group_by("user").aggregate([("user", "count")]))
    num_events += chunk.num_rows
    if len(counts) >= 16:  # keep the partial counts compact
      counts = [_sum_counts(counts)]
  if not num_events:
    raise DataError(f"{reader.path}: no interactions")
  table = _sum_counts(counts).sort_by("user")
  users = table.column("user").combine_chunks()
  all_items = (columnar.sorted_unique(pa.chunked_array(items).combine_chunks()) if items
               else item_vocab)
  return _Scan(users, table.column("user_count").to_numpy().astype(np.int64), all_items,
               num_events)


def _sum_counts(tables: list[pa.Table]) -> pa.Table:
  table = pa.concat_tables(tables)
  if len(tables) == 1:
    return table
  return table.group_by("user").aggregate([("user_count", "sum")]).rename_columns(
      ["user", "user_count"])


def _user_table(root: epath.Path, config: dict, users: pa.Array, dim: int, field_dim: int,
                vocabularies: dict | None = None):
  """(user specs, user fields by dense user index): the id, then users.csv's fields (its
  numeric fields as float32, NaN = missing; their specs are `numeric_specs`)."""
  hashed = config.get("hash", {})
  user_id_spec = _hash_spec(hashed, "user", "user_id", dim)
  if user_id_spec is None:
    table = {"user_id": np.arange(len(users), dtype=np.int32)}
    specs = [FeatureSpec("user_id", len(users), dim)]
  else:  # raw ids, in the dense (sorted) order
    table = {"user_id": hashing.raw_ids(users.to_pylist())}
    specs = [user_id_spec]
  if config.get("users"):
    upath = _require(root, config["users"], "users")
    rows = columnar.TableReader(upath, ["user"]).read_all()
    _check_ids(rows, "user", "user")
    dense = columnar.lookup(rows.strings("user"), users)
    known = dense >= 0
    covered = np.zeros(len(users), bool)
    covered[dense[known]] = True
    if not covered.all():
      missing = users.filter(pa.array(~covered))[:5].to_pylist()
      raise DataError(f"{upath}: no row for user id(s) {missing} of the interactions")
    rows = columnar.Chunk(rows.reader, rows.batch.filter(pa.array(known)), 0)
    numeric = numeric_specs(root / CONFIG_FILE, config).get("users", {})
    more_specs, arrays = _categorical(rows, "user", dense[known], len(users), "user",
                                      field_dim, config.get("multi_valued", {}).get("users"),
                                      hashed, "users", numeric, vocabularies)
    specs += more_specs
    table |= arrays
    table |= _numeric_columns(rows, numeric, dense[known], len(users))
  return specs, table


def _modality(root: epath.Path, name: str, files: dict, items: pa.Array) -> np.ndarray:
  """float32 [num_items, D] vectors of one modality by dense item index (zeros where the
  ids file has no row)."""
  vec_path = _require(root, files["vectors"], f"{name} vectors")
  ids_path = _require(root, files["ids"], f"{name} ids")
  vectors = _vectors(vec_path)
  ids = read_ids_file(ids_path)
  if vectors.ndim != 2:
    raise DataError(f"{vec_path}: vectors must be a 2-D array [items, dims], got shape "
                    f"{vectors.shape} (rank {vectors.ndim})")
  if len(vectors) != len(ids):
    raise DataError(f"{vec_path}: {len(vectors)} rows (shape {vectors.shape}) do not match the "
                    f"{len(ids)} ids in {ids_path}")
  finite = np.isfinite(vectors).all(axis=1)
  if not finite.all():
    row = int(np.argmax(~finite))
    raise DataError(f"{vec_path}: row {row} (item {ids[row]!r}) has NaN/inf")
  seen: dict[str, int] = {}
  for row, key in enumerate(ids):
    if key in seen:
      raise DataError(f"{ids_path}:{row + 1}: duplicate item id {key!r}")
    seen[key] = row
  index = columnar.lookup(pa.array(ids, pa.string()), items)
  if (index < 0).any():
    row = int(np.argmax(index < 0))
    raise DataError(f"{ids_path}:{row + 1}: unknown item id {ids[row]!r}")
  table = np.zeros((len(items), vectors.shape[1]), np.float32)
  table[index] = vectors
  return table


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
    hashed = config.get("hash", {})

    path = _require(root, config["interactions"], "interactions")
    label_col = config.get("label") or config["rating"]["column"]
    interactions = columnar.TableReader(path, ["user", "item", "timestamp", label_col])

    # Items: the item table defines the vocabulary when given; otherwise the interactions do.
    numeric = numeric_specs(root / CONFIG_FILE, config)
    items_side, item_specs, item_vocab, item_numeric = {}, [], None, {}
    vocabularies = {}  # raw value -> index maps of the vocabulary fields, for serving
    if config.get("items"):
      ipath = _require(root, config["items"], "items")
      items = columnar.TableReader(ipath, ["item"]).read_all()
      _check_ids(items, "item", "item")
      item_vocab = columnar.sorted_unique(items.strings("item"))
      item_specs, items_side = _categorical(
          items, "item", columnar.lookup(items.strings("item"), item_vocab), len(item_vocab),
          "item", field_dim, config.get("multi_valued", {}).get("items"), hashed, "items",
          numeric.get("items", {}), vocabularies)
      item_numeric = _numeric_columns(items, numeric.get("items", {}),
                                      columnar.lookup(items.strings("item"), item_vocab),
                                      len(item_vocab))
    scan = _scan(interactions, config, item_vocab)
    item_vocab = scan.items
    user_specs, user_table = _user_table(root, config, scan.users, dim, field_dim, vocabularies)
    self.vocabularies = {  # written beside the schema (CtrBuilder)
        "item_id": item_vocab.to_pylist(),
        "user_id": None if _hash_spec(hashed, "user", "user_id", dim) else scan.users.to_pylist(),
        **vocabularies}
    modalities = {name: _modality(root, name, files, item_vocab)
                  for name, files in (config.get("modalities") or {}).items()}

    item_id_spec = _hash_spec(hashed, "item", "item_id", dim)
    schema = FeatureSchema(
        item_numeric=tuple(numeric.get("items", {}).values()),
        user_numeric=tuple(numeric.get("users", {}).values()),
        num_items=len(item_vocab), item_id_dim=dim, seq_len=seq_len,
        item_features=tuple(item_specs), user_features=tuple(user_specs),
        modalities=tuple(ModalitySpec(k, v.shape[1]) for k, v in modalities.items()),
        item_id_hash_buckets=item_id_spec.hash_buckets if item_id_spec else 0,
        item_id_num_hashes=item_id_spec.num_hashes if item_id_spec else 1,
        item_id_hash_seed=item_id_spec.hash_seed if item_id_spec else 0,
    )
    # Raw item ids always: a later build (new items sort in between) maps rows by them.
    catalog = ItemCatalog(items_side, modalities, hashing.raw_ids(item_vocab.to_pylist()),
                          item_numeric)

    # Pass 2: the events by user range on disk, then per partition the examples.
    events = partitions.SpilledEvents(
        str(self.scratch_dir() / "events"),
        tuple(partitions.user_ranges(scan.user_counts, self.partition_events).tolist()))
    for index, chunk in enumerate(interactions.chunks()):
      events.write_chunk(index, columnar.lookup(chunk.strings("user"), scan.users),
                         columnar.lookup(chunk.strings("item"), item_vocab),
                         chunk.integers("timestamp", "timestamp"), _labels(chunk, config))
    duplicates = _duplicate_events(events)
    if duplicates:
      _warn(f"{path}: {duplicates} interaction rows repeat an earlier row's user, item, "
            f"timestamp and label; they are kept, each as its own event and example (a repeat "
            f"can land in two splits): remove them from the file if they are not real repeats")
    examples = _PartitionExamples(events, user_table, seq_len, config.get("split", "per_user"))
    if examples.split == "global_time":
      examples.cuts = partitions.linear_quantiles(
          scan.num_events, sequences.cut_quantiles(),
          lambda ks: partitions.kth_smallest(events.timestamps, ks))
    if numeric:  # normalisations fitted on the training examples only
      user_counts, item_counts = examples.train_counts(len(scan.users), len(item_vocab))
      schema = schema.replace(
          item_numeric=tuple(numeric_lib.fit(s, item_numeric[s.name], item_counts)
                             for s in schema.item_numeric),
          user_numeric=tuple(numeric_lib.fit(s, user_table[s.name], user_counts)
                             for s in schema.user_numeric))
    offsets = examples.offsets(scan.user_counts)
    splits = {name: Parts(events.num_partitions, functools.partial(examples, split=index),
                          offsets[index])
              for index, name in enumerate(sequences.SPLITS)}
    return schema, catalog, splits


def _duplicate_events(events: partitions.SpilledEvents) -> int:
  """How many events repeat an earlier one exactly (user, item, timestamp, label); a user's
  events all lie in one partition, so each is counted partition by partition."""
  repeats = 0
  for p in range(events.num_partitions):
    e = events.load(p)
    if len(e) > 1:
      keys = ("user", "item", "timestamp", "label")
      e = e[np.lexsort([e[k] for k in reversed(keys)])]
      repeats += int(np.logical_and.reduce([e[k][1:] == e[k][:-1] for k in keys]).sum())
  return repeats


@dataclasses.dataclass
class _PartitionExamples:
  """Examples of one split from one partition of the spilled events (picklable: a Beam
  build runs it on its workers)."""

  events: partitions.SpilledEvents
  user_table: dict[str, np.ndarray]
  seq_len: int
  split: str  # 'per_user' | 'global_time'
  cuts: np.ndarray | None = None  # global_time: the cut times of all events

  def __call__(self, partition: int, split: int) -> dict[str, np.ndarray]:
    e = self.events.load(partition)
    split_of = (self.split if self.split == "per_user"
                else sequences.global_time_split(e["timestamp"], cuts=self.cuts))
    return sequences.examples_from_events(
        e["user"], e["item"], e["timestamp"], e["label"], self.user_table, self.seq_len,
        split=split_of)[sequences.SPLITS[split]]

  def train_counts(self, num_users: int, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Training examples per user and per item, summed over the partitions."""
    users, items = np.zeros(num_users, np.int64), np.zeros(num_items, np.int64)
    for p in range(self.events.num_partitions):
      e = self.events.load(p)
      split = (self.split if self.split == "per_user"
               else sequences.global_time_split(e["timestamp"], cuts=self.cuts))
      u, i = numeric_lib.train_counts(e["user"], e["item"], e["timestamp"], num_users,
                                      num_items, split)
      users += u
      items += i
    return users, items

  def offsets(self, user_counts: np.ndarray) -> list[tuple[int, ...]]:
    """Per split, each partition's first key: the number of that split's events in the
    partitions before it (the keys a build of all events at once gives)."""
    starts = np.asarray(self.events.starts)
    if self.split == "per_user":
      n_test, n_val = sequences.per_user_split_sizes(user_counts)
      per_user = np.stack([user_counts - n_test - n_val, n_val, n_test])
      sizes = np.add.reduceat(per_user, starts[:-1], axis=1) if len(starts) > 1 else (
          np.zeros((3, 0), np.int64))
    else:
      sizes = np.zeros((3, self.events.num_partitions), np.int64)
      for p in range(self.events.num_partitions):
        split = sequences.global_time_split(self.events.load(p)["timestamp"], cuts=self.cuts)
        sizes[:, p] = np.bincount(split, minlength=3)
    return [tuple(np.r_[0, np.cumsum(s)[:-1]].astype(int).tolist()) for s in sizes]
