"""The experiment (`train.experiment`): in-memory and streamed training batches are the same, a
tuning experiment has no test split, the step count follows the config, a content tower's
learning rate needs a content tower."""

import jax
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


def test_processes_pad_their_unique_rows_to_the_count_they_agree_on(tmp_path, monkeypatch):
  """With several processes each one's batch carries its own shards' distinct items, padded
  to the largest count of any process (`to_model_batch`): the padded batch trains exactly as
  the unpadded one. Here one process plays both, the other process needing 9 more rows."""
  exp = experiment.build_experiment(tiny_train_config(tmp_path))
  assert exp.unique_row_shards == exp.partitioner.data_size == 8  # 4 x 13 positions < 121 rows
  local = next(exp.train_iterator())
  u = local["unique_items"].shape[1]
  plain = exp.to_model_batch(local)
  monkeypatch.setattr(experiment.jax, "process_count", lambda: 2)
  monkeypatch.setattr(experiment, "agree_across_processes",
                      lambda value, reduce: int(reduce([value, value + 9])))
  assert exp.unique_row_shards == 4  # each process's share of the 'data' axis
  padded = exp.to_model_batch(local)
  monkeypatch.undo()
  assert plain["unique_items"].shape == (8, u) and padded["unique_items"].shape == (8, u + 9)
  step = exp.partitioner.train_step(exp.graphdef, exp.tx, exp.shardings, "main")
  fresh = lambda: jax.tree.map(lambda x: x.copy(), exp.state)  # the step donates its state
  (state_a, out_a), (state_b, out_b) = step(fresh(), plain), step(fresh(), padded)
  np.testing.assert_allclose(out_b["loss"], out_a["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_a_content_learning_rate_needs_a_model_with_a_content_tower(tmp_path):
  config = tiny_train_config(tmp_path, model="em3")
  config.optimizer.content_learning_rate = 4e-3
  exp = experiment.build_experiment(config)
  assert "content" in exp.state.opt_state.inner_states  # its own optax group
  config = tiny_train_config(tmp_path, model="dmf")
  config.optimizer.content_learning_rate = 4e-3
  with pytest.raises(config_lib.ConfigError, match="model 'dmf' has no item-content tower"):
    experiment.build_experiment(config)
