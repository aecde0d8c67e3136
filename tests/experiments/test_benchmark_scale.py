"""benchmark_scale's catalog rows: each row built in turn and timed in rounds alternating with the
1,000-item row; the figures per row and round, and the ratio against the 1,000-item row per
round."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_catalog_rows_are_timed_in_alternating_rounds(tmp_path):
  out = tmp_path / "scale.json"
  done = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark_scale", f"--data_dir={tmp_path}",
       f"--output_json={out}", "--num_items=3000,1000,2000", "--long_seq_items=0",
       "--build_config=", "--batch_size=16", "--steps=2", "--rounds=3", "--sparse_min_rows=2000",
       "--nohuge_pages"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads(out.read_text())["catalog"]
  assert [r["num_items"] for r in rows] == [3000, 1000, 2000]  # the order asked
  large, small, middle = rows
  assert large["unique_rows"] is not None  # 3,001 rows > 16 x 51 positions: batch-unique rows
  assert len(small["step_ms_by_round"]) == 6  # 3 rounds beside each of the two other rows
  for row in rows:
    assert all(t > 0 for t in row["step_ms_by_round"])
    assert abs(row["train_examples_per_s"] * row["step_ms_median"] / 1e3 - 16) < 0.1
  assert small["vs_1000_items"] == small["vs_1000_items_by_round"] == 1.0
  for row, base_rounds in ((large, small["step_ms_by_round"][:3]),
                           (middle, small["step_ms_by_round"][3:])):
    assert len(row["step_ms_by_round"]) == 3
    ratios = [a / b for a, b in zip(base_rounds, row["step_ms_by_round"])]
    # the median of the rounds' ratios (of unrounded step times: within the figures' rounding)
    assert abs(row["vs_1000_items_by_round"] - sorted(ratios)[1]) < 0.002
