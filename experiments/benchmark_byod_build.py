r"""BYOD build benchmark: a generated interactions CSV of many rows, built by `python -m
data.build --dataset=byod_ctr` in a child process (wall time, the child's peak RSS).

  python -m experiments.benchmark_byod_build --work_dir=/tmp/byod10m --rows=10000000 \
      --users=1000000 --items=1000000

writes WORK_DIR/raw/ (interactions.csv with user,item,timestamp,label in random order; a 64-d
text modality for the items that occur; dataset.json with hashed user and item ids) unless it
is there, builds it into WORK_DIR/tfds and prints
  {"rows": R, "csv_bytes": b, "seconds": s, "peak_rss_bytes": m, "records_by_split": {...}}
A WORK_DIR that already holds the build is refused by data.build's own checks (use another).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
from absl import flags
from etils import epath

from dmf_jax import data
from dmf_jax import cli

_WORK_DIR = flags.DEFINE_string("work_dir", None, "Folder for the raw files and the build.",
                                required=True)
_ROWS = flags.DEFINE_integer("rows", 10_000_000, "Interactions.")
_USERS = flags.DEFINE_integer("users", 1_000_000, "Distinct users drawn from.")
_ITEMS = flags.DEFINE_integer("items", 1_000_000, "Distinct items drawn from.")
_TEXT_DIM = flags.DEFINE_integer("text_dim", 64, "Width of the items' text vectors.")


def write_sources(raw: epath.Path) -> None:
  rng = np.random.default_rng(0)
  n = _ROWS.value
  user, item = rng.integers(0, _USERS.value, n), rng.integers(0, _ITEMS.value, n)
  table = pa.table({"user": pa.array(np.char.add("u", user.astype(str))),
                    "item": pa.array(np.char.add("i", item.astype(str))),
                    "timestamp": rng.integers(0, 10**9, n), "label": rng.integers(0, 2, n)})
  raw.mkdir(parents=True, exist_ok=True)
  pa.csv.write_csv(table, str(raw / "interactions.csv"))
  ids = np.char.add("i", np.unique(item).astype(str))  # no items table: the items that occur
  np.save(raw / "text.npy", rng.standard_normal((len(ids), _TEXT_DIM.value), dtype=np.float32))
  (raw / "text_ids.txt").write_text("\n".join(ids) + "\n")
  (raw / "dataset.json").write_text(json.dumps(
      {"interactions": "interactions.csv", "label": "label", "seq_len": 50,
       "hash": {"user": 1 << 20, "item": 1 << 20, "num_hashes": 2},
       "modalities": {"text": {"vectors": "text.npy", "ids": "text_ids.txt"}}}, indent=2))


def main(argv):
  del argv
  work = epath.Path(_WORK_DIR.value).expanduser()
  raw, data_dir = work / "raw", work / "tfds"
  if not (raw / "dataset.json").exists():
    write_sources(raw)
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "data.build", "--dataset=byod_ctr",
                  f"--manual_dir={raw}", f"--data_dir={data_dir}"], check=True)
  seconds = time.perf_counter() - start
  built = data.prepare("byod_ctr", None, str(data_dir), manual_dir=str(raw))
  print(json.dumps({
      "rows": _ROWS.value, "csv_bytes": (raw / "interactions.csv").stat().length,
      "seconds": round(seconds, 1),
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
      "records_by_split": {k: len(v) for k, v in built.sources.items()}}))


if __name__ == "__main__":
  cli.run(main)
