"""The experiment (`train.experiment`): in-memory and streamed training batches are the same, a
tuning experiment has no test split, the step count follows the config."""

import numpy as np
import pytest

from dmf_jax.train import config as config_lib
from dmf_jax.train import experiment
from helpers import tiny_train_config


def test_training_iterator_in_memory_or_streamed_gives_the_same_batches(tmp_path):
  config = tiny_train_config(tmp_path)
  cached = experiment.build_experiment(config)
  config = config.copy_and_resolve_references()  # the experiment keeps the one it was given
  config.in_memory_max_records = 0
  streamed = experiment.build_experiment(config)
  assert cached.train_in_memory and not streamed.train_in_memory
  a, b = cached.train_iterator(), streamed.train_iterator()
  for _ in range(3):
    x, y = next(a), next(b)
    for key in y:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  config.in_memory_max_records = -1
  with pytest.raises(config_lib.ConfigError, match="in_memory_max_records must be >= 0"):
    config_lib.validate(config, num_devices=1)


def test_a_tuning_experiment_has_no_test_split_and_counts_its_steps(tmp_path):
  config = tiny_train_config(tmp_path, num_train_steps=0, num_epochs=2, batch_size=64)
  exp = experiment.build_experiment(config, test=False)
  assert "test" not in exp.dataset.sources and {"train", "validation"} <= set(exp.dataset.sources)
  per_epoch = len(exp.dataset.sources["train"]) // 64
  assert exp.total_steps == experiment.total_train_steps(config, 64 * per_epoch) == 2 * per_epoch
  assert exp.phase(0) == "main" and exp.pretrain_steps == 0
