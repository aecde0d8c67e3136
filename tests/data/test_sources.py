"""Source fingerprints (`data.sources`): a changed file or parameter names its role, the same
files elsewhere are the same source, a huge file is hashed at both ends with its size and
mtime, a corrupt build record is one clear error."""

import hashlib
import os
import shutil

import pytest

from dmf_jax.core.errors import DataError
from dmf_jax.data import sources


def write(path, data: bytes):
  path.write_bytes(data)
  return path


def test_a_changed_file_or_parameter_names_its_role(tmp_path):
  files = {"interactions": write(tmp_path / "a.csv", b"u,i\n1,2\n"),
           "items": write(tmp_path / "items.csv", b"i\n2\n")}
  record = sources.build_record("byod_ctr", "x", "1.0.0", files, {"seq_len": 5})
  assert sources.changed_sources(record, files, {"seq_len": 5}) == []
  other = tmp_path / "elsewhere"
  other.mkdir()
  moved = {role: shutil.copy(path, other / path.name) for role, path in files.items()}
  assert sources.changed_sources(record, moved, {"seq_len": 5}) == []  # paths do not count
  write(files["items"], b"i\n3\n")
  assert sources.changed_sources(record, files, {"seq_len": 5}) == [f"items ({files['items']})"]
  assert sources.changed_sources(record, files, {"seq_len": 6})[-1] == "build parameters"


def test_a_huge_file_is_hashed_at_both_ends_with_its_size_and_mtime(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "FULL_HASH_MAX_BYTES", 64)
  monkeypatch.setattr(sources, "BLOCK_BYTES", 16)
  data = bytes(range(100))
  path = write(tmp_path / "big.bin", data)
  got = sources.file_fingerprint(path)
  mtime = os.stat(path).st_mtime_ns
  want = hashlib.sha256(data[:16] + data[-16:] + f"100:{mtime}".encode()).hexdigest()
  assert got == {"path": os.fspath(path), "size": 100, "mtime_ns": mtime, "sha256": want}
  small = sources.file_fingerprint(write(tmp_path / "small.bin", data[:50]))
  assert small["sha256"] == hashlib.sha256(data[:50]).hexdigest() and "mtime_ns" not in small


def test_the_build_record_round_trips_and_a_corrupt_one_is_a_clear_error(tmp_path):
  assert sources.read_build_record(tmp_path) is None  # a build from before records existed
  record = sources.build_record("generated_ctr", "tiny", "1.0.0",
                                {"spec": write(tmp_path / "spec.json", b"{}")})
  sources.write_build_record(tmp_path, record)
  assert sources.read_build_record(tmp_path) == record
  first = sources.build_fingerprint(tmp_path, ("spec.json",))
  write(tmp_path / "spec.json", b"{\"a\": 1}")
  assert sources.build_fingerprint(tmp_path, ("spec.json",)) != first
  (tmp_path / sources.BUILD_FILE).write_text("{")
  with pytest.raises(DataError, match=f"{sources.BUILD_FILE} is corrupt"):
    sources.read_build_record(tmp_path)
