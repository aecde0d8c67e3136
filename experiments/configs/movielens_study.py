r"""MovieLens-100K study protocol: train to convergence, select on validation only.

  python -m experiments.ablation --config=experiments/configs/movielens_study.py \
      --config.manual_dir=../shared/datasets/movielens-100k-mm \
      --models=din,dien,bst,din_mm_concat,simscore,simtier,make,em3,dmf_no_me,dmf_no_mc,dmf,dmf_early_fusion \
      --seeds=5 --output_dir=/tmp/study_ml

Up to 30 epochs, evaluation on validation every half epoch (80,024 training examples / 512 = 156
steps per epoch), early stopping after 4 evaluations (2 epochs) without a better validation
AUC; the test metrics are those of the best checkpoint by validation AUC.

Per-model values (`config.per_model.<model>`) come from `experiments.tune` runs on the
validation split; BUILD_NOTES.md ("Tuning") gives each tuning command and its trials. A run
sees its own model's values only (`dmf_jax.train.config.with_model_values`); a model without
an entry uses the shared values below.
"""

import ml_collections

from dmf_jax.train.config import default_config

# model -> {section: {field: value}}, from the validation-only tuning runs (see the docstring).
PER_MODEL: dict[str, dict] = {}


def get_config():
  config = default_config()
  config.model = "dmf"
  config.dataset = "movielens_100k_mm"
  config.dataset_config = "text_image"
  config.batch_size = 512
  config.eval_batch_size = 2048
  config.num_epochs = 30
  config.eval_every_steps = 78  # half an epoch
  config.checkpoint_every_steps = 78
  config.patience = 4
  config.optimizer.learning_rate = 2e-3
  config.per_model = ml_collections.ConfigDict(PER_MODEL)
  return config
