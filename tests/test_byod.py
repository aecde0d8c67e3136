"""Bring-your-own-data builder: the documented format, and every bad input's error."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data.byod import ByodCtr
from dmf_jax import data_format


def write_example(root, *, interactions=None, items=None, users=None, vectors=None, ids=None,
                  config=None):
  """The README's tiny example: 3 users, 4 items, a text modality."""
  root.mkdir(parents=True, exist_ok=True)
  rows = interactions or [
      "user,item,timestamp,rating",
      *[f"u{u},i{(u + k) % 4},{100 * k + u},{1 + (u * 3 + k) % 5}" for u in range(3)
        for k in range(12)],
  ]
  (root / "interactions.csv").write_text("\n".join(rows) + "\n")
  (root / "items.csv").write_text("\n".join(items or [
      "item,category,tags", "i0,drama,a|b", "i1,comedy,b", "i2,drama,", "i3,action,a|c"]) + "\n")
  (root / "users.csv").write_text("\n".join(users or [
      "user,country", "u0,fr", "u1,de", "u2,fr"]) + "\n")
  np.save(root / "text.npy", vectors if vectors is not None
          else np.arange(16, dtype=np.float32).reshape(4, 4) + 1)
  (root / "text_ids.txt").write_text("\n".join(ids or ["i0", "i1", "i2", "i3"]) + "\n")
  cfg = {
      "interactions": "interactions.csv", "rating": {"column": "rating", "threshold": 4},
      "users": "users.csv", "items": "items.csv",
      "modalities": {"text": {"vectors": "text.npy", "ids": "text_ids.txt"}}, "seq_len": 5,
  }
  (root / "dataset.json").write_text(json.dumps(config or cfg))
  return root


def build(manual, data_dir):
  builder = ByodCtr(data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return data_format.load_built_dataset(builder)


def test_documented_example_builds(tmp_path):
  built = build(write_example(tmp_path / "raw"), tmp_path / "out")
  schema = built.schema
  assert schema.num_items == 4 and schema.seq_len == 5
  assert [f.name for f in schema.user_features] == ["user_id", "country"]
  assert [(f.name, f.max_values) for f in schema.item_features] == [("category", 1), ("tags", 2)]
  np.testing.assert_array_equal(built.catalog.side["tags"], [[0, 1], [1, -1], [-1, -1], [0, 2]])
  assert sum(len(s) for s in built.sources.values()) == 36
  assert {k: len(v) for k, v in built.sources.items()} == {"train": 30, "validation": 3, "test": 3}
  np.testing.assert_array_equal(built.catalog.modalities["text"][1], [5, 6, 7, 8])


def assert_fails_cleanly(tmp_path, match, exc=ValueError, **changes):
  manual = write_example(tmp_path / "raw", **changes)
  with pytest.raises(exc, match=match):
    build(manual, tmp_path / "out")
  leftovers = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
  assert not leftovers, f"half-written files after a failed build: {leftovers}"


def test_malformed_row_names_file_and_line(tmp_path):
  assert_fails_cleanly(tmp_path, r"interactions.csv:3: malformed row: 3 fields",
                       interactions=["user,item,timestamp,rating", "u0,i0,1,5", "u0,i1,2"])
  assert_fails_cleanly(tmp_path, r"interactions.csv:2: timestamp 'noon' is not a number",
                       interactions=["user,item,timestamp,rating", "u0,i0,noon,5"])


def test_unknown_item_and_duplicate_ids(tmp_path):
  assert_fails_cleanly(tmp_path, r"interactions.csv:3: unknown item id 'i9'",
                       interactions=["user,item,timestamp,rating", "u0,i0,1,5", "u0,i9,2,5"])
  assert_fails_cleanly(tmp_path, r"items.csv:3: duplicate item id 'i0' \(first at line 2\)",
                       items=["item,category", "i0,a", "i0,b", "i1,c", "i2,c", "i3,c"])
  assert_fails_cleanly(tmp_path, r"text_ids.txt:2: duplicate item id 'i0'",
                       ids=["i0", "i0", "i2", "i3"])


def test_bad_vectors(tmp_path):
  bad = np.ones((4, 4), np.float32)
  bad[2, 1] = np.inf
  assert_fails_cleanly(tmp_path, r"text.npy: row 2 \(item 'i2'\) has NaN/inf", vectors=bad)
  assert_fails_cleanly(tmp_path, r"text.npy: shape \(3, 4\) does not match the 4 ids",
                       vectors=np.ones((3, 4), np.float32))


def test_missing_files_and_bad_config(tmp_path):
  manual = write_example(tmp_path / "raw")
  (manual / "users.csv").unlink()
  with pytest.raises(FileNotFoundError, match=r"missing users file .*users.csv"):
    build(manual, tmp_path / "out")
  assert_fails_cleanly(tmp_path, r"unknown key\(s\) \['labels'\]",
                       config={"interactions": "interactions.csv", "labels": "x"})
  assert_fails_cleanly(tmp_path, "give exactly one of 'label' or 'rating'",
                       config={"interactions": "interactions.csv"})
