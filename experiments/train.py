r"""Train and evaluate a CTR model; re-running the same command resumes from the workdir.

  python -m experiments.train --config=experiments/configs/synthetic.py --workdir=/tmp/dmf_run
  python -m experiments.train --config=experiments/configs/synthetic.py --config.model=din \
      --workdir=/tmp/din_run

Writes DIR/config.json, metrics.jsonl, results.json, tensorboard/, curves.png, checkpoints/.
Multi-host: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from dmf_jax import cli
from experiments import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output and checkpoint directory.")
flags.mark_flags_as_required(["config", "workdir"])


def print_results(results: dict, workdir: str) -> None:
  print(f"\n{results['model']} on {results['dataset']}: best step {results['best_step']} of "
        f"{results['steps']}, {results['train_seconds']:.0f} s of training")
  print(f"{'split':<22}{'AUC':>8}{'GAUC':>8}{'logloss':>9}{'examples':>10}")
  rows = [("validation", results["validation"]), ("test", results["test"])]
  if results["test"].get("cold"):
    rows.append(("test, cold items", results["test"]["cold"]))
  for split, m in rows:
    print(f"{split:<22}{m['auc']:>8.4f}{m['gauc']:>8.4f}{m['logloss']:>9.4f}"
          f"{m['count']:>10,.0f}")
  if results["test"].get("cold"):
    print(f"cold items: {results['cold_item_definition']}")
  print(f"results: {workdir}/results.json, curves: {workdir}/curves.png, "
        f"checkpoints: {workdir}/checkpoints/, TensorBoard: {workdir}/tensorboard/")


def main(argv):
  del argv  # refused by cli.run when not empty
  distributed.initialize()
  from dmf_jax.train import loop  # pylint: disable=g-import-not-at-top

  try:
    results = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except loop.NonFiniteLossError as e:  # not a user error, but not a bug either
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() == 0:
    print_results(results, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
