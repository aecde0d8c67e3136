"""Numeric features: fitting on the training split only, missing values, BYOD errors, records."""

import json

import numpy as np
import pytest

from dmf_jax.core.errors import DataError
from dmf_jax.core.schema import NumericSpec
from dmf_jax.data import format as data_format
from dmf_jax.data import numeric
from dmf_jax.data import sequences
from tests.data.test_byod import build, write_config, write_example

ITEMS = ["item,category,price", "i0,drama,10", "i1,comedy,", "i2,drama,1000", "i3,action,2.5"]
USERS = ["user,country,age_years", "u0,fr,31", "u1,de,", "u2,fr,58.5"]
NUMERIC = {"items": {"price": "log1p"}, "users": ["age_years"]}


def test_fit_matches_numpy_on_the_weighted_sample():
  rng = np.random.default_rng(0)
  values = rng.lognormal(size=50)
  values[[3, 7]] = np.nan
  counts = rng.integers(0, 5, size=50)
  sample = np.repeat(values, counts)
  sample = sample[~np.isnan(sample)]
  standard = numeric.fit(NumericSpec("x"), values, counts)
  np.testing.assert_allclose([standard.center, standard.scale], [sample.mean(), sample.std()])
  log = numeric.fit(NumericSpec("x", "log1p"), values, counts)
  np.testing.assert_allclose([log.center, log.scale],
                             [np.log1p(sample).mean(), np.log1p(sample).std()])
  minmax = numeric.fit(NumericSpec("x", "minmax"), values, counts)
  np.testing.assert_allclose([minmax.center, minmax.scale], [sample.min(), np.ptp(sample)])
  buckets = numeric.fit(NumericSpec("x", "bucketize", num_buckets=4), values, counts)
  np.testing.assert_allclose(buckets.boundaries, np.unique(
      np.quantile(sample, [0.25, 0.5, 0.75], method="inverted_cdf")))
  # Entities without training examples do not count; no training value at all: identity.
  assert numeric.fit(NumericSpec("x"), values, np.zeros(50)).scale == 1.0


def test_train_counts_count_the_training_examples_of_each_split():
  rng = np.random.default_rng(1)
  user, item = rng.integers(0, 6, 200), rng.integers(0, 9, 200)
  ts = rng.integers(0, 1000, 200)
  rows = sequences.examples_from_events(user, item, ts, np.ones(200), {"user_id": np.arange(6)},
                                        5)["train"]
  users, items = numeric.train_counts(user, item, ts, 6, 9)
  np.testing.assert_array_equal(items, np.bincount(rows["item_id"], minlength=9))
  np.testing.assert_array_equal(users, np.bincount(rows["user/user_id"], minlength=6))
  rows = sequences.examples_from_events(user, item, ts, np.ones(200), {"user_id": np.arange(6)},
                                        5, split="global_time")["train"]
  _, items = numeric.train_counts(user, item, ts, 6, 9, "global_time")
  np.testing.assert_array_equal(items, np.bincount(rows["item_id"], minlength=9))


def numeric_example(tmp_path, **config_changes):
  raw = write_example(tmp_path / "raw", items=ITEMS, users=USERS)
  return write_config(raw, numeric=NUMERIC, **config_changes)


def test_byod_numeric_fields_are_fitted_on_train_only(tmp_path):
  built = build(numeric_example(tmp_path), tmp_path / "out")
  schema = built.schema
  assert [f.name for f in schema.item_features] == ["category"]
  assert [f.name for f in schema.user_features] == ["user_id", "country"]
  (price,), (age,) = schema.item_numeric, schema.user_numeric
  assert (price.normalization, age.normalization) == ("log1p", "standard")
  np.testing.assert_array_equal(built.catalog.numeric["price"], [10, np.nan, 1000, 2.5])
  # The statistics are those of the training examples' targets (and users).
  parser = data_format.RecordParser(schema)
  train = parser(data_format.raw_records(built.sources["train"]).read(
      range(len(built.sources["train"]))))
  values = built.catalog.numeric["price"][train["item_id"]]
  values = np.log1p(values[~np.isnan(values)])
  np.testing.assert_allclose([price.center, price.scale], [values.mean(), values.std()],
                             rtol=1e-6)
  ages = train["user/age_years"]
  assert ages.dtype == np.float32 and np.isnan(ages).any()  # u1's age is missing
  np.testing.assert_allclose([age.center, age.scale],
                             [np.nanmean(ages), np.nanstd(ages)], rtol=1e-6)
  # ... and not those of all examples: the test split moves them.
  everything = np.concatenate([parser(data_format.raw_records(built.sources[s]).read(
      range(len(built.sources[s]))))["item_id"] for s in ("train", "validation", "test")])
  all_values = np.log1p(built.catalog.numeric["price"][everything])
  assert abs(np.nanmean(all_values) - price.center) > 1e-4
  # The schema file round-trips the fitted statistics.
  again, _ = data_format.read_side_files(built.directory)
  assert again == schema


def test_a_changed_normalisation_is_a_new_build(tmp_path):
  first = build(numeric_example(tmp_path), tmp_path / "out")
  raw = write_config(tmp_path / "raw", numeric={"items": {"price": {
      "normalization": "bucketize", "num_buckets": 3, "dim": 4}}, "users": ["age_years"]})
  second = build(raw, tmp_path / "out")
  assert first.config != second.config
  assert second.schema.item_numeric[0].bucketized and second.schema.item_dim == 32 + 8 + 4


@pytest.mark.parametrize("items,message", [
    (["item,category,price", "i0,a,1", "i1,b,nan", "i2,a,3", "i3,b,4"],
     r"items.csv:3: numeric price 'nan' is not a finite number \(leave the cell empty"),
    (["item,category,price", "i0,a,1", "i1,b,2", "i2,a,inf", "i3,b,4"],
     r"items.csv:4: numeric price 'inf' is not a finite number"),
    (["item,category,price", "i0,a,1", "i1,b,2", "i2,a,3", "i3,b,cheap"],
     r"items.csv:5: numeric price 'cheap' is not a finite number"),
])
def test_non_finite_and_non_numeric_values_name_file_and_line(tmp_path, items, message):
  manual = write_example(tmp_path / "raw", items=items, users=USERS)
  write_config(manual, numeric=NUMERIC)
  with pytest.raises(DataError, match=message):
    build(manual, tmp_path / "out")
  assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


@pytest.mark.parametrize("setting,message", [
    ({"items": ["weight"]}, r"'numeric' names \['weight'\], not columns"),
    ({"items": {"price": "zscore"}}, r"'numeric' items.price: .*'zscore' is not one of"),
    ({"things": ["price"]}, r"'numeric' must map 'items' and/or 'users'"),
    ({"items": {"price": {"num_buckets": 0}}}, r"num_buckets: must be a positive int"),
])
def test_bad_numeric_settings(tmp_path, setting, message):
  raw = write_example(tmp_path / "raw", items=ITEMS, users=USERS)
  write_config(raw, numeric=setting)
  with pytest.raises(DataError, match=message):
    build(raw, tmp_path / "out")


def test_numeric_columns_need_their_table(tmp_path):
  raw = write_example(tmp_path / "raw", items=ITEMS, users=USERS)
  cfg = json.loads((raw / "dataset.json").read_text())
  del cfg["items"]
  cfg["numeric"] = {"items": ["price"]}
  (raw / "dataset.json").write_text(json.dumps(cfg))
  with pytest.raises(DataError, match=r"'numeric' names items columns, but there is no 'items'"):
    build(raw, tmp_path / "out")
