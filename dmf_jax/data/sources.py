"""Fingerprints of a build's raw sources and of the built dataset itself.

A source file's fingerprint is its size and a SHA-256 of its bytes: the whole file up to
`FULL_HASH_MAX_BYTES`, else its first and last `BLOCK_BYTES` plus its size and modification
time (a change inside a huge file that keeps its size and mtime is the one case not caught).
A build records the fingerprints of everything it read in `dmf_build.json`, beside the records:

  {"dataset": "byod_ctr", "config": "src-1a2b3c4d5e6f", "version": "1.0.0",
   "source_fingerprint": "<hex>", "sources": {"dataset.json": {...}, "interactions": {...}},
   "parameters": {...}, "built_at": "2026-12-01T10:00:00"}

`build_fingerprint` identifies a built dataset's content (its sources, schema and catalog):
training runs record it and refuse to resume on a different build.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from etils import epath

from dmf_jax.core.errors import DataError

BUILD_FILE = "dmf_build.json"
FULL_HASH_MAX_BYTES = 64 << 20
BLOCK_BYTES = 1 << 20


def file_fingerprint(path: epath.PathLike) -> dict:
  """{"path", "size", "sha256", ["mtime_ns"]} of one file (see the module docstring)."""
  path = epath.Path(path)
  stat = path.stat()
  size = stat.length if hasattr(stat, "length") else os.stat(path).st_size
  digest = hashlib.sha256()
  record = {"path": os.fspath(path), "size": int(size)}
  with path.open("rb") as f:
    if size <= FULL_HASH_MAX_BYTES:
      for block in iter(lambda: f.read(BLOCK_BYTES), b""):
        digest.update(block)
    else:
      digest.update(f.read(BLOCK_BYTES))
      f.seek(size - BLOCK_BYTES)
      digest.update(f.read(BLOCK_BYTES))
      record["mtime_ns"] = int(os.stat(path).st_mtime_ns)
      digest.update(f"{size}:{record['mtime_ns']}".encode())
  record["sha256"] = digest.hexdigest()
  return record


def digest_of(value) -> str:
  """SHA-256 of a JSON-serializable value (keys sorted)."""
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def source_fingerprint(files: dict[str, epath.PathLike], parameters: dict | None = None
                       ) -> tuple[str, dict]:
  """(digest, per-role file fingerprints) of a build's inputs; paths do not enter the digest
  (the same files elsewhere are the same source)."""
  records = {role: file_fingerprint(path) for role, path in sorted(files.items())}
  keyed = {role: {k: v for k, v in r.items() if k != "path"} for role, r in records.items()}
  return digest_of({"files": keyed, "parameters": parameters or {}}), records


def build_record(dataset: str, config: str | None, version: str, files: dict,
                 parameters: dict | None = None) -> dict:
  digest, records = source_fingerprint(files, parameters)
  return {"dataset": dataset, "config": config, "version": version,
          "source_fingerprint": digest, "sources": records, "parameters": parameters or {},
          "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_build_record(directory: epath.PathLike, record: dict) -> None:
  (epath.Path(directory) / BUILD_FILE).write_text(json.dumps(record, indent=2))


def read_build_record(directory: epath.PathLike) -> dict | None:
  """The build's record, or None for a build made before records existed."""
  path = epath.Path(directory) / BUILD_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise DataError(f"{path} is corrupt ({e}): the build cannot be identified") from None


def changed_sources(record: dict, files: dict[str, epath.PathLike],
                    parameters: dict | None = None) -> list[str]:
  """The roles whose files (or parameters) differ from what the build `record` read."""
  digest, now = source_fingerprint(files, parameters)
  if digest == record.get("source_fingerprint"):
    return []
  then = record.get("sources", {})
  strip = lambda r: {k: v for k, v in r.items() if k != "path"}
  changed = []
  for role in sorted(set(now) | set(then)):
    a, b = now.get(role), then.get(role)
    if a is None or b is None or strip(a) != strip(b):
      changed.append(f"{role} ({(a or b)['path']})")
  if json.loads(json.dumps(parameters or {}, default=str)) != record.get("parameters", {}):
    changed.append("build parameters")
  return changed or ["the source fingerprint"]


def build_fingerprint(directory: epath.PathLike, side_files: tuple[str, ...]) -> str:
  """Digest of a built dataset's content: its build record's source fingerprint (when it has
  one) and the bytes of its side files (schema and catalog)."""
  directory = epath.Path(directory)
  record = read_build_record(directory)
  parts = {"sources": record.get("source_fingerprint") if record else None}
  for name in side_files:
    parts[name] = file_fingerprint(directory / name)["sha256"]
  return digest_of(parts)
