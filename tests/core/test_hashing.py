"""Hashed id tables: the documented hash, its determinism and seeding, collision rates."""

import hashlib

import numpy as np
import pytest

from dmf_jax.core import hashing
from dmf_jax.core.schema import FeatureSpec

U64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
  """Python ints, masked to 64 bits: the published SplitMix64 finalizer."""
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
  return x ^ (x >> 31)


def test_hash_follows_the_documented_formula():
  rng = np.random.default_rng(0)
  raw = rng.integers(-(1 << 63), (1 << 63) - 1, 200, dtype=np.int64)
  for seed, num_hashes, buckets in ((0, 1, 97), (7, 2, 1 << 20), (123, 3, 5)):
    rows = hashing.hash_rows(raw, buckets, seed=seed, num_hashes=num_hashes).reshape(len(raw), -1)
    for x, row in zip(raw.tolist(), rows):
      for k in range(num_hashes):
        key = splitmix64_reference((0x9E3779B97F4A7C15 * (seed + 1) + k) & U64)
        assert row[k] == splitmix64_reference((x & U64) ^ key) % buckets
  # The known SplitMix64 value: splitmix64(0x9E3779B97F4A7C15) is the generator's first output
  # from state 0.
  assert int(hashing.splitmix64(np.uint64(0x9E3779B97F4A7C15))) == 0xE220A8397B1DCDAF


def test_raw_ids_are_blake2b_of_the_decimal_or_string_form():
  for value in (0, 42, -7, "42", "user-é", 10**18):
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    assert hashing.raw_id(value) == int.from_bytes(digest, "little", signed=True)
  assert hashing.raw_id(42) == hashing.raw_id("42") == hashing.raw_id(np.int64(42))
  for bad in (1.5, True, None, [1]):
    with pytest.raises(ValueError, match="string or an integer"):
      hashing.raw_id(bad)


def test_deterministic_and_seeded():
  raw = hashing.raw_ids(range(5000))
  a = hashing.hash_rows(raw, 1000, seed=1, num_hashes=2)
  np.testing.assert_array_equal(a, hashing.hash_rows(raw, 1000, seed=1, num_hashes=2))
  b = hashing.hash_rows(raw, 1000, seed=2, num_hashes=2)
  assert np.mean(a == b) < 0.01  # another seed: another assignment (chance: 1/1000)
  assert np.mean(a[:, 0] == a[:, 1]) < 0.01  # the two hashes are independent
  assert a.dtype == np.int32 and a.min() >= 0 and a.max() < 1000


@pytest.mark.parametrize("num_ids,buckets", [(100_000, 50_000), (20_000, 1 << 16), (3000, 300)])
def test_rows_in_use_match_uniform_hashing(num_ids, buckets):
  """Distinct random ids fill m (1 - (1 - 1/m)^n) rows, within 5 standard deviations."""
  raw = np.unique(np.random.default_rng(num_ids).integers(-(1 << 62), 1 << 62, num_ids))
  used = len(np.unique(hashing.hash_rows(raw, buckets)))
  expected = hashing.expected_rows_in_use(len(raw), buckets)
  # Variance of the number of empty bins (occupancy problem), bounded by the mean's.
  std = np.sqrt(buckets * np.exp(-len(raw) / buckets))
  assert abs(used - expected) < 5 * std + 1, (used, expected, std)


def test_two_hashes_make_full_collisions_rare():
  raw = hashing.raw_ids(range(20_000))
  one = hashing.hash_rows(raw, 10_000)
  two = hashing.hash_rows(raw, 10_000, num_hashes=2)
  share_one = 1 - len(np.unique(one)) / len(raw)
  pairs = two[:, 0].astype(np.int64) * 10_000 + two[:, 1]
  share_two = 1 - len(np.unique(pairs)) / len(raw)
  assert share_one > 0.4 and share_two < 0.001  # theory: ~0.57 and ~1e-4


def test_hashed_spec_rules():
  spec = FeatureSpec.hashed_field("user_id", 1000, 8, num_hashes=2, seed=3)
  assert spec.hashed and spec.vocab_size == 1000 and spec.max_values == 2 and spec.raw_width == 2
  np.testing.assert_array_equal(spec.rows(np.array([5, 6])),
                                hashing.hash_rows(np.array([5, 6]), 1000, seed=3, num_hashes=2))
  with pytest.raises(ValueError, match="hashed field has vocab_size = hash_buckets"):
    FeatureSpec("user_id", 10, 8, hash_buckets=1000)
  with pytest.raises(ValueError, match="num_hashes: only for hashed fields"):
    FeatureSpec("user_id", 10, 8, num_hashes=2)


def test_raw_ids_are_matched_across_builds_in_any_order():
  """Warm starts map an item's row in a newer build to its row in the older one by raw id
  (BYOD sorts its ids, so a new id shifts the rows after it)."""
  old = hashing.raw_ids(["i0", "i1", "i3"])
  new = hashing.raw_ids(["i0", "i0a", "i1", "i2", "i3"])
  np.testing.assert_array_equal(hashing.match_raw_ids(new, old), [0, -1, 1, -1, 2])
  np.testing.assert_array_equal(hashing.match_raw_ids(new, old[:0]), [-1] * 5)
