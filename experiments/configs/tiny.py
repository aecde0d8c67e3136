r"""A seconds-long run on the tiny generated dataset (smoke tests, the Colab demo, CI).

  python -m experiments.train --config=experiments/configs/tiny.py --workdir=/tmp/tiny_run
"""

from dmf_jax.train.config import default_config


def get_config():
  config = default_config()
  config.dataset_config = "tiny"
  config.model_config.update(dict(
      num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
      mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8))
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 40
  config.eval_every_steps = 20
  config.checkpoint_every_steps = 10
  config.log_every_steps = 5
  config.patience = 0
  return config
