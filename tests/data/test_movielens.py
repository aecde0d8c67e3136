"""Integration: the real MovieLens-100K multimodal data under the README's protocol.

Needs ../shared/datasets/movielens-100k-mm (or DMF_SHARED_DIR): fails, never skips, without it.
"""

import collections

import numpy as np
import pytest

from dmf_jax import data
from dmf_jax.data import movielens_raw as raw
from dmf_jax.data.movielens import read_modality
from dmf_jax.data import format as data_format
from helpers import shared_dir


@pytest.fixture(scope="module")
def movielens(tmp_path_factory):
  built = data.prepare("movielens_100k_mm", "ids", str(tmp_path_factory.mktemp("tfds")),
                       manual_dir=str(shared_dir()))
  parser = data_format.RecordParser(built.schema)
  splits = {}
  for name, source in built.sources.items():
    records = data_format.raw_records(source)
    splits[name] = parser(records.read(range(len(records))))
  return built, splits


def test_split_sizes_and_positive_rate(movielens):
  _, splits = movielens
  assert {k: len(v["label"]) for k, v in splits.items()} == {
      "train": 80_024, "validation": 9_988, "test": 9_988}
  rate = np.mean(np.concatenate([v["label"] for v in splits.values()]))
  assert 0.54 < rate < 0.56, rate


def test_every_user_in_every_split_and_chronological(movielens):
  _, splits = movielens
  users = {k: set(v["user/user_id"].tolist()) for k, v in splits.items()}
  assert users["train"] == users["validation"] == users["test"] == set(range(943))
  last_train = collections.defaultdict(int)
  for u, t in zip(splits["train"]["user/user_id"], splits["train"]["timestamp"]):
    last_train[u] = max(last_train[u], t)
  for u, t in zip(splits["test"]["user/user_id"], splits["test"]["timestamp"]):
    assert t >= last_train[u]


def test_histories_are_strict_positive_ordered_and_padded(movielens):
  _, splits = movielens
  ratings = raw.read_ratings(shared_dir())
  when = {(u, i): (t, r) for u, i, t, r in
          zip(ratings.user, ratings.item, ratings.timestamp, ratings.rating)}
  for split in splits.values():
    lengths = split["hist_mask"].sum(1)
    assert lengths.max() == 50 and split["hist_item_id"].shape[1] == 50
    assert np.all(np.diff(split["hist_mask"].astype(int), axis=1) <= 0)
    for row in range(0, len(lengths), 7):
      user, target_ts = split["user/user_id"][row], split["timestamp"][row]
      hist = split["hist_item_id"][row, :lengths[row]]
      stamps = [when[(user, item)][0] for item in hist]
      assert all(ts < target_ts for ts in stamps)  # no event at or after the target's time
      assert all(when[(user, item)][1] >= 4 for item in hist)  # only liked items
      assert stamps == sorted(stamps)  # most recent last


def test_schema_and_catalog(movielens):
  built, _ = movielens
  schema = built.schema
  assert schema.num_items == 1682 and schema.modalities == ()
  assert [f.name for f in schema.user_features] == ["user_id", "age", "gender", "occupation"]
  genres = built.catalog.side["genres"]
  assert genres.shape == (1682, schema.item_features[0].max_values)
  assert set(genres[0][genres[0] >= 0]) == {3, 4, 5}  # Toy Story: Animation, Children's, Comedy


def test_item_text_and_modality_cache_checks(tmp_path):
  root = shared_dir()
  items = raw.read_items(root)
  text = raw.item_text(items, raw.read_overviews(root, 1682), 0)
  assert text.startswith("Toy Story (1995). Animation, Children's, Comedy. Led by Woody")
  with pytest.raises(FileNotFoundError, match="run `python -m data.movielens_100k_mm.encode_items"):
    read_modality(tmp_path, "text", 1682)
  np.save(tmp_path / "text.npy", np.ones((3, 4), np.float32))
  np.save(tmp_path / "text_ids.npy", np.array([1, 2, 2]))
  with pytest.raises(ValueError, match="text_ids.npy: duplicate item ids"):
    read_modality(tmp_path, "text", 1682)
  np.save(tmp_path / "text_ids.npy", np.array([1, 2, 3]))
  vectors = np.ones((3, 4), np.float32)
  vectors[1, 2] = np.nan
  np.save(tmp_path / "text.npy", vectors)
  with pytest.raises(ValueError, match=r"text.npy: 1 rows with NaN/inf \(first: id 2\)"):
    read_modality(tmp_path, "text", 1682)
  np.save(tmp_path / "text.npy", np.ones((3, 4), np.float32))
  table = read_modality(tmp_path, "text", 1682)
  assert table.shape == (1682, 4) and table[:3].all() and not table[3:].any()


def test_missing_raw_file_names_file_and_layout(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"missing file .*ml-100k/u.data\nexpected layout"):
    raw.read_ratings(tmp_path)
  (tmp_path / "ml-100k").mkdir()
  (tmp_path / "ml-100k" / "u.data").write_text("1\t2\t5\t100\n1\t3\tfive\t101\n")
  with pytest.raises(ValueError, match=r"u.data:2: malformed rating row"):
    raw.read_ratings(tmp_path)
