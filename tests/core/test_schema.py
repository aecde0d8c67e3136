"""The feature schema (`core.schema`): widths, batch keys and the hashed item-id spec derived
from the declared fields; every bad spec is refused with the field named."""

import numpy as np
import pytest

from dmf_jax.core.schema import FeatureSchema, FeatureSpec, ModalitySpec, NumericSpec


def schema(**changes):
  fields = dict(
      num_items=50, item_id_dim=8, seq_len=6,
      item_features=(FeatureSpec("category", 5, 4), FeatureSpec("tags", 7, 3, max_values=3)),
      user_features=(FeatureSpec("group", 4, 2),),
      item_numeric=(NumericSpec("price"), NumericSpec("rank", "bucketize", dim=5)),
      user_numeric=(NumericSpec("age"),),
      modalities=(ModalitySpec("text", 16), ModalitySpec("image", 12)))
  return FeatureSchema(**(fields | changes))


def test_widths_and_batch_keys_follow_the_declared_fields():
  s = schema()
  assert s.item_dim == 8 + 4 + 3 + 2 + 5  # id, side fields, [z ; missing], rank's embedding
  assert s.user_dim == 2 + 2
  assert s.batch_keys() == ("user/group", "user/age", "item_id", "hist_item_id", "hist_mask",
                            "label", "weight")
  assert s.item_id_spec == FeatureSpec("item_id", 50, 8)
  assert s.with_modalities(["image"]).modality_names == ("image",)
  with pytest.raises(ValueError, match=r"unknown modalities \['audio'\]"):
    s.with_modalities(["audio"])


def test_a_hashed_item_id_table_has_its_own_rows_and_sums_its_hashes():
  spec = schema(item_id_hash_buckets=64, item_id_num_hashes=2, item_id_hash_seed=3).item_id_spec
  assert spec.hashed and (spec.vocab_size, spec.max_values, spec.pooling) == (64, 2, "sum")
  assert spec.raw_width == 2  # a raw 64-bit id in two int32 slots
  rows = spec.rows(np.asarray([1, 2**40 + 7, 1], np.int64))
  assert rows.shape == (3, 2) and rows.dtype == np.int32 and ((0 <= rows) & (rows < 64)).all()
  np.testing.assert_array_equal(rows[0], rows[2])  # the same id, the same rows


@pytest.mark.parametrize("make,message", [
    (lambda: FeatureSpec("a/b", 3, 2), r"FeatureSpec.name: invalid name 'a/b'"),
    (lambda: FeatureSpec("c", 0, 2), r"FeatureSpec\(c\).vocab_size: must be a positive int"),
    (lambda: FeatureSpec("c", 3, 2, pooling="max"), r"FeatureSpec\(c\).pooling: 'max'"),
    (lambda: FeatureSpec("c", 3, 2, num_hashes=2), r"FeatureSpec\(c\).num_hashes: only for"),
    (lambda: FeatureSpec("c", 3, 2, hash_buckets=8), r"FeatureSpec\(c\): a hashed field"),
    (lambda: NumericSpec("p", "zscore"), r"NumericSpec\(p\).normalization: 'zscore'"),
    (lambda: NumericSpec("p", scale=0.0), r"NumericSpec\(p\): center and scale must be"),
    (lambda: NumericSpec("p", boundaries=(1.0, 1.0)), r"NumericSpec\(p\).boundaries"),
    (lambda: ModalitySpec("text", 0), r"ModalitySpec\(text\).dim: must be a positive int"),
    (lambda: schema(seq_len=0), r"FeatureSchema.seq_len: must be a positive int"),
    (lambda: schema(modalities=(ModalitySpec("t", 2), ModalitySpec("t", 3))),
     r"FeatureSchema.modalities: duplicate names \['t'\]"),
    (lambda: schema(user_numeric=(NumericSpec("group"),)),
     r"FeatureSchema: user field names \['group'\] are used twice"),
])
def test_bad_specs_are_refused_naming_the_field(make, message):
  with pytest.raises(ValueError, match=message):
    make()
