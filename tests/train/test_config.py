"""Experiment configs (`train.config`): validation lists every problem at once."""

import pytest

from dmf_jax.train import config as config_lib
from dmf_jax.train.optimizers import OptimizerConfig
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


def test_every_variant_and_model_value_of_the_study_config_is_a_valid_model_config():
  """What the MovieLens study config names (its per-model values and variants) builds its
  model's typed config: a misspelt field fails here, not an hour into a study."""
  from experiments.configs import movielens_study  # pylint: disable=g-import-not-at-top
  from dmf_jax.models import registry  # pylint: disable=g-import-not-at-top

  base = movielens_study.get_config()
  names = list(base.variants) + list(base.per_model)
  assert "em3_dmf_tuned" in names and "em3" in names
  for name in names:
    resolved = config_lib.with_model_values(_named(base.copy_and_resolve_references(), name))
    model = registry.model_config({**resolved.model_config.to_dict(), "name": resolved.model})
    assert model.name == resolved.model
    OptimizerConfig.from_mapping(resolved.optimizer.to_dict())
  tuned = config_lib.with_model_values(_named(movielens_study.get_config(), "em3_dmf_tuned"))
  assert (tuned.model, tuned.model_config.em3_head, tuned.model_config.lora_rank) == (
      "em3", "dmf", 0)
  # The content tower's tuned rates, and the component rungs at the shared one (em3's
  # per-model rate does not move them).
  content_rate = lambda name: config_lib.with_model_values(
      _named(movielens_study.get_config(), name)).optimizer.content_learning_rate
  assert (content_rate("em3"), content_rate("em3_dmf_tuned")) == (4e-3, 1e-3)
  assert content_rate("em3_cl003") is None and content_rate("em3_dmf_tower") is None


def _named(config, model):
  with config.unlocked():
    config.model = model
  return config
