r"""Train and compare models over seeds with one config; selection on validation only.

  python -m experiments.ablation --config=experiments/configs/movielens.py \
      --config.manual_dir=../shared/datasets/movielens-100k-mm \
      --models=din,din_mm_concat,simscore,simtier,make,dmf_no_me,dmf_no_mc,dmf,dmf_early_fusion \
      --seeds=3 --output_dir=/tmp/ablation_ml
  # the modality ladder: NAME[mod1+mod2] restricts a model to those modalities
  python -m experiments.ablation --config=experiments/configs/movielens.py \
      --models=din,simtier[text],simtier[image],simtier,dmf[text],dmf[image],dmf \
      --seeds=3 --output_dir=/tmp/ladder_ml

Writes DIR/results.json (one record per model and seed), DIR/results.md (mean ± std, gains over
din; the robustness table: test AUC with each modality missing for --missing_fractions of the
items) and DIR/results.png; each run's own workdir is DIR/runs/<model>/seed_<s>/ (dmf[text]: dmf--text). Re-running the
command skips finished runs and resumes an interrupted one. A study split over several
invocations (one --first_seed each, or one --models each) is summarized as one table by
--summarize_only, which trains nothing and leaves out the runs that have not finished.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from dmf_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_MODELS = flags.DEFINE_list("models", None, "Model specs: NAME or NAME[mod1+mod2].")
_SEEDS = flags.DEFINE_integer("seeds", 3, "Number of seeds (0 .. seeds-1).", lower_bound=1)
_FIRST_SEED = flags.DEFINE_integer("first_seed", 0, "The first seed.")
_BASELINE = flags.DEFINE_string("baseline", "din", "Model the gains are measured against.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where results and runs are written.")
_MISSING = flags.DEFINE_list(
    "missing_fractions", ["0.25", "0.5", "1.0"],
    "Robustness report: each run's best checkpoint evaluated on test with each modality "
    "missing for these fractions of the items (empty: no report).")
_SUMMARIZE_ONLY = flags.DEFINE_bool(
    "summarize_only", False,
    "Train nothing: summarize the runs of --models x seeds that have finished (e.g. by "
    "invocations with different --first_seed), leaving out the others.")
flags.mark_flags_as_required(["config", "models", "output_dir"])


def main(argv):
  del argv  # refused by cli.run when not empty
  from dmf_jax.train import ablation  # pylint: disable=g-import-not-at-top

  try:
    specs = [ablation.ModelSpec.parse(m) for m in _MODELS.value]
  except ValueError as e:
    cli.fail(str(e))
  try:
    fractions = [float(p) for p in _MISSING.value]
  except ValueError:
    cli.fail(f"--missing_fractions={','.join(_MISSING.value)}: expected numbers in [0, 1]")
  if any(not 0.0 <= p <= 1.0 for p in fractions):
    cli.fail(f"--missing_fractions={','.join(_MISSING.value)}: expected numbers in [0, 1]")
  config = _CONFIG.value
  with config.unlocked():
    config.progress = False
  seeds = list(range(_FIRST_SEED.value, _FIRST_SEED.value + _SEEDS.value))
  ablation.run_ablation(config, specs, seeds, _OUTPUT_DIR.value, baseline=_BASELINE.value,
                        missing_fractions=fractions, train=not _SUMMARIZE_ONLY.value,
                        log=lambda m: print(m, flush=True))
  with open(f"{_OUTPUT_DIR.value}/results.md") as f:
    print(f.read())


if __name__ == "__main__":
  cli.run(main)
