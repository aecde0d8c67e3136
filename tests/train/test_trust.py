"""Trust in a run's files: checkpoints verified by content (flipped bits are found before a
restore, and a finished run's result is never replaced by a damaged one), a refused run
changes nothing, and the lock comes before anything else."""

import json
import shutil
import subprocess
import sys
import time

import pytest

from dmf_jax.core import locking
from dmf_jax.train import checkpointing
from dmf_jax.train import config as config_lib
from dmf_jax.train import loop
from dmf_jax.train import runs
from helpers import copy_run, flip_array_bytes, snapshot, tiny_train_config

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_flipped_bits_in_the_latest_checkpoint_fall_back_and_keep_the_result(
    data_dir, finished, tmp_path, capsys):
  assert finished[1]["best_step"] == 40 and finished[1]["steps"] == 40
  workdir = copy_run(finished, tmp_path)
  good = json.loads((workdir / "results.json").read_text())
  damaged = flip_array_bytes(workdir, 40)
  with pytest.raises(checkpointing.CorruptCheckpointError) as err:
    loop.evaluate_checkpoint(str(workdir), "test", step=40)
  assert "step 40" in str(err.value) and damaged.name in str(err.value)
  assert (workdir / "checkpoints" / "40").exists()  # evaluation only reads: nothing moved

  results = loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
  said = capsys.readouterr().err
  warning = next(line for line in said.splitlines() if "step 40" in line)
  assert warning.startswith("WARNING") and damaged.name in warning and "moved it to" in warning
  assert "resumed from step 30" in said
  assert results["test"] == good["test"] and results["validation"] == good["validation"]
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["test"] == good["test"] and on_disk["best_step"] == 40
  assert [p.name.split("-")[0] for p in (workdir / "checkpoints" / "corrupt").iterdir()] == ["40"]
  # The curves do not loop back: steps 35 and 40 were reported again, once each.
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for kind, steps in (("train", list(range(5, 41, 5))), ("eval", [20, 40])):
    assert [r["step"] for r in records if r["kind"] == kind] == steps


def test_evaluate_of_a_damaged_step_exits_2_and_writes_nothing(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  flip_array_bytes(workdir, 40)
  done = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}", "--step=40"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  assert "Traceback" not in done.stderr and "step 40" in done.stderr and "corrupt" in done.stderr
  assert not (workdir / "eval_test.json").exists()


def test_results_are_never_replaced_by_a_non_finite_or_worse_evaluation(tmp_path):
  with pytest.raises(loop.ResultError, match="the test evaluation: non-finite logloss nan"):
    loop.check_finite({"auc": 0.5, "logloss": float("nan")}, "the test evaluation")
  loop.check_finite({"auc": float("nan"), "logloss": 0.6}, "one class: AUC undefined")
  path = tmp_path / "results.json"
  path.write_text(json.dumps({"best_step": 40, "validation": {"auc": 0.75}}))
  worse = {"best_step": 40, "validation": {"auc": 0.5}}
  with pytest.raises(loop.ResultError, match="0.5000.* records 0.7500 for the same step"):
    loop.check_against_recorded(worse, path)
  loop.check_against_recorded({"best_step": 40, "validation": {"auc": 0.7502}}, path)
  loop.check_against_recorded({"best_step": 60, "validation": {"auc": 0.5}}, path)


# --- a refused run changes nothing ---------------------------------------------------------


def test_a_refused_run_without_run_json_writes_nothing(data_dir, finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  (workdir / "run.json").unlink()
  (workdir / "config.json").unlink()
  before = snapshot(workdir)
  with pytest.raises(checkpointing.CheckpointMismatchError):
    loop.train_and_evaluate(tiny_train_config(data_dir, model="din"), str(workdir))
  assert snapshot(workdir) == before  # no run.json of the refused config
  again = loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
  assert again["test"] == finished[1]["test"]  # the original command still resumes


def test_a_batch_larger_than_the_split_is_refused_before_the_workdir_is_made(data_dir, tmp_path):
  workdir = tmp_path / "new"
  with pytest.raises(config_lib.ConfigError, match="batch_size=4096 is larger than the training"):
    loop.train_and_evaluate(tiny_train_config(data_dir, batch_size=4096), str(workdir))
  assert not workdir.exists()


def test_bad_warm_starts_are_refused_before_the_workdir_is_claimed(data_dir, finished, tmp_path):
  source = copy_run(finished, tmp_path, "source")
  workdir = tmp_path / "new"
  config = tiny_train_config(data_dir, model="din", init_from=str(source))
  with pytest.raises(config_lib.ConfigError, match="init_from: .* trained model 'dmf'"):
    loop.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
  config = tiny_train_config(data_dir, init_from=str(source))
  config.model_config.num_heads = 4  # other dimensions
  with pytest.raises(config_lib.ConfigError, match="does not fit this model"):
    loop.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
  shutil.rmtree(source / "checkpoints")
  with pytest.raises(ValueError, match="holds no checkpoint"):
    loop.train_and_evaluate(tiny_train_config(data_dir, init_from=str(source)),
                                 str(workdir))
  assert not workdir.exists()


def test_the_lock_is_taken_before_the_dataset_is_opened(tmp_path):
  workdir, fresh_data = tmp_path / "run", tmp_path / "tfds"
  workdir.mkdir()
  with locking.FileLock(workdir / runs.LOCK_FILE, purpose="another run"):
    start = time.time()
    with pytest.raises(locking.LockedError, match="another run"):
      loop.train_and_evaluate(tiny_train_config(fresh_data), str(workdir))
    assert time.time() - start < 5
  assert not fresh_data.exists()  # nothing was built or opened


def test_a_workdir_that_is_a_file(data_dir, tmp_path):
  workdir = tmp_path / "a_file"
  workdir.write_text("x")
  with pytest.raises(ValueError, match="is a file, not a folder"):
    loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
  assert workdir.read_text() == "x"


def test_a_workdir_that_cannot_be_written(data_dir, finished, tmp_path, monkeypatch):
  # A read-only file system (or folder; the tests run as root, whom permissions do not stop)
  # refuses to create the lock file: os.open raises EROFS there.
  import errno  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  real_open = os.open

  def read_only_open(path, flags, *args):
    if str(path).endswith(runs.LOCK_FILE):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real_open(path, flags, *args)

  monkeypatch.setattr(locking.os, "open", read_only_open)
  for workdir in (copy_run(finished, tmp_path), tmp_path / "new"):  # a finished run, a new one
    with pytest.raises(ValueError, match="cannot be written .Read-only file system"):
      loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
