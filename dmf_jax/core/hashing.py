"""Seeded id hashing for hashed embedding fields (numpy, vectorised; no jax).

A hashed field keeps the *raw* id of each value in the records and hashes it when it is read,
so a table of a fixed number of rows takes ids never seen when it was built (new users, new
items, a later build with more ids). Two steps, both deterministic across machines:

  raw id     raw(v) = the first 8 bytes (little-endian, signed) of BLAKE2b(str(v), utf-8)
             for a string or an integer v (an integer by its decimal form, so 42 and "42"
             are the same id); `raw_ids` maps many at once.
  row        h_k(x) = splitmix64(uint64(x) XOR key_k) mod buckets,   k = 0 .. num_hashes - 1
             key_k  = splitmix64(0x9E3779B97F4A7C15 * (seed + 1) + k)   (uint64 arithmetic)

splitmix64 is the finalizer of Steele et al.'s SplitMix64 (full avalanche: every input bit
flips each output bit with probability ~1/2), so rows of distinct raw ids behave like
independent uniform draws: n ids in m buckets leave m (1 - (1 - 1/m)^n) rows in use. With
num_hashes = 2 a value's embedding is the sum of two rows of the same table (`FeatureSpec`:
a hashed field's value is its num_hashes rows, pooled by sum): two values then share their
whole embedding only if both rows collide (probability ~1/m^2 per pair instead of 1/m).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
  """The SplitMix64 finalizer: uint64 [...] -> uint64 [...] (wrapping arithmetic)."""
  x = np.asarray(x, np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def raw_id(value) -> int:
  """The raw 64-bit id of one value (a str, or an integer given by its decimal form)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (str, int, np.integer)):
    raise ValueError(f"a hashed id must be a string or an integer, got {value!r}")
  digest = hashlib.blake2b(str(value).encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little", signed=True)


def raw_ids(values: Iterable) -> np.ndarray:
  """`raw_id` of each value: int64 [n]."""
  return np.fromiter((raw_id(v) for v in values), np.int64)


def hash_keys(seed: int, num_hashes: int) -> np.ndarray:
  """key_k for k < num_hashes: uint64 [num_hashes]."""
  with np.errstate(over="ignore"):
    base = GOLDEN * np.uint64(int(seed) + 1)
    return splitmix64(base + np.arange(num_hashes, dtype=np.uint64))


def hash_rows(raw: np.ndarray, buckets: int, *, seed: int = 0, num_hashes: int = 1
              ) -> np.ndarray:
  """Rows of raw ids in a table of `buckets` rows: int64 [...] -> int32 [...] (one hash) or
  int32 [..., num_hashes]."""
  if buckets < 1 or num_hashes < 1:
    raise ValueError(f"hash buckets ({buckets}) and num_hashes ({num_hashes}) must be >= 1")
  x = np.asarray(raw).astype(np.int64).view(np.uint64)[..., None]
  rows = (splitmix64(x ^ hash_keys(seed, num_hashes)) % np.uint64(buckets)).astype(np.int32)
  return rows[..., 0] if num_hashes == 1 else rows


def expected_rows_in_use(num_ids: int, buckets: int) -> float:
  """m (1 - (1 - 1/m)^n): the expected number of rows n distinct ids fill (uniform hashing)."""
  return buckets * -np.expm1(num_ids * np.log1p(-1.0 / buckets))


def fold32(raw: np.ndarray) -> np.ndarray:
  """A raw id folded to 32 bits, x ^ (x >> 32): int64 [...] -> int32 [...] (groups examples by
  user for GAUC when the user id is hashed)."""
  raw = np.asarray(raw, np.int64)
  return (raw ^ (raw >> 32)).astype(np.int32)


def match_raw_ids(new: np.ndarray, old: np.ndarray) -> np.ndarray:
  """For each raw id of `new` [n], its position in `old` [m] (-1 when absent): int64 [n]
  (e.g. an item's row in an earlier build's catalog, whatever order each build sorted in)."""
  new, old = np.asarray(new, np.int64), np.asarray(old, np.int64)
  if not len(old):
    return np.full(len(new), -1, np.int64)
  order = np.argsort(old, kind="stable")
  at = np.minimum(np.searchsorted(old[order], new), len(old) - 1)
  return np.where(old[order][at] == new, order[at], -1)
