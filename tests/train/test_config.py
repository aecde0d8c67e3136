"""Experiment configs (`train.config`): validation lists every problem at once."""

import pytest

from dmf_jax.train import config as config_lib
from helpers import tiny_train_config


def test_config_errors_list_every_problem(tmp_path):
  config = tiny_train_config(tmp_path)
  config.model = "dnn"
  config.batch_size = 30  # not divisible by the 8-device data axis
  config.model_config.num_heads = 0
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=8)
  message = str(err.value)
  assert ("unknown model 'dnn'; valid models: bst, bst_mm_concat, dien, dien_mm_concat, din, "
          "din_mm_concat, dmf") in message
  assert "batch_size=30 is not divisible by the mesh's data axis (8)" in message
  assert "num_heads must be a positive int" in message

  config = tiny_train_config(tmp_path)
  config.dataset = "movielens_100k_mm"
  with pytest.raises(config_lib.ConfigError, match="is not built under .* no manual_dir"):
    config_lib.validate(config, num_devices=1)
  config.mesh.model = 3
  with pytest.raises(config_lib.ConfigError, match="mesh.model=3 does not divide the 8 devices"):
    config_lib.validate(config, num_devices=8)
  config = tiny_train_config(tmp_path)
  config.optimizer.name = "lamb"
  with pytest.raises(config_lib.ConfigError, match="optimizer.name 'lamb' is not one of"):
    config_lib.validate(config, num_devices=1)
  config = tiny_train_config(tmp_path)
  config.dataset, config.dataset_config = "generated_ctr", "huge"
  with pytest.raises(config_lib.ConfigError,
                     match="dataset_config: generated_ctr has no config 'huge'; valid: "):
    config_lib.validate(config, num_devices=1)
