"""Starting a run from another run's checkpoint on a newer build with more users and items."""

import numpy as np
import pytest

from dmf_jax.core.errors import ConfigError
from dmf_jax.train import config as config_lib
from dmf_jax.train import experiment
from dmf_jax.train import loop
from dmf_jax.train import restore
from dmf_jax.train import warm_start
from helpers import tiny_run, tiny_train_config

ITEM_TABLE = ("items", "item_id", "table", "embedding")
USER_TABLE = ("users", "fields", "user_id", "table", "embedding")


def table(state, path, group="params"):
  tree = getattr(state, group)
  for key in (("0", "mu") if group == "opt_state" else ()):
    tree = tree[int(key)] if key.isdigit() else getattr(tree, key)
  for key in path:
    tree = tree[key]
  return np.asarray(tree[...])


@pytest.fixture(scope="module")
def window1_run(tmp_path_factory):
  return tiny_run(tmp_path_factory, "tiny_window1", num_train_steps=20, eval_every_steps=10,
                  checkpoint_every_steps=10)


def test_grown_vocabularies_keep_the_known_rows_and_init_the_new(window1_run):
  data_dir, source = window1_run
  run = restore.restore_run(source)
  assert run.dataset.schema.num_items == 100
  exp = experiment.build_experiment(tiny_train_config(data_dir, dataset_config="tiny_window2"))
  assert exp.dataset.schema.num_items == 120
  fresh = {p: table(exp.state, p) for p in (ITEM_TABLE, USER_TABLE)}
  messages = []
  state = warm_start.warm_start(exp, str(source), optimizer_state=True, log=messages.append)
  assert "100 of 120 rows carried" in messages[0] and "90 of 150 rows carried" in messages[0]
  for path, (new_vocab, old_vocab) in ((ITEM_TABLE, (120, 100)), (USER_TABLE, (150, 90))):
    for group in ("params", "opt_state"):
      old, new = table(run.state, path, group), table(state, path, group)
      np.testing.assert_array_equal(new[:old_vocab], old[:old_vocab], err_msg=str(path))
      np.testing.assert_array_equal(new[new_vocab], old[old_vocab])  # the OOV row
    # Ids only the new build knows keep this run's initialisation.
    np.testing.assert_array_equal(table(state, path)[old_vocab:new_vocab],
                                  fresh[path][old_vocab:new_vocab])
  # Everything else is copied as it is.
  head_old = np.asarray(run.state.params["head"]["tower"]["layers"][0]["kernel"][...])
  np.testing.assert_array_equal(np.asarray(state.params["head"]["tower"]["layers"][0]["kernel"][...]),
                                head_old)
  np.testing.assert_array_equal(np.asarray(state.opt_state[0].count),
                                np.asarray(run.state.opt_state[0].count))


def test_training_from_another_run_and_its_errors(window1_run, tmp_path):
  data_dir, source = window1_run
  config = tiny_train_config(data_dir, dataset_config="tiny_window2", num_train_steps=10,
                             eval_every_steps=10, checkpoint_every_steps=10,
                             init_from=str(source))
  results = loop.train_and_evaluate(config, str(tmp_path / "warm"))
  assert results["steps"] == 10 and np.isfinite(results["test"]["auc"])

  other = tiny_train_config(data_dir, dataset_config="tiny_window2", init_from=str(source))
  other.model_config.mlp_hidden = (24, 16)  # other head dimensions
  exp = experiment.build_experiment(other)
  with pytest.raises(ConfigError,
                     match=r"(?s)does not fit this model.*head/tower/layers/0/kernel: \(88, 32\) in"):
    warm_start.warm_start(exp, str(source), optimizer_state=False)
  missing = tiny_train_config(data_dir, init_from=str(tmp_path / "nowhere"))
  with pytest.raises(ConfigError, match="init_from: .*nowhere is not a training workdir"):
    config_lib.validate(missing, num_devices=8)


def test_row_sparse_moments_carry_with_grown_vocabularies(tmp_path_factory):
  """Row-sparse tables' moments (opt_state.rows) are matched by table path like optax's."""
  data_dir, source = tiny_run(tmp_path_factory, "tiny_window1", num_train_steps=10,
                              eval_every_steps=10, checkpoint_every_steps=10,
                              optimizer={"sparse_min_rows": 1})
  run = restore.restore_run(source)
  config = tiny_train_config(data_dir, dataset_config="tiny_window2",
                             optimizer={"sparse_min_rows": 1})
  exp = experiment.build_experiment(config)
  state = warm_start.warm_start(exp, str(source), optimizer_state=True, log=lambda _: None)
  for path, (new_vocab, old_vocab) in ((ITEM_TABLE, (120, 100)), (USER_TABLE, (150, 90))):
    for moment in ("m", "v"):
      old = np.asarray(_at(run.state.opt_state.rows[moment], path))
      new = np.asarray(_at(state.opt_state.rows[moment], path))
      assert new.shape[0] > old.shape[0] and np.abs(old[:old_vocab]).sum() > 0
      np.testing.assert_array_equal(new[:old_vocab], old[:old_vocab], err_msg=str(path))
      np.testing.assert_array_equal(new[new_vocab], old[old_vocab])  # the OOV row
      np.testing.assert_array_equal(new[old_vocab:new_vocab], 0.0)  # new ids: fresh moments
  assert int(state.opt_state.count) == int(run.state.opt_state.count) == 10


def _at(tree, path):
  for key in path:
    tree = tree[key]
  return tree[...]
