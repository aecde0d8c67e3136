"""Generated dataset through TFDS ArrayRecord and the Grain pipelines."""

import itertools

import numpy as np
import pytest

from dmf_jax import data
from dmf_jax.data import format as data_format
from dmf_jax.data import pipeline


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  return data.prepare("generated_ctr", "tiny", str(tmp_path_factory.mktemp("tfds")))


def records_of(built, split):
  return data_format.raw_records(built.sources[split])


def key_rows(batch):
  real = batch["weight"] > 0
  return list(zip(batch["user/user_id"][real], batch["item_id"][real], batch["timestamp"][real]))


def test_build_writes_arrayrecord_schema_and_catalog(built):
  files = {p.name for p in built.directory.iterdir()}
  assert any(".array_record-" in f for f in files)
  assert {"dmf_schema.json", "dmf_catalog.npz"} <= files
  assert {k: len(v) for k, v in built.sources.items()} == {"train": 2833, "validation": 346,
                                                            "test": 346}
  assert built.schema.modality_names == ("text", "image")
  assert built.catalog.modalities["image"].shape == (120, 12)


def test_parser_matches_tfds_decoding(built):
  source = built.sources["validation"]
  parser = data_format.RecordParser(built.schema)
  batch = parser(records_of(built, "validation").read(range(40)))
  for i in range(40):
    ex = source[i]
    assert batch["item_id"][i] == ex["item_id"] and batch["timestamp"][i] == ex["timestamp"]
    assert batch["label"][i] == ex["label"]
    np.testing.assert_array_equal([batch["user/user_id"][i], batch["user/group"][i]],
                                  ex["user_features"])
    n = len(ex["hist_item_id"])
    np.testing.assert_array_equal(batch["hist_item_id"][i, :n], ex["hist_item_id"])
    assert batch["hist_mask"][i].sum() == n and batch["hist_mask"][i, :n].all()
    assert np.all(batch["hist_item_id"][i, n:] == 0)


def test_parser_truncates_to_the_last_l_items(built):
  records = records_of(built, "test").read(range(50))
  full = data_format.RecordParser(built.schema)(records)
  short = data_format.RecordParser(built.schema, seq_len=3)(records)
  for i in range(50):
    n = full["hist_mask"][i].sum()
    keep = full["hist_item_id"][i, max(0, n - 3):n]
    np.testing.assert_array_equal(short["hist_item_id"][i, :len(keep)], keep)


def test_train_batches_static_shapes_and_seeded_order(built):
  parser = data_format.RecordParser(built.schema)
  ds = pipeline.train_dataset(records_of(built, "train"), parser, global_batch_size=64, seed=7)
  a = list(itertools.islice(pipeline.to_iterator(ds), 3))
  b = list(itertools.islice(pipeline.to_iterator(ds), 3))
  c = list(itertools.islice(pipeline.to_iterator(
      pipeline.train_dataset(records_of(built, "train"), parser, global_batch_size=64, seed=8)), 3))
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]["item_id"], c[0]["item_id"])
  assert all(x["hist_item_id"].shape == (64, 12) for x in a)


def test_one_epoch_visits_every_example_once_then_reshuffles(built):
  parser = data_format.RecordParser(built.schema)
  records = records_of(built, "train")
  n = len(records)
  ds = pipeline.train_dataset(records, parser, global_batch_size=1, seed=0)  # batch 1: no remainder
  it = pipeline.to_iterator(ds)
  first = [key_rows(next(it))[0] for _ in range(n)]
  assert len(set(first)) == n
  second = [key_rows(next(it))[0] for _ in range(20)]
  assert second != first[:20]


def test_iterator_resume_reproduces_the_next_batches(built):
  parser = data_format.RecordParser(built.schema)
  ds = pipeline.train_dataset(records_of(built, "train"), parser, global_batch_size=32, seed=3)
  it = pipeline.to_iterator(ds)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = pipeline.to_iterator(ds)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_in_memory_split_gives_the_streamed_batches_and_resumes(built):
  parser = data_format.RecordParser(built.schema)
  records = records_of(built, "train")
  streamed = pipeline.to_iterator(
      pipeline.train_dataset(records, parser, global_batch_size=64, seed=5))
  ds = pipeline.train_dataset(records, parser, global_batch_size=64, seed=5, in_memory=True)
  cached = pipeline.to_iterator(ds)
  per_epoch = len(records) // 64
  for _ in range(per_epoch + 3):  # into the second epoch (a new permutation)
    want, got = next(streamed), next(cached)
    assert set(got) == set(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
      assert got[key].dtype == want[key].dtype
  state = cached.get_state()
  expected = [next(cached) for _ in range(2)]
  resumed = pipeline.to_iterator(ds)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(resumed)["item_id"], want["item_id"])


def test_parser_histories_empty_short_exact_and_long():
  from dmf_jax.core.schema import FeatureSchema

  schema = FeatureSchema(num_items=100, item_id_dim=4, seq_len=3)
  parser = data_format.RecordParser(schema)
  raw = [np.array(h, np.int32).tobytes() for h in ([], [5], [1, 2, 3], [9, 8, 7, 6, 4])]
  hist, kept = parser._histories(raw)  # pylint: disable=protected-access
  np.testing.assert_array_equal(hist, [[0, 0, 0], [5, 0, 0], [1, 2, 3], [7, 6, 4]])
  np.testing.assert_array_equal(kept, [0, 1, 3, 3])
  hist, kept = parser._histories([b"", b""])  # pylint: disable=protected-access
  np.testing.assert_array_equal(hist, np.zeros((2, 3))) and np.testing.assert_array_equal(kept, 0)


def test_eval_batches_pad_with_zero_weight_and_lose_nothing(built):
  parser = data_format.RecordParser(built.schema)
  records = records_of(built, "validation")
  batches = list(pipeline.to_iterator(
      pipeline.eval_dataset(records, parser, global_batch_size=100)))
  assert len(batches) == 4 and all(len(b["label"]) == 100 for b in batches)
  weights = np.concatenate([b["weight"] for b in batches])
  assert weights.sum() == 346 and np.all(weights[346:] == 0)
  everything = key_rows(parser(records.read(range(len(records)))))
  assert sorted(sum((key_rows(b) for b in batches), [])) == sorted(everything)


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_are_disjoint_cover_the_split_and_form_the_global_batches(built, count):
  parser = data_format.RecordParser(built.schema)
  records = records_of(built, "validation")
  rows, steps = [], set()
  for index in range(count):
    shard = pipeline.ShardInfo(index, count)
    batches = list(pipeline.to_iterator(
        pipeline.eval_dataset(records, parser, global_batch_size=12 * count, shard=shard)))
    steps.add(len(batches))
    rows += sum((key_rows(b) for b in batches), [])
  assert len(steps) == 1  # every process runs the same number of eval steps
  assert len(rows) == len(set(rows)) == len(records)

  # Training: concatenating the processes' parts gives exactly the single-process batches.
  single = pipeline.to_iterator(
      pipeline.train_dataset(records, parser, global_batch_size=6 * count, seed=4))
  parts = [pipeline.to_iterator(pipeline.train_dataset(
      records, parser, global_batch_size=6 * count, seed=4, shard=pipeline.ShardInfo(i, count)))
           for i in range(count)]
  for _ in range(3):
    whole = key_rows(next(single))
    assert sum((key_rows(next(p)) for p in parts), []) == whole
  with pytest.raises(ValueError, match="global batch size 7 is not a positive multiple of the 2"):
    pipeline.train_dataset(records, parser, global_batch_size=7, seed=0,
                           shard=pipeline.ShardInfo(0, 2))


def test_bad_pipeline_arguments():
  with pytest.raises(ValueError, match="shard index 2 is not in"):
    pipeline.ShardInfo(2, 2)
  with pytest.raises(FileNotFoundError, match="dmf_schema.json is missing"):
    data_format.read_side_files("/nonexistent")
  with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
    data.get_builder("mnist", None, "/tmp")
  with pytest.raises(ValueError, match="has no config 'huge'; valid: default, tiny"):
    data.get_builder("generated_ctr", "huge", "/tmp")
