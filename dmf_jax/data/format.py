"""The on-disk contract of a CTR dataset built with TFDS (ArrayRecord, no TensorFlow).

A built dataset directory holds, besides TFDS's own files:
  <split>.array_record-*     one record per impression: user_features (all user fields
                             packed in schema order, multi-valued ones with their M slots),
                             item_id, timestamp, hist_item_id (the user's earlier positives,
                             most recent last, variable length), label; int vectors are stored
                             as raw int32 bytes
  dmf_schema.json            the `FeatureSchema` (vocab sizes, dims, modalities, seq_len)
  dmf_catalog.npz            the `ItemCatalog`: side/<field>, numeric/<field> and
                             modality/<name> arrays (and raw_ids, each item's raw 64-bit id,
                             for hashed item ids)

User numeric fields are packed after the categorical ones in `user_features`, one float32 per
field (its bits as an int32 slot; NaN = missing).

Both side files are written into TFDS's incomplete directory during the build, so they appear
atomically with the records (a failed build leaves nothing behind).

`RecordParser` turns a list of serialized records into one padded, masked numpy batch. It parses
the `tf.train.Example` protos directly (about 13 us per record here, against about 97 us through
TFDS's generic feature decoding); a test checks it against `tfds.data_source` decoding.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

from typing import TYPE_CHECKING

import numpy as np
from etils import epath

from dmf_jax.core import hashing
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.core.errors import DataError
from dmf_jax.core.schema import FeatureSchema, FeatureSpec, ModalitySpec, NumericSpec

# TFDS is imported where it is used, so the rest of this module (and data.synthetic) loads
# without it.
if TYPE_CHECKING:
  import tensorflow_datasets as tfds

SCHEMA_FILE = "dmf_schema.json"
CATALOG_FILE = "dmf_catalog.npz"


def example_features() -> tfds.features.FeaturesDict:
  """The TFDS features of one impression record (the same for every dataset)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  int_vector = dict(shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES)
  return tfds.features.FeaturesDict({
      "user_features": tfds.features.Tensor(**int_vector),
      "item_id": tfds.features.Scalar(np.int32),
      "timestamp": tfds.features.Scalar(np.int64),
      "hist_item_id": tfds.features.Tensor(**int_vector),
      "label": tfds.features.Scalar(np.float32),
  })


def pack_user_features(schema: FeatureSchema, rows: dict[str, np.ndarray], i: int) -> np.ndarray:
  """Row i's user fields concatenated in schema order: int32 [sum of raw widths] (a hashed
  field's raw int64 id as two int32 slots, little-endian; then each numeric field's float32
  bits)."""
  parts = [np.atleast_1d(np.asarray(rows[f"user/{f.name}"][i], np.int64 if f.hashed else np.int32))
           .view(np.int32) for f in schema.user_features]
  parts += [np.atleast_1d(np.asarray(rows[f"user/{f.name}"][i], np.float32)).view(np.int32)
            for f in schema.user_numeric]
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def schema_to_json(schema: FeatureSchema) -> str:
  return json.dumps(dataclasses.asdict(schema), indent=2)


def schema_from_json(text: str) -> FeatureSchema:
  raw = json.loads(text)
  return FeatureSchema(
      num_items=raw["num_items"],
      item_id_dim=raw["item_id_dim"],
      seq_len=raw["seq_len"],
      item_features=tuple(FeatureSpec(**f) for f in raw["item_features"]),
      user_features=tuple(FeatureSpec(**f) for f in raw["user_features"]),
      modalities=tuple(ModalitySpec(**m) for m in raw["modalities"]),
      item_numeric=tuple(_numeric_spec(f) for f in raw.get("item_numeric", ())),
      user_numeric=tuple(_numeric_spec(f) for f in raw.get("user_numeric", ())),
      **{k: raw[k] for k in ("item_id_hash_buckets", "item_id_num_hashes", "item_id_hash_seed")
         if k in raw},
  )


def _numeric_spec(raw: dict) -> NumericSpec:
  return NumericSpec(**{**raw, "boundaries": tuple(raw.get("boundaries", ()))})


VOCABULARY_FILE = "dmf_vocabularies.json"


def write_vocabularies(directory: epath.PathLike, vocabularies: dict) -> None:
  """`VOCABULARY_FILE` in a build: {'item_id' | 'user_id' | 'items.<field>' | 'users.<field>':
  the raw values in index order (value i has index i), or None for a hashed field (which
  takes raw values as they are)}. Builds from your own files write it (byod_ctr)."""
  (epath.Path(directory) / VOCABULARY_FILE).write_text(json.dumps(vocabularies))


def read_vocabularies(directory: epath.PathLike) -> dict[str, dict[str, int] | None]:
  """A build's raw value -> index maps ({field: {raw value: index}}, None for a hashed field;
  `write_vocabularies`): what `Server.encode_user` and `score` take as ids. Raises
  `DataError` for a build without them (generated data, or a build made before they were
  recorded: rebuild it)."""
  path = epath.Path(directory) / VOCABULARY_FILE
  if not path.exists():
    raise DataError(f"{path} is missing: only builds of your own files (byod_ctr) made by this "
                    f"version record their vocabularies; rebuild it (move its folder away first)")
  return {field: None if values is None else {v: i for i, v in enumerate(values)}
          for field, values in json.loads(path.read_text()).items()}


def write_side_files(directory: epath.PathLike, schema: FeatureSchema, catalog: ItemCatalog) -> None:
  """Validates and writes the schema and the catalog next to the records."""
  catalog.validate(schema)
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / SCHEMA_FILE).write_text(schema_to_json(schema))
  arrays = {f"side/{k}": np.asarray(v) for k, v in catalog.side.items()}
  arrays |= {f"modality/{k}": np.asarray(v, np.float32) for k, v in catalog.modalities.items()}
  arrays |= {f"numeric/{k}": np.asarray(v, np.float32) for k, v in catalog.numeric.items()}
  if catalog.raw_ids is not None:
    arrays["raw_ids"] = np.asarray(catalog.raw_ids, np.int64)
  with (directory / CATALOG_FILE).open("wb") as f:
    np.savez(f, **arrays)


def read_side_files(directory: epath.PathLike) -> tuple[FeatureSchema, ItemCatalog]:
  """Loads and validates the schema and catalog of a built dataset directory."""
  directory = epath.Path(directory)
  for name in (SCHEMA_FILE, CATALOG_FILE):
    if not (directory / name).exists():
      raise FileNotFoundError(
          f"{directory / name} is missing: {directory} is not a dataset built by dmf_jax "
          f"(expected {SCHEMA_FILE} and {CATALOG_FILE} beside the ArrayRecord files)"
      )
  schema = schema_from_json((directory / SCHEMA_FILE).read_text())
  try:
    with (directory / CATALOG_FILE).open("rb") as f:
      npz = np.load(f)
      side = {k[5:]: npz[k] for k in npz.files if k.startswith("side/")}
      mods = {k[9:]: npz[k] for k in npz.files if k.startswith("modality/")}
      raw_ids = npz["raw_ids"] if "raw_ids" in npz.files else None
      numeric = {k[8:]: npz[k] for k in npz.files if k.startswith("numeric/")}
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"{directory / CATALOG_FILE} is corrupt: {e}") from e
  catalog = ItemCatalog(side, mods, raw_ids, numeric)
  catalog.validate(schema)
  return schema, catalog


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
  """A built dataset: its schema, catalog and a `tfds.data_source` per split.

  config: the builder config (build) name; fingerprint: identifies the build's content (its
  sources, schema and catalog; `dmf_jax.data.prepare` fills it in).
  """

  name: str
  directory: epath.Path
  schema: FeatureSchema
  catalog: ItemCatalog
  sources: dict
  config: str | None = None
  fingerprint: str = ""

  @property
  def full_name(self) -> str:
    """name/config, e.g. 'movielens_100k_mm/text_image' or 'byod_ctr/src-1a2b3c4d5e6f'."""
    return f"{self.name}/{self.config}" if self.config else self.name

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self.sources)


def load_built_dataset(builder: tfds.core.DatasetBuilder) -> BuiltDataset:
  """Reads a prepared builder's splits with `tfds.data_source` plus its side files."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  directory = epath.Path(builder.data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {builder.name!r} is not built under {directory}; build it first "
        f"(see README: data preparation)"
    )
  schema, catalog = read_side_files(directory)
  kwargs = {"version": str(builder.version)}
  if builder.builder_config is not None:
    kwargs["config"] = builder.builder_config
  sources = tfds.data_source(builder.name, data_dir=builder.data_dir_root, builder_kwargs=kwargs)
  config = builder.builder_config.name if builder.builder_config is not None else None
  return BuiltDataset(builder.name, directory, schema, catalog, dict(sources), config)


def raw_records(source) -> "RawRecords":
  """The serialized-record view of a `tfds.data_source` split (no TFDS feature decoding)."""
  return RawRecords(source)


class RawRecords:
  """Random access to serialized records: len(), records[i], records.read(indices)."""

  def __init__(self, source):
    inner = getattr(source, "data_source", None)
    if inner is None or not hasattr(inner, "__getitems__"):
      raise TypeError(f"{source!r} is not an ArrayRecord-backed tfds.data_source split")
    self._inner = inner
    self._length = len(source)
    self.name = repr(source)

  def __len__(self) -> int:
    return self._length

  def read(self, indices: Sequence[int]) -> list[bytes]:
    return self._inner.__getitems__(list(indices))

  def __getitem__(self, index: int) -> bytes:
    return self.read([index])[0]


def model_user_fields(schema: FeatureSchema, raw: dict[str, np.ndarray], n: int
                      ) -> dict[str, np.ndarray]:
  """User fields as read ({user/<name>: [n] or [n, M]}, a hashed field's raw int64 ids) -> as
  the model takes them (a hashed field's rows), plus `group` int32 [n]: the user of each
  example for GAUC (the user_id field, or a hashed user_id's raw id folded to 32 bits)."""
  out = {}
  for spec in schema.user_features:
    key = f"user/{spec.name}"
    out[key] = spec.rows(raw[key]) if spec.hashed else raw[key]
  if "user/user_id" not in raw:
    out["group"] = np.zeros(n, np.int32)
  else:
    user_id = raw["user/user_id"]
    hashed = next(f for f in schema.user_features if f.name == "user_id").hashed
    out["group"] = hashing.fold32(user_id) if hashed else user_id
  return out


class RecordParser:
  """Serialized impression records -> one batch of numpy arrays padded to `seq_len`.

  Output keys: user/<field> [B] or [B, M] (a hashed field: its rows [B] or [B, num_hashes],
  hashed from the raw ids in the records; a numeric field: float32 [B], NaN = missing), item_id [B], timestamp [B], hist_item_id [B, L]
  (chronological, padding 0 after), hist_mask bool [B, L], label [B], weight [B] (ones), and
  `group` int32 [B]: the user an example belongs to (GAUC): the user_id field, or for a hashed
  user_id the raw id folded to 32 bits (x ^ x >> 32).
  Histories longer than L keep their last L items.
  """

  def __init__(self, schema: FeatureSchema, seq_len: int | None = None):
    self.schema = schema
    self.seq_len = seq_len or schema.seq_len
    self._user_width = int(sum(f.raw_width for f in schema.user_features)
                           + len(schema.user_numeric))
    self._user_slices = []
    offset = 0
    for spec in schema.user_features:
      self._user_slices.append((spec, offset))
      offset += spec.raw_width
    self._numeric_offset = offset

  def __call__(self, records: Sequence[bytes]) -> dict[str, np.ndarray]:
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel

    n, seq_len = len(records), self.seq_len
    # Column by column over the parsed protos; the int vectors are joined and decoded at once.
    features = [tf_example_pb2.Example.FromString(r).features.feature for r in records]
    packed = [f["user_features"].bytes_list.value[0] for f in features]
    bad = [i for i, b in enumerate(packed) if len(b) != 4 * self._user_width]
    if bad:
      raise ValueError(f"record {bad[0]}: {len(packed[bad[0]]) // 4} user feature values, schema "
                       f"expects {self._user_width}: the records do not match dmf_schema.json")
    users = np.frombuffer(b"".join(packed), np.int32).reshape(n, self._user_width)
    item = np.array([f["item_id"].int64_list.value[0] for f in features], np.int32)
    ts = np.array([f["timestamp"].int64_list.value[0] for f in features], np.int64)
    label = np.array([f["label"].float_list.value[0] for f in features], np.float32)
    hist, lengths = self._histories([f["hist_item_id"].bytes_list.value[0] for f in features])
    raw = {}
    for spec, start in self._user_slices:
      values = users[:, start:start + spec.raw_width]
      if spec.hashed:
        values = np.ascontiguousarray(values).view(np.int64)[:, 0]
      elif not spec.multi_valued:
        values = values[:, 0]
      raw[f"user/{spec.name}"] = values
    out = model_user_fields(self.schema, raw, n)
    for k, spec in enumerate(self.schema.user_numeric):
      column = self._numeric_offset + k
      out[f"user/{spec.name}"] = np.ascontiguousarray(users[:, column]).view(np.float32)
    out.update(
        item_id=item, timestamp=ts, label=label, hist_item_id=hist,
        hist_mask=np.arange(seq_len)[None, :] < lengths[:, None],
        weight=np.ones(n, np.float32),
    )
    return out

  def _histories(self, raw: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Raw int32 histories -> (the last L ids of each, left-aligned and 0-padded, int32 [B, L];
    the kept lengths [B])."""
    seq_len = self.seq_len
    sizes = np.array([len(b) for b in raw], np.int64) // 4
    flat = np.frombuffer(b"".join(raw) + bytes(4), np.int32)  # one spare 0 for empty batches
    kept = np.minimum(sizes, seq_len)
    first = np.cumsum(sizes) - kept  # where each history's kept tail starts in `flat`
    slots = np.arange(seq_len)[None, :]
    valid = slots < kept[:, None]
    hist = np.where(valid, flat[np.where(valid, first[:, None] + slots, len(flat) - 1)], 0)
    return hist.astype(np.int32), kept.astype(np.int32)
