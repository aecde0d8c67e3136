"""Content manifests (`core.integrity`): every file recorded, flipped bits, missing and resized
files found and named; the digest."""


import numpy as np
import pytest

from dmf_jax.core import integrity


def make_folder(root):
  (root / "sub" / "deeper").mkdir(parents=True)
  (root / "a.bin").write_bytes(np.random.default_rng(0).bytes(50_000))
  (root / "sub" / "b.json").write_text('{"x": 1}')
  (root / "sub" / "deeper" / "empty").write_bytes(b"")
  return root


def flip(path, offset):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0x01  # one bit
  path.write_bytes(bytes(data))


def test_a_manifest_records_every_file_and_verifies_them(tmp_path):
  folder = make_folder(tmp_path / "step")
  manifest = integrity.write_manifest(folder)
  assert sorted(manifest["files"]) == ["a.bin", "sub/b.json", "sub/deeper/empty"]
  assert manifest["files"]["a.bin"]["size"] == 50_000
  assert integrity.verify_manifest(folder) == 50_000 + 8
  assert not list(folder.glob(".*tmp"))  # written through a temporary file, renamed


@pytest.mark.parametrize("offset", [0, 25_000, 49_999])
def test_one_flipped_bit_is_found_and_the_file_named(tmp_path, offset):
  folder = make_folder(tmp_path / "step")
  integrity.write_manifest(folder)
  flip(folder / "a.bin", offset)
  with pytest.raises(integrity.IntegrityError, match=r"a\.bin does not match its content hash"):
    integrity.verify_manifest(folder)


def test_missing_resized_files_and_a_bad_manifest_are_named(tmp_path):
  folder = make_folder(tmp_path / "step")
  integrity.write_manifest(folder)
  (folder / "sub" / "b.json").write_text('{"x": 12}')
  with pytest.raises(integrity.IntegrityError, match=r"b\.json has 9 bytes, 8 were written"):
    integrity.verify_manifest(folder)
  (folder / "sub" / "b.json").unlink()
  with pytest.raises(integrity.IntegrityError, match=r"b\.json is missing"):
    integrity.verify_manifest(folder)
  (folder / integrity.MANIFEST_FILE).write_text("{garbled")
  with pytest.raises(integrity.IntegrityError, match="dmf_manifest.json is unreadable"):
    integrity.verify_manifest(folder)


def test_the_digest_is_xxh3_128_of_the_bytes(tmp_path):
  import xxhash  # pylint: disable=g-import-not-at-top

  data = np.random.default_rng(1).bytes(3 * (1 << 22) + 5)  # several read chunks
  (tmp_path / "f").write_bytes(data)
  assert integrity.file_digest(tmp_path / "f") == xxhash.xxh3_128(data).hexdigest()
