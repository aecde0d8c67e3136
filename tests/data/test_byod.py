"""Bring-your-own-data builder: the documented format, and every bad input's error."""

import json

import numpy as np
import pytest

from dmf_jax import data
from dmf_jax.core.errors import ConfigError, DataError


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
  return data.prepare("byod_ctr", None, str(data_dir), str(manual))


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
  from dmf_jax.core import hashing
  np.testing.assert_array_equal(built.catalog.raw_ids, hashing.raw_ids(["i0", "i1", "i2", "i3"]))
  # The raw value -> index maps that serving needs (README "Bring your own data").
  vocab = data.byod.read_vocabularies(built.directory)
  assert vocab["item_id"] == {"i0": 0, "i1": 1, "i2": 2, "i3": 3}
  assert vocab["user_id"] == {"u0": 0, "u1": 1, "u2": 2}
  assert vocab["users.country"] == {"de": 0, "fr": 1}
  assert vocab["items.category"] == {"action": 0, "comedy": 1, "drama": 2}
  assert vocab["items.tags"] == {"a": 0, "b": 1, "c": 2}  # i3 is a|c: [0, 2] above


def assert_fails_cleanly(tmp_path, match, exc=ValueError, **changes):
  manual = write_example(tmp_path / "raw", **changes)
  with pytest.raises(exc, match=match):
    build(manual, tmp_path / "out")
  leftovers = [p for p in (tmp_path / "out").rglob("*")
               if p.is_file() or (p.is_dir() and p.name.startswith("src-"))]
  assert not leftovers, f"half-written files or folders after a failed build: {leftovers}"


def test_malformed_row_names_file_and_line(tmp_path):
  assert_fails_cleanly(tmp_path, r"interactions.csv:3: malformed row: 3 fields",
                       interactions=["user,item,timestamp,rating", "u0,i0,1,5", "u0,i1,2"])
  assert_fails_cleanly(tmp_path, r"interactions.csv:2: timestamp 'noon' is not an integer",
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
  assert_fails_cleanly(tmp_path, r"text.npy: 3 rows \(shape \(3, 4\)\) do not match the 4 ids",
                       vectors=np.ones((3, 4), np.float32))
  for shape in ((4, 4, 2), (4,)):
    assert_fails_cleanly(tmp_path, rf"text.npy: vectors must be a 2-D array \[items, dims\], "
                                   rf"got shape \({shape[0]},", vectors=np.ones(shape, np.float32))


def test_exact_duplicate_interaction_rows_are_counted_in_a_warning(tmp_path, capfd):
  rows = ["user,item,timestamp,rating",
          *[f"u{u},i{(u + k) % 4},{100 * k + u},{1 + (u * 3 + k) % 5}" for u in range(3)
            for k in range(12)]]
  built = build(write_example(tmp_path / "raw", interactions=rows + rows[1:3] + rows[5:6]),
                tmp_path / "out")
  err = capfd.readouterr().err
  assert "interactions.csv: 3 interaction rows repeat an earlier row's user, item" in err
  assert sum(len(s) for s in built.sources.values()) == 39  # kept, as the warning says
  build(write_example(tmp_path / "raw2"), tmp_path / "out2")
  assert "repeat an earlier row" not in capfd.readouterr().err


def test_missing_files_and_bad_config(tmp_path):
  manual = write_example(tmp_path / "raw")
  (manual / "users.csv").unlink()
  with pytest.raises(FileNotFoundError, match=r"missing users file .*users.csv"):
    build(manual, tmp_path / "out")
  assert_fails_cleanly(tmp_path, r"unknown key\(s\) \['labels'\]",
                       config={"interactions": "interactions.csv", "labels": "x"})
  assert_fails_cleanly(tmp_path, "give exactly one of 'label' or 'rating'",
                       config={"interactions": "interactions.csv"})


# --- Missing values, declared multi-valued fields, warnings --------------------------------


def test_an_empty_single_value_is_its_own_missing_row(tmp_path):
  built = build(write_example(tmp_path / "raw", items=[
      "item,category,tags", "i0,drama,a|b", "i1,,b", "i2,drama,", "i3,action,a|c"]),
      tmp_path / "out")
  spec = {f.name: f for f in built.schema.item_features}["category"]
  assert spec.vocab_size == 3  # "" (missing), action, drama
  np.testing.assert_array_equal(built.catalog.side["category"], [2, 0, 2, 1])


def test_multi_valued_fields_can_be_declared(tmp_path):
  raw = write_example(tmp_path / "raw", items=[
      "item,category,tags", "i0,drama,a", "i1,comedy,b", "i2,drama,", "i3,act|ion,c"])
  cfg = json.loads((raw / "dataset.json").read_text())
  cfg["multi_valued"] = {"items": ["tags"]}
  (raw / "dataset.json").write_text(json.dumps(cfg))
  built = build(raw, tmp_path / "out")
  specs = {f.name: f for f in built.schema.item_features}
  # Declared: tags is multi-valued though no row holds '|'; category is single-valued
  # though one does ('act|ion' is one value).
  assert specs["tags"].multi_valued and not specs["category"].multi_valued
  assert specs["category"].vocab_size == 3
  np.testing.assert_array_equal(built.catalog.side["tags"][:, 0], [0, 1, -1, 2])
  cfg["multi_valued"] = {"items": ["colour"]}
  (raw / "dataset.json").write_text(json.dumps(cfg))
  with pytest.raises(DataError, match=r"items.csv: multi_valued names field\(s\) \['colour'\]"):
    build(raw, tmp_path / "out2")


def test_a_column_unique_per_item_is_warned_about(tmp_path, capfd):
  n = 120
  rows = ["user,item,timestamp,rating"] + [f"u{k % 7},i{k},{k},{1 + k % 5}" for k in range(n)]
  items = ["item,title,category"] + [f"i{k},Title {k},c{k % 3}" for k in range(n)]
  raw = write_example(tmp_path / "raw", interactions=rows, items=items, config={
      "interactions": "interactions.csv", "rating": {"column": "rating", "threshold": 4},
      "items": "items.csv", "seq_len": 5})
  build(raw, tmp_path / "out")
  err = capfd.readouterr().err
  assert "items.csv: column 'title' has a distinct value on every one of its 120 rows" in err
  assert "'category'" not in err


# --- Builds are tied to their sources ---------------------------------------------------------


def test_changed_sources_give_a_new_build_never_a_stale_one(tmp_path):
  raw = write_example(tmp_path / "raw")
  first = build(raw, tmp_path / "out")
  again = build(raw, tmp_path / "out")
  assert again.config == first.config and again.fingerprint == first.fingerprint
  assert first.config.startswith("src-")
  rows = (raw / "interactions.csv").read_text().splitlines()
  (raw / "interactions.csv").write_text("\n".join(rows[:-3]) + "\n")  # fewer interactions
  second = build(raw, tmp_path / "out")
  assert second.config != first.config and second.fingerprint != first.fingerprint
  assert sum(len(s) for s in second.sources.values()) == 33
  assert (tmp_path / "out" / "byod_ctr" / first.config).exists()  # the old build is kept
  np.save(raw / "text.npy", np.ones((4, 4), np.float32))  # other vectors: another build
  third = build(raw, tmp_path / "out")
  assert third.config not in (first.config, second.config)
  np.testing.assert_array_equal(third.catalog.modalities["text"][0], [1, 1, 1, 1])


def test_opening_without_manual_dir_needs_a_single_build(tmp_path):
  from dmf_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top

  raw = write_example(tmp_path / "raw")
  first = build(raw, tmp_path / "out")
  assert data.prepare("byod_ctr", None, str(tmp_path / "out")).config == first.config
  assert data.prepare("byod_ctr", first.config, str(tmp_path / "out")).config == first.config
  (raw / "users.csv").write_text("user,country\nu0,fr\nu1,de\nu2,it\n")
  build(raw, tmp_path / "out")
  with pytest.raises(ConfigError, match="needs the folder of your files"):
    data.prepare("byod_ctr", None, str(tmp_path / "out"))
  with pytest.raises(ConfigError, match="byod_ctr has no config 'text_image'"):
    data.prepare("byod_ctr", "text_image", str(tmp_path / "out"), str(raw))
  config = config_lib.default_config()
  config.dataset, config.dataset_config = "byod_ctr", "text_image"
  config.manual_dir = str(raw)
  with pytest.raises(ConfigError, match="byod_ctr has no config 'text_image'"):
    config_lib.validate(config, num_devices=1)


def test_results_name_the_real_build(tmp_path):
  from dmf_jax.train import loop  # pylint: disable=g-import-not-at-top
  from dmf_jax.train import restore  # pylint: disable=g-import-not-at-top
  from helpers import tiny_train_config  # pylint: disable=g-import-not-at-top

  raw = write_example(tmp_path / "raw")
  config = tiny_train_config(tmp_path / "out", num_train_steps=4, eval_every_steps=4,
                             checkpoint_every_steps=4, batch_size=8, eval_batch_size=8)
  config.dataset, config.dataset_config, config.manual_dir = "byod_ctr", "default", str(raw)
  config.mesh.data = 8
  results = loop.train_and_evaluate(config, str(tmp_path / "run"))
  first = f"byod_ctr/{data.byod.build_name(raw)}"
  assert results["dataset"] == first

  # The sources change and are rebuilt: evaluation still reads the build the run trained on.
  rows = (raw / "interactions.csv").read_text().splitlines()
  (raw / "interactions.csv").write_text("\n".join(rows[:-3]) + "\n")
  assert build(raw, tmp_path / "out").full_name != first
  got = loop.evaluate_checkpoint(str(tmp_path / "run"), "validation")
  assert got["dataset"] == first and got["count"] == results["validation"]["count"]
  assert got["logloss"] == results["validation"]["logloss"]
  # ... and refuses, naming it, once that build is gone.
  moved = tmp_path / "elsewhere"
  (tmp_path / "out" / first).rename(moved)
  for call in (lambda: loop.evaluate_checkpoint(str(tmp_path / "run"), "validation"),
               lambda: restore.load_model(str(tmp_path / "run"))):
    with pytest.raises(DataError, match=f"the dataset build {first} that the run in .* trained "
                                        f"on is not in"):
      call()
  (tmp_path / "out" / first).parent.mkdir(parents=True, exist_ok=True)
  moved.rename(tmp_path / "out" / first)


# --- Section 5: every bad input names its file, line and what is expected ---------------------


def write_config(raw, **changes):
  cfg = json.loads((raw / "dataset.json").read_text())
  cfg.update(changes)
  (raw / "dataset.json").write_text(json.dumps(cfg))
  return raw


def test_encodings(tmp_path):
  raw = write_example(tmp_path / "raw")
  text = (raw / "users.csv").read_text()
  (raw / "users.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # Excel's UTF-8 BOM
  built = build(raw, tmp_path / "out")
  assert [f.name for f in built.schema.user_features] == ["user_id", "country"]
  (raw / "users.csv").write_bytes("user,country\nu0,fr\nu1,d\xe9\nu2,fr\n".encode("latin-1"))
  with pytest.raises(DataError, match=r"users.csv:3: not valid UTF-8 \(byte 0xe9\); save the "
                                      r"file as UTF-8"):
    build(raw, tmp_path / "out2")


def test_an_oversize_field_names_file_and_line(tmp_path):
  rows = ["user,item,timestamp,rating", "u0,i0,1,5", "u0,i1," + "9" * (1 << 21) + ",5"]
  assert_fails_cleanly(tmp_path, r"interactions.csv:3: field larger than field limit",
                       exc=DataError, interactions=rows)


@pytest.mark.parametrize("changes,message", [
    ({"rating": "rating"}, r"'rating' must be an object \{\"column\": NAME, \"threshold\""),
    ({"rating": {"column": "rating"}}, r"'rating' must be an object"),
    ({"rating": {"column": "rating", "threshold": "4"}}, "threshold' must be a finite number"),
    ({"seq_len": 5.5}, "'seq_len' must be a positive integer, got 5.5"),
    ({"seq_len": "50"}, "'seq_len' must be a positive integer, got '50'"),
    ({"split": "random"}, "'split' must be one of"),
    ({"modalities": {"text": "text.npy"}}, "'modalities' must map each name"),
])
def test_bad_dataset_json_values(tmp_path, changes, message):
  raw = write_config(write_example(tmp_path / "raw"), **changes)
  with pytest.raises(DataError, match=message) as err:
    build(raw, tmp_path / "out")
  assert "dataset.json" in str(err.value)


@pytest.mark.parametrize("row,message", [
    ("u0,i1,12.5,5", r"interactions.csv:3: timestamp '12.5' is not an integer"),
    ("u0,i1,99999999999999999999999,5",
     r"interactions.csv:3: timestamp '99999999999999999999999' does not fit in 64 bits"),
    ("u0,i1,7,nan", r"interactions.csv:3: rating 'nan' is not a finite number"),
    ("u0,i1,7,five", r"interactions.csv:3: rating 'five' is not a number"),
    (",i1,7,5", r"interactions.csv:3: empty user id"),
])
def test_bad_interaction_values(tmp_path, row, message):
  assert_fails_cleanly(tmp_path, message, exc=DataError,
                       interactions=["user,item,timestamp,rating", "u0,i0,1,5", row])


def test_string_typed_vectors(tmp_path):
  assert_fails_cleanly(tmp_path, r"text.npy: vectors must be numbers \(float\), got dtype <U",
                       exc=DataError, vectors=np.array([["a"] * 4] * 4))


def test_hashed_fields_keep_raw_ids_and_hash_when_read(tmp_path):
  """`hash` in dataset.json: raw ids in the records and catalog, rows when parsed."""
  from dmf_jax.core import hashing
  from dmf_jax.data import format as data_format

  raw = write_example(tmp_path / "raw")
  write_config(raw, hash={"user": 50, "item": 40, "items.category": 30, "num_hashes": 2,
                          "seed": 5})
  built = build(raw, tmp_path / "out")
  schema = built.schema
  user_id, country = schema.user_features
  assert user_id.hashed and (user_id.hash_buckets, user_id.num_hashes, user_id.hash_seed) == (
      50, 2, 5)
  assert not country.hashed
  assert schema.item_id_spec.hashed and schema.item_id_spec.vocab_size == 40
  category = {f.name: f for f in schema.item_features}["category"]
  assert category.hashed and category.vocab_size == 30
  np.testing.assert_array_equal(built.catalog.raw_ids, hashing.raw_ids(["i0", "i1", "i2", "i3"]))
  np.testing.assert_array_equal(built.catalog.side["category"],
                                hashing.raw_ids(["drama", "comedy", "drama", "action"]))
  records = data_format.raw_records(built.sources["train"])
  batch = data_format.RecordParser(schema)(records.read(range(len(records))))
  raw_users = hashing.raw_ids(["u0", "u1", "u2"])
  assert batch["user/user_id"].shape == (len(records), 2)
  assert {tuple(r) for r in batch["user/user_id"]} == {tuple(r) for r in user_id.rows(raw_users)}
  assert set(batch["group"].tolist()) == set(hashing.fold32(raw_users).tolist())
  vocab = data.byod.read_vocabularies(built.directory)  # hashed fields take raw values
  assert vocab["user_id"] is None and vocab["items.category"] is None
  assert vocab["item_id"] == {"i0": 0, "i1": 1, "i2": 2, "i3": 3}  # catalog indices
  assert vocab["users.country"] == {"de": 0, "fr": 1}


def test_bad_hash_settings(tmp_path):
  raw = write_example(tmp_path / "raw")
  for value, message in (
      ({"users.age": 0}, r"'hash' 'users.age' must be an integer in \[1"),
      ({"user": 10, "num_hashes": 5}, r"'hash' 'num_hashes' must be an integer in \[1, 4\]"),
      ({"colour": 10}, r"'hash' key 'colour' is not"),
      ({"items.brand": 10}, r"items.csv: 'hash' names 'items.brand', not a column"),
  ):
    write_config(raw, hash=value)
    with pytest.raises(DataError, match=message):
      build(raw, tmp_path / "out")
  write_config(raw, hash={"items.tags": 10}, multi_valued={"items": ["tags"]})
  with pytest.raises(DataError, match="a hashed field must be single-valued"):
    build(raw, tmp_path / "out")
