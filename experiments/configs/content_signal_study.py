r"""EM3 where end-to-end content training should win: generated data whose clicks also follow a
cross-modal product of hidden item content (`generated_ctr/content_signal`,
`dmf_jax.data.synthetic.ContentSignal`), which the frozen cosine cannot express.

  python -m experiments.ablation --config=experiments/configs/content_signal_study.py \
      --models=din,em3 --baseline=din --seeds=5 --output_dir=/tmp/study_content

The MovieLens study's protocol (`movielens_study.py`): up to 30 epochs, validation every half
epoch, early stopping after 4 evaluations without a better validation AUC, test metrics of the
best checkpoint by validation AUC. Every model keeps the defaults (no tuning on this data).
"""

from dmf_jax.train.config import default_config


def get_config():
  config = default_config()
  config.model = "em3"  # the model under study (ablation's --models picks the runs)
  config.dataset = "generated_ctr"
  config.dataset_config = "content_signal"
  config.batch_size = 512  # as the MovieLens study
  config.num_epochs = 30  # an upper bound: early stopping ends the runs
  config.eval_every_steps = 64  # about half an epoch (~65,000 training examples / 512)
  config.checkpoint_every_steps = 64
  config.patience = 4  # evaluations without a better validation AUC
  config.optimizer.learning_rate = 2e-3  # as the MovieLens study
  return config
