r"""The daily-update flow, measured: train on window 1, then on window 2 (more users, items and
events) from window 1's checkpoint, against window 2 from scratch.

  python -m experiments.two_windows --data_dir=/tmp/dmf_data --workdir=/tmp/two_windows

Data: generated_ctr/window1 (the first 14,000 users and 4,000 items, the events before
t = 16,000) and generated_ctr/window2 (20,000 users, 5,000 items, all events). The three runs
(DMF, the main job's settings, early stopping on validation AUC) go to WORKDIR/{window1,
window2_scratch, window2_from_window1}; the table compares window 2's test AUC and the steps
each run needed to reach the best validation AUC of the run from scratch. Writes
WORKDIR/two_windows.json.
"""

from __future__ import annotations

import json

from absl import flags
from etils import epath

from dmf_jax.train import loop, writers
from dmf_jax.train.config import default_config
from dmf_jax import cli

_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/dmf_data", "TFDS data dir.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the three runs go.", required=True)
_EPOCHS = flags.DEFINE_integer("epochs", 4, "Most epochs per run (early stopping on validation).")
_MODEL = flags.DEFINE_string("model", "dmf", "Model.")


def run_config(window: str, init_from: str = ""):
  config = default_config()
  config.model = _MODEL.value
  config.dataset_config = window
  config.data_dir = _DATA_DIR.value
  config.num_epochs = _EPOCHS.value
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 100
  config.patience = 3
  config.progress = False
  config.init_from = init_from
  return config


def steps_to_reach(workdir: epath.Path, target: float) -> int | None:
  """The first evaluated step whose validation AUC is at least `target`."""
  for record in writers.read_metrics(workdir):
    if record["kind"] == "eval" and record["val_auc"] >= target:
      return int(record["step"])
  return None


def main(argv):
  del argv
  root = epath.Path(_WORKDIR.value).expanduser()
  dirs = {name: root / name for name in ("window1", "window2_scratch", "window2_from_window1")}
  results = {
      "window1": loop.train_and_evaluate(run_config("window1"), str(dirs["window1"])),
      "window2_scratch": loop.train_and_evaluate(run_config("window2"),
                                                 str(dirs["window2_scratch"])),
      "window2_from_window1": loop.train_and_evaluate(
          run_config("window2", init_from=str(dirs["window1"])),
          str(dirs["window2_from_window1"])),
  }
  target = results["window2_scratch"]["validation"]["auc"]
  table = {}
  for name, r in results.items():
    table[name] = {"test_auc": r["test"]["auc"], "test_gauc": r["test"]["gauc"],
                   "validation_auc": r["validation"]["auc"], "best_step": r["best_step"],
                   "steps": r["steps"], "train_seconds": r["train_seconds"],
                   "steps_to_scratch_best_val_auc": (steps_to_reach(dirs[name], target)
                                                     if name != "window1" else None)}
  print(f"{'run':24s} {'test AUC':>9s} {'val AUC':>8s} {'best step':>9s} {'steps':>6s} "
        f"{'steps to scratch best val':>26s}")
  for name, row in table.items():
    reach = row["steps_to_scratch_best_val_auc"]
    print(f"{name:24s} {row['test_auc']:9.4f} {row['validation_auc']:8.4f} "
          f"{row['best_step']:9d} {row['steps']:6d} {str(reach if reach else '-'):>26s}")
  (root / "two_windows.json").write_text(json.dumps(table, indent=2))
  print(f"wrote {root / 'two_windows.json'}")


if __name__ == "__main__":
  cli.run(main)
