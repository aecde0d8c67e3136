r"""DMF (or any registered model) on the generated dataset: the default main job.

  python -m experiments.train --config=experiments/configs/synthetic.py --workdir=/tmp/dmf_run
  python -m experiments.train --config=experiments/configs/synthetic.py --config.model=din \
      --workdir=/tmp/din_run

About one minute per model on 2 CPU cores, the first build of the data included.
"""

from dmf_jax.train.config import default_config


def get_config():
  config = default_config()
  config.model = "dmf"
  config.dataset = "generated_ctr"
  config.dataset_config = "default"
  config.batch_size = 512
  config.num_epochs = 2
  config.eval_every_steps = 62
  config.checkpoint_every_steps = 62
  config.patience = 2
  config.optimizer.learning_rate = 1e-3
  return config
