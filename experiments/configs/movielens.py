r"""MovieLens-100K with text and poster modalities (real data; see README: data preparation).

  python -m experiments.train --config=experiments/configs/movielens.py \
      --config.manual_dir=../shared/datasets/movielens-100k-mm --workdir=/tmp/ml_dmf
  python -m experiments.train --config=experiments/configs/movielens.py --config.model=din \
      --config.dataset_config=ids --config.manual_dir=../shared/datasets/movielens-100k-mm \
      --workdir=/tmp/ml_din

The text_image config needs the encoder cache (data/movielens_100k_mm/encode_items.py).
"""

from dmf_jax.train.config import default_config


def get_config():
  config = default_config()
  config.model = "dmf"
  config.dataset = "movielens_100k_mm"
  config.dataset_config = "text_image"
  config.batch_size = 256
  config.num_epochs = 5
  config.eval_every_steps = 156  # about half an epoch of 80,024 examples
  config.checkpoint_every_steps = 156
  config.patience = 3
  config.optimizer.learning_rate = 1e-3
  return config
