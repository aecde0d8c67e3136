"""The evaluation batch (`train.eval_batch`, `Experiment.eval_batch_size`): the largest power
of two times the data unit whose compiled working set fits the budget, capped at the largest
split; the same metrics as a fixed batch."""

import math

import numpy as np
import pytest

from dmf_jax.train import config as config_lib
from dmf_jax.train import eval_batch, experiment, loop
from helpers import tiny_train_config


def test_largest_fitting_extrapolates_the_two_probes_and_caps_at_the_split():
  fixed, per_row = 1000, 10
  calls = []

  def working_set(rows):
    calls.append(rows)
    return fixed + per_row * rows

  size, figures = eval_batch.largest_fitting(working_set, unit=8, largest=100_000,
                                             budget=fixed + per_row * 3000)
  assert size == 2048 and calls == [512, 1024, 2048]  # 4096 rows would need 41,960 bytes
  assert figures["bytes_per_row"] == pytest.approx(per_row)
  assert figures["fixed_bytes"] == pytest.approx(fixed)
  assert eval_batch.largest_fitting(working_set, unit=8, largest=1500, budget=10 ** 9)[0] == 1504
  assert eval_batch.largest_fitting(working_set, unit=8, largest=100_000, budget=10)[0] == 8
  size, _ = eval_batch.largest_fitting(lambda rows: None, unit=8, largest=100_000, budget=10 ** 9)
  assert size == eval_batch.FALLBACK_BATCH  # no memory figures from XLA


def test_a_size_beyond_the_probes_is_measured_and_refitted_until_it_fits():
  """A fixed peak larger than the per-row part at the probes' size (EM3's content tower over
  the whole catalog) makes both probes measure the same bytes: the line says everything fits.
  The size chosen is compiled and measured, and refitted from that measurement."""
  fixed, per_row, budget = 14 << 20, 50_000, 32 << 20
  calls = []

  def working_set(rows):
    calls.append(rows)
    return max(fixed, (1 << 20) + per_row * rows)

  size, figures = eval_batch.largest_fitting(working_set, unit=1, largest=9988, budget=budget)
  assert calls == [64, 128, 9988, 256, 512]  # the probes, the split the line allowed, refits
  assert size == 512 and working_set(512) <= budget < working_set(1024)  # the largest 2^k
  assert figures["checked"] == [[r, max(fixed, (1 << 20) + per_row * r)] for r in (9988, 256, 512)]
  # A linear working set: one check of the size the line chose, which fits.
  calls.clear()
  size, figures = eval_batch.largest_fitting(lambda rows: calls.append(rows) or 1000 + 10 * rows,
                                             unit=8, largest=100_000, budget=1000 + 10 * 3000)
  assert size == 2048 and calls == [512, 1024, 2048] and figures["checked"] == [[2048, 21480]]
  # Nothing beyond the probes fits: the largest probe.
  size, figures = eval_batch.largest_fitting(
      lambda rows: 10 if rows <= 128 else 10 ** 9 * rows, unit=1, largest=10 ** 6, budget=10 ** 4)
  assert size == 128 and figures["checked"] == [[8192, 8192 * 10 ** 9]]
  # A steeper part beyond a flat one: refitted from the size that fits up to the true largest.
  calls.clear()
  steep = lambda rows: calls.append(rows) or (10 if rows <= 1000 else 10 + 1000 * (rows - 1000))
  size, figures = eval_batch.largest_fitting(steep, unit=1, largest=10 ** 6, budget=3 * 10 ** 6)
  assert size == 2048 and calls == [64, 128, 10 ** 6, 2048]  # 4,096 rows: 3,096,010 bytes


def test_the_cpu_budget_is_the_largest_cache_listed(tmp_path):
  for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "32768K")):
    (tmp_path / index).mkdir()
    (tmp_path / index / "size").write_text(size + "\n")
  assert eval_batch.last_level_cache_bytes(str(tmp_path)) == 32 << 20
  assert eval_batch.last_level_cache_bytes(str(tmp_path / "none")) == eval_batch.CPU_CACHE_FALLBACK


def test_the_cpu_budget_is_capped_by_the_processors_that_share_the_cache():
  per_cpu = eval_batch.CPU_CACHE_PER_CPU
  assert eval_batch.cpu_cache_budget(32 << 20, 16) == (32 << 20, "the CPU's last-level cache")
  budget, what = eval_batch.cpu_cache_budget(480 << 20, 2)  # a 2-core VM listing its host's L3
  assert budget == 2 * per_cpu and "of the 480 MiB listed" in what
  assert eval_batch.cpu_cache_budget(480 << 20, 0)[0] == per_cpu


def test_an_experiment_sizes_its_evaluation_batch_to_the_budget_with_the_same_metrics(
    tmp_path, monkeypatch):
  config = tiny_train_config(tmp_path, eval_batch_size=0)
  exp = experiment.build_experiment(config)
  predict = exp.partitioner.predict_step(exp.graphdef, exp.shardings)
  unit = math.lcm(exp.partitioner.data_size, 1)
  sample = exp._eval_sample("validation", unit)

  def compiled_bytes(rows):
    batch = {k: np.zeros((rows * v.shape[0] // unit, *v.shape[1:]), v.dtype)
             for k, v in sample.items()}
    batch = exp.partitioner.shard_batch(batch)
    nbytes = sum(v.nbytes for v in batch.values()) // exp.partitioner.data_size
    return eval_batch.working_set_bytes(predict.compile(exp.state, batch), nbytes)

  budget = (compiled_bytes(128) + compiled_bytes(256)) // 2  # between 128 and 256 rows
  monkeypatch.setattr(eval_batch, "device_budget", lambda device: (budget, "a test budget"))
  size = exp.eval_batch_size(predict)
  assert size == 128 and size % unit == 0, exp.eval_sizing
  assert compiled_bytes(size) <= budget < compiled_bytes(2 * size)
  assert exp.eval_batch_size(predict) == size  # sized once

  fixed = experiment.build_experiment(tiny_train_config(tmp_path, eval_batch_size=64))
  want = loop.evaluate_split(fixed, predict, fixed.state, "validation")
  got = loop.evaluate_split(exp, predict, exp.state, "validation")
  for key in ("auc", "gauc", "logloss"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


def test_eval_batch_size_zero_is_valid_and_negative_is_refused(tmp_path):
  config = tiny_train_config(tmp_path, eval_batch_size=0)
  config_lib.validate(config, num_devices=1)
  config.eval_batch_size = -8
  with pytest.raises(config_lib.ConfigError, match="eval_batch_size: must be a non-negative"):
    config_lib.validate(config, num_devices=1)
