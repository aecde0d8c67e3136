"""Dataset builds: one build per (dataset, config) at a time, nothing left by dead builds, and
a build tied to its sources (a changed MovieLens encoder cache is refused, then replaced on
request; never reused silently)."""

import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dmf_jax import data
from dmf_jax.core.errors import DataError
from helpers import shared_dir

REPO = pathlib.Path(__file__).resolve().parents[2]

BUILD = """
import sys
from dmf_jax import data
built = data.prepare("generated_ctr", "tiny", sys.argv[1])
print("FINGERPRINT", built.fingerprint, sum(len(s) for s in built.sources.values()))
"""


def test_two_processes_building_one_fresh_data_dir(tmp_path):
  procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    assert "Traceback" not in err
  prints = [next(l for l in out.splitlines() if l.startswith("FINGERPRINT"))
            for out, _ in outputs]
  assert prints[0] == prints[1] and prints[0].endswith(" 3525")
  config_dir = tmp_path / "generated_ctr" / "tiny"
  assert [p.name for p in config_dir.iterdir()] == ["1.0.0"]  # one build, no leftovers
  assert not list((tmp_path / data.LOCK_DIR).iterdir())  # both locks released


def test_a_dead_build_leaves_nothing_a_later_build_trips_on(tmp_path, capfd):
  dead = tmp_path / "generated_ctr" / "tiny" / "incomplete.ABC123_1.0.0"
  dead.mkdir(parents=True)
  (dead / "generated_ctr-train.array_record-00000-of-00001").write_bytes(b"half")
  (tmp_path / data.LOCK_DIR).mkdir()
  (tmp_path / data.LOCK_DIR / "generated_ctr-tiny.lock").write_text(
      '{"pid": 999999, "host": "gone", "started": 0, "purpose": "building"}')
  built = data.prepare("generated_ctr", "tiny", str(tmp_path))
  assert len(built.sources["train"]) == 2833
  assert not dead.exists()
  err = capfd.readouterr().err
  assert f"removing {dead}" in err and "took over the stale lock" in err


@pytest.fixture(scope="module")
def encoded_copy(tmp_path_factory):
  """A private copy of the MovieLens text encoder cache (the shared one is read-only)."""
  source = shared_dir().parent / "movielens_100k_mm_encoded"
  target = tmp_path_factory.mktemp("encoded")
  for name in ("text.npy", "text_ids.npy"):
    shutil.copyfile(source / name, target / name)  # writable
  return target


def test_a_changed_movielens_encoder_cache_is_refused_then_replaced(tmp_path, encoded_copy,
                                                                    monkeypatch, capfd):
  monkeypatch.setenv("DMF_ML_ENCODED_DIR", str(encoded_copy))
  manual = str(shared_dir())
  first = data.prepare("movielens_100k_mm", "text", str(tmp_path), manual)
  assert data.prepare("movielens_100k_mm", "text", str(tmp_path), manual).fingerprint == (
      first.fingerprint)
  vectors = np.load(encoded_copy / "text.npy")
  row = int(np.flatnonzero(np.load(encoded_copy / "text_ids.npy") == 1)[0])  # item index 0
  vectors[row] = -vectors[row]  # a re-encoded item
  np.save(encoded_copy / "text.npy", vectors)
  with pytest.raises(DataError) as err:
    data.prepare("movielens_100k_mm", "text", str(tmp_path), manual)
  message = str(err.value)
  assert "was made from other sources: changed encoded/text.npy" in message
  assert "--replace_stale" in message and "ml-100k/u.data" not in message
  replaced = data.prepare("movielens_100k_mm", "text", str(tmp_path), manual, replace_stale=True)
  assert replaced.fingerprint != first.fingerprint
  np.testing.assert_allclose(replaced.catalog.modalities["text"][0], vectors[row], rtol=1e-6)
  kept = list((tmp_path / data.REPLACED_DIR).iterdir())
  assert len(kept) == 1 and kept[0].name.startswith("movielens_100k_mm-text-1.0.0-")
  np.testing.assert_allclose(  # the old build, intact
      np.load(kept[0] / "dmf_catalog.npz")["modality/text"][0], -vectors[row], rtol=1e-6)
  assert "moved the stale build" in capfd.readouterr().err


def test_a_streamed_build_writes_the_generator_chunks_in_order(tmp_path):
  """generated_ctr/tiny_streamed: the records are the StreamedProblem's chunks, split by split
  in generation order (no TFDS shuffle), hashed user ids kept raw and hashed when parsed."""
  from dmf_jax.core import hashing
  from dmf_jax.data import format as data_format
  from dmf_jax.data import generated, synthetic

  built = data.prepare("generated_ctr", "tiny_streamed", str(tmp_path))
  config = next(c for c in generated.GeneratedCtr.BUILDER_CONFIGS if c.name == "tiny_streamed")
  problem = synthetic.StreamedProblem(config.synthetic, config.chunk_users)
  chunks = [problem.chunk(c) for c in range(problem.num_chunks)]
  spec = built.schema.user_features[0]
  assert spec.hashed and built.catalog.raw_ids is not None
  for index, split in enumerate(("train", "validation", "test")):
    want = {k: np.concatenate([c[k][c["split"] == index] for c in chunks]) for k in chunks[0]}
    records = data_format.raw_records(built.sources[split])
    got = data_format.RecordParser(built.schema)(records.read(range(len(records))))
    assert len(records) == len(want["label"])
    for key in ("item_id", "timestamp", "label", "user/group"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{split} {key}")
    np.testing.assert_array_equal(got["user/user_id"], spec.rows(want["user/user_id"]))
    np.testing.assert_array_equal(got["group"], hashing.fold32(want["user/user_id"]))
    lengths = got["hist_mask"].sum(axis=1)
    np.testing.assert_array_equal(lengths, np.minimum(want["hist_len"], built.schema.seq_len))
    np.testing.assert_array_equal(np.where(got["hist_mask"], got["hist_item_id"], 0),
                                  want["hist_item_id"][:, :built.schema.seq_len])


@pytest.mark.parametrize("size", [20_000, 300_000])  # below Riegeli's minimum; mid-chunk
def test_a_truncated_record_file_is_named_when_the_build_is_opened(tmp_path, size):
  built = data.prepare("generated_ctr", "tiny", str(tmp_path))
  path = next(pathlib.Path(built.directory).glob("*-train.array_record-*"))
  with open(path, "r+b") as f:
    f.truncate(size)
  with pytest.raises(DataError, match=f"{path.name} is damaged.*rebuild generated_ctr/tiny"):
    data.prepare("generated_ctr", "tiny", str(tmp_path))
