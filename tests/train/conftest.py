"""Fixtures of the workdir tests (test_runs, test_trust, test_checkpointing): one per test
module."""

import pytest

from dmf_jax.train import loop
from helpers import tiny_train_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
  """(workdir, results) of a finished tiny run: checkpoints at 30 and 40 (the best kept
  too), results.json."""
  workdir = tmp_path_factory.mktemp("runs") / "dmf"
  results = loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
  return workdir, results
