r"""Validation-only hyperparameter search for one model (the test split is never read).

  python -m experiments.tune --config=experiments/configs/movielens_study.py \
      --config.manual_dir=../shared/datasets/movielens-100k-mm --model=dmf --trials=9 \
      --method=halving --min_epochs=1 --config.num_epochs=9 --output_dir=/tmp/tune_dmf

Writes DIR/trials.jsonl (one line per trial and rung; DIR/trials.md as a table), DIR/best.json (the chosen values, as a
`per_model` entry to paste into a study config, or for a variant the values to merge into it) and each trial's workdir under DIR/trials/.
Re-running the command resumes the search. See `dmf_jax.train.tuning`.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from dmf_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_MODEL = flags.DEFINE_string("model", None, "The model to tune: a registered model or a "
                             "variant of the config (tuned from its own values).")
_TRIALS = flags.DEFINE_integer("trials", 8, "Settings tried; trial 0 is the config's own values.", lower_bound=1)
_METHOD = flags.DEFINE_enum("method", "random", ["random", "halving"], "Search method.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampled settings.")
_MIN_EPOCHS = flags.DEFINE_integer("min_epochs", 1, "Halving: epochs of the first rung.",
                                  lower_bound=1)
_ETA = flags.DEFINE_integer("eta", 3, "Halving: keep 1/eta of the trials per rung.",
                            lower_bound=2)
_KNOBS = flags.DEFINE_list("knobs", [], "Search only these (model fields or dotted paths, e.g. "
                           "content_dim,optimizer.learning_rate); the rest stay at the config's "
                           "values. Default: the model's whole search space.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where trials and results are written.")
flags.mark_flags_as_required(["config", "model", "output_dir"])


def main(argv):
  del argv  # refused by cli.run when not empty
  from dmf_jax.train import tuning  # pylint: disable=g-import-not-at-top

  best = tuning.tune(_CONFIG.value, _MODEL.value, _TRIALS.value, _OUTPUT_DIR.value,
                     method=_METHOD.value, seed=_SEED.value, min_epochs=_MIN_EPOCHS.value,
                     eta=_ETA.value, knobs=_KNOBS.value, log=lambda m: print(m, flush=True))
  print(json.dumps(best, indent=2))


if __name__ == "__main__":
  cli.run(main)
