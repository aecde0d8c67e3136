r"""The cost of checkpoint content manifests against the save itself (seconds per GB).

  python -m experiments.benchmark_checkpoint --gigabytes=1 --directory=/tmp/ckpt_bench

Saves a pytree of random float32 arrays (about --gigabytes) with Orbax, as a training run's
checkpoints are saved, then times writing its manifest (`dmf_jax.core.integrity`: XXH3-128
of every file) and verifying it, and, for comparison, hashing the same files with hashlib's
sha256. Each figure is the median of --repeats runs; the files are in the page cache, as they
are right after a save.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import time
import warnings

import jax.numpy as jnp
import numpy as np
from absl import flags
from orbax.checkpoint import v1 as ocp

from dmf_jax.core import integrity
from dmf_jax import cli

_GB = flags.DEFINE_float("gigabytes", 1.0, "Size of the saved state.")
_DIR = flags.DEFINE_string(
    "directory", "/tmp/dmf_checkpoint_bench",
    "Scratch folder, made by this benchmark and removed at its end (an existing folder that an "
    "earlier run of it did not make is refused unless --force).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of each figure (median).")
_OUTPUT = flags.DEFINE_string("output_json", None, "Also write the figures here.")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --output_json or --directory.")
_MARK = ".dmf_checkpoint_bench"  # in the scratch folder: made by this benchmark


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _sha256_all(folder: pathlib.Path) -> None:
  for path in sorted(p for p in folder.rglob("*") if p.is_file()):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
      while chunk := f.read(1 << 22):
        digest.update(chunk)


def main(argv):
  del argv
  cli.refuse_to_replace("output_json", _OUTPUT.value, _FORCE.value)
  root = pathlib.Path(_DIR.value).expanduser()
  if root.exists():
    if not (root / _MARK).exists() and not _FORCE.value:
      cli.fail(f"--directory: {root} exists and is not this benchmark's scratch folder; give a "
               "new folder or --force to replace it")
    shutil.rmtree(root)
  root.mkdir(parents=True)
  (root / _MARK).touch()
  rng = np.random.default_rng(0)
  rows = max(1, int(_GB.value * 2**30 / 4 / 4096))
  state = {"table": jnp.asarray(rng.standard_normal((rows, 4096), np.float32)),
           "dense": jnp.asarray(rng.standard_normal((512, 512), np.float32))}
  saves = []

  def save():
    path = root / f"step_{len(saves)}"
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", DeprecationWarning)
      ocp.save_pytree(path, state)
    saves.append(path)

  save_s = _median_seconds(save, _REPEATS.value)
  step = saves[-1]
  size = sum(p.stat().st_size for p in step.rglob("*") if p.is_file())
  manifest_s = _median_seconds(lambda: integrity.write_manifest(step), _REPEATS.value)
  verify_s = _median_seconds(lambda: integrity.verify_manifest(step), _REPEATS.value)
  sha256_s = _median_seconds(lambda: _sha256_all(step), _REPEATS.value)
  gb = size / 1e9
  figures = {
      "bytes_on_disk": size, "save_seconds": save_s, "manifest_seconds": manifest_s,
      "verify_seconds": verify_s, "sha256_seconds": sha256_s,
      "save_seconds_per_gb": save_s / gb, "manifest_seconds_per_gb": manifest_s / gb,
      "verify_seconds_per_gb": verify_s / gb, "sha256_seconds_per_gb": sha256_s / gb,
      "manifest_over_save": manifest_s / save_s, "cpus": os.cpu_count(),
  }
  print(json.dumps(figures, indent=2))
  if _OUTPUT.value:
    pathlib.Path(_OUTPUT.value).write_text(json.dumps(figures, indent=2))
  shutil.rmtree(root)


if __name__ == "__main__":
  cli.run(main)
