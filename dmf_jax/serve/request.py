"""Request preparation shared by `serving.Server` and `exported.ExportedScorer` (numpy only).

A `RequestLayout` is what serving needs to know of a schema: each user field's vocabulary
size and width, the number of items and the behaviour length L. It checks a request exactly
the same way in both places:

  user/<field>   an integer id in [0, vocab) (single-valued: a scalar) or M ids in [-1, vocab)
                 (multi-valued: shape [M], -1 = empty slot); for a hashed field any raw id,
                 an integer or a string, seen in training or not (hashed here, numpy only)
  user/<numeric> a number, or None (or NaN) for a missing value; inf is rejected
  hist_item_id   a list of item ids in [0, num_items), any length (the last L are kept)
  item ids       a list of N candidate ids in [0, num_items)

Ids may be given as ints or as floats with integral values; anything else (fractional or
non-finite floats, strings, bools, a wrong rank or shape, an out-of-range id) raises a
`ValueError` naming the field. Candidates are scored in a few static candidate sizes: `chunks`
pads them to the smallest size that holds them (the largest size in chunks); a candidate
repeated in a request is scored once (`score_distinct`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from dmf_jax.core import hashing

DEFAULT_CANDIDATE_SIZES = (16, 128, 1024, 4096)


def integer_ids(name: str, value, rank: int) -> np.ndarray:
  """`value` as int64 ids of rank `rank`; raises naming `name` if it is not that."""
  arr = np.asarray(value)
  if arr.size == 0 and arr.ndim == rank:
    return arr.astype(np.int64)
  if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
    raise ValueError(f"{name}: expected integer ids, got {arr.dtype} values")
  if arr.ndim != rank:
    want = "a scalar" if rank == 0 else f"rank {rank}"
    raise ValueError(f"{name}: expected {want}, got shape {arr.shape}")
  if arr.dtype.kind == "f":
    bad = ~np.isfinite(arr) | (arr != np.round(arr))
    if bad.any():
      raise ValueError(f"{name}: ids must be integers, got {arr[bad].reshape(-1)[0].item()!r}")
  return arr.astype(np.int64)


class MissingFeatureError(KeyError, ValueError):
  """A request lacks a user feature."""


def check_range(name: str, ids: np.ndarray, high: int, *, padding: bool = False,
                what: str = "item id") -> None:
  """Raises unless every id is in [0, high) (or -1 with `padding`)."""
  bad = (ids < (-1 if padding else 0)) | (ids >= high)
  if bad.any():
    first = int(ids[bad].reshape(-1)[0])
    if what == "item id":
      raise ValueError(f"{name}: item id {first} is out of range [0, {high})")
    raise ValueError(f"{name}: value out of range [0, {high})"
                     + (" or -1 (empty slot)" if padding else "") + f": got {first}")


@dataclasses.dataclass(frozen=True)
class UserField:
  key: str  # user/<field>
  vocab_size: int
  max_values: int = 1
  multi_valued: bool = False
  hash_buckets: int = 0  # > 0: a hashed field (`FeatureSpec`): any raw id is valid
  num_hashes: int = 1
  hash_seed: int = 0

  @property
  def shape(self) -> tuple[int, ...]:
    return (self.max_values,) if self.multi_valued and not self.hash_buckets else ()

  def hashed_rows(self, value) -> np.ndarray:
    """A hashed field's raw id (an int, or a str) -> its rows int32 [] or [num_hashes]."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
      value = value.item()
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    try:
      raw = hashing.raw_id(value)
    except ValueError:
      raise ValueError(f"{self.key}: a hashed field takes one raw id (an integer or a string), "
                       f"got {value!r}") from None
    return hashing.hash_rows(np.int64(raw), self.hash_buckets, seed=self.hash_seed,
                             num_hashes=self.num_hashes)


def numeric_value(name: str, value) -> np.float32:
  """A numeric user field's value: a finite number, or None / NaN (missing) -> float32."""
  if value is None:
    return np.float32(np.nan)
  arr = np.asarray(value)
  if arr.ndim != 0 or arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
    raise ValueError(f"{name}: expected a number or None (missing), got {value!r}")
  if np.isinf(arr):
    raise ValueError(f"{name}: {value!r} is not finite (give None for a missing value)")
  return np.float32(arr)


@dataclasses.dataclass(frozen=True)
class RequestLayout:
  user_fields: tuple[UserField, ...]
  num_items: int
  seq_len: int
  numeric_fields: tuple[str, ...] = ()  # user/<name> of the numeric user fields

  @classmethod
  def from_schema(cls, schema) -> "RequestLayout":
    return cls(tuple(UserField(f"user/{f.name}", f.vocab_size, f.max_values, f.multi_valued,
                               f.hash_buckets, f.num_hashes, f.hash_seed)
                     for f in schema.user_features), schema.num_items, schema.seq_len,
               tuple(f"user/{f.name}" for f in schema.user_numeric))

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping) -> "RequestLayout":
    return cls(tuple(UserField(**f) for f in d["user_fields"]), int(d["num_items"]),
               int(d["seq_len"]), tuple(d.get("numeric_fields", ())))

  def user_features(self, user: Mapping) -> dict[str, np.ndarray]:
    """Checked, padded request features: user/<field>, hist_item_id int32 [L], hist_mask [L]."""
    if not isinstance(user, Mapping):
      raise ValueError(f"the user must be a dict of features, got {type(user).__name__}")
    unknown = sorted(set(user) - set(self.feature_keys()) - {"hist_item_id"}, key=str)
    if unknown:
      raise ValueError(f"unknown user features {unknown}: this model reads "
                       f"{self.feature_keys()} and hist_item_id (misspelt?)")
    out = {}
    for field in self.user_fields:
      if field.key not in user:
        raise MissingFeatureError(f"user features miss {field.key!r}; expected "
                                  f"{self.feature_keys()} and hist_item_id")
      if field.hash_buckets:
        out[field.key] = field.hashed_rows(user[field.key])
        continue
      value = integer_ids(field.key, user[field.key], len(field.shape))
      if value.shape != field.shape:
        raise ValueError(f"{field.key}: expected shape {field.shape}, got {value.shape}")
      check_range(field.key, value, field.vocab_size, padding=field.multi_valued, what="value")
      out[field.key] = value.astype(np.int32)
    for key in self.numeric_fields:
      if key not in user:
        raise MissingFeatureError(f"user features miss {key!r} (None for a missing value); "
                                  f"expected {self.feature_keys()} and hist_item_id")
      out[key] = numeric_value(key, user[key])
    history = self.item_ids("hist_item_id", user.get("hist_item_id", []))[-self.seq_len:]
    padded = np.zeros(self.seq_len, np.int32)
    padded[:len(history)] = history
    out["hist_item_id"] = padded
    out["hist_mask"] = np.arange(self.seq_len) < len(history)
    return out

  def feature_keys(self) -> list[str]:
    return [f.key for f in self.user_fields] + list(self.numeric_fields)

  def item_ids(self, name: str, ids) -> np.ndarray:
    """A list of item ids, checked: int64 [N]."""
    ids = integer_ids(name, ids, 1)
    check_range(name, ids, self.num_items)
    return ids

  def example_user(self) -> dict:
    """A valid request (every field 0 or empty, no history), e.g. for tracing."""
    user = {f.key: 0 if f.hash_buckets else np.zeros(f.shape, np.int32) for f in self.user_fields}
    return user | {key: 0.0 for key in self.numeric_fields}


def check_user_state(user_state) -> None:
  """Raises a `ValueError` for a user state that `encode_user` cannot have returned (None)."""
  if user_state is None:
    raise ValueError("score: user_state is None; pass what encode_user(user) returned")


def check_candidate_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
  """The padded candidate counts a server compiles for, sorted; positive integers."""
  if not sizes or any(int(n) != n or n < 1 for n in sizes):
    raise ValueError(f"candidate sizes must be positive integers, got {list(sizes)}")
  return tuple(sorted(int(n) for n in sizes))


def score_distinct(ids: np.ndarray, score_padded: Callable[[np.ndarray], np.ndarray],
                   sizes: Sequence[int]) -> np.ndarray:
  """Logits [N] of candidate ids [N], each distinct id scored once: a request's candidates may
  repeat (merged from several retrieval sources), and a candidate's logit does not depend on
  the others. `score_padded(padded ids)` scores one chunk of `chunks`; the logits come back in
  the request's order. Without repeats the ids are scored as given."""
  distinct, position = np.unique(ids, return_inverse=True)
  if len(distinct) == len(ids):
    distinct, position = ids, None
  out = [np.asarray(score_padded(padded))[:n] for padded, n in chunks(distinct, sizes)]
  logits = np.concatenate(out) if out else np.zeros(0, np.float32)
  return logits if position is None else logits[position.reshape(-1)]


def chunks(ids: np.ndarray, sizes: Sequence[int]) -> Iterator[tuple[np.ndarray, int]]:
  """(ids padded with 0 to a candidate size, int32; how many are real) per chunk of the
  largest size (sizes: sorted, `check_candidate_sizes`)."""
  largest = sizes[-1]
  for start in range(0, len(ids), largest):
    chunk = ids[start:start + largest]
    size = next(n for n in sizes if n >= len(chunk))
    padded = np.zeros(size, np.int32)
    padded[:len(chunk)] = chunk
    yield padded, len(chunk)
