"""The training loop in-process (`train.loop`): results files, evaluate, resume, the non-finite
guard, the export binary, MAKE's pre-training phase."""

import json

import numpy as np
import pytest

from dmf_jax.train import checkpointing
from dmf_jax.train import experiment
from dmf_jax.train import loop
from helpers import tiny_train_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  workdir = tmp_path_factory.mktemp("run")
  results = loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
  return data_dir, workdir, results


def test_run_writes_every_output(finished_run):
  _, workdir, results = finished_run
  names = {p.name for p in workdir.iterdir()}
  assert {"config.json", "metrics.jsonl", "results.json", "curves.png", "tensorboard",
          "checkpoints"} <= names
  assert any((workdir / "tensorboard").iterdir())
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["best_step"] in (20, 40) and on_disk["steps"] == 40
  for split in ("validation", "test"):
    assert set(on_disk[split]) >= {"auc", "gauc", "logloss"}
    assert 0.5 < on_disk[split]["auc"] <= 1.0
  assert on_disk["test"]["count"] == 346  # every test example, none twice
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(5, 41, 5))
  assert all({"loss", "steps_per_s", "examples_per_s"} <= set(r) for r in train)
  assert [r["step"] for r in records if r["kind"] == "eval"] == [20, 40]
  kept = checkpointing.CheckpointManager(workdir / "checkpoints", every_steps=10).steps
  assert 40 in kept and len(kept) <= 3  # latest 2 plus the best


def test_evaluate_restores_the_best_checkpoint(finished_run):
  _, workdir, results = finished_run
  got = loop.evaluate_checkpoint(str(workdir), "test")
  assert got["step"] == results["best_step"]
  np.testing.assert_allclose(got["auc"], results["test"]["auc"], rtol=1e-9)
  with pytest.raises(ValueError, match="no checkpoint for step 7"):
    loop.evaluate_checkpoint(str(workdir), "test", step=7)


def test_rerun_of_a_finished_run_resumes_instead_of_retraining(finished_run):
  data_dir, workdir, results = finished_run
  again = loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
  assert again["steps"] == 40 and again["test"] == results["test"]


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path):
  config = tiny_train_config(tmp_path / "data", num_train_steps=30)
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 1e30
  with pytest.raises(loop.NonFiniteLossError, match="non-finite training loss at step"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))


def test_export_binary_scores_like_the_restored_model(finished_run, tmp_path):
  import subprocess
  import sys

  from dmf_jax.serve import server as serving
  from dmf_jax.serve.exported import ExportedScorer

  data_dir, workdir, results = finished_run
  out = tmp_path / "model.dmfx"
  done = subprocess.run(
      [sys.executable, "-m", "experiments.export", f"--workdir={workdir}", f"--output={out}",
       "--buckets=8,64"], cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]),
      capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f"exported step {results['best_step']}" in done.stdout
  exp = experiment.build_experiment(tiny_train_config(data_dir))
  manager = checkpointing.CheckpointManager(workdir / "checkpoints", every_steps=10)
  state = manager.restore(results["best_step"],
                          exp.partitioner.abstract_state(exp.shardings, exp.state),
                          catalog=checkpointing.catalog_of(exp.state)).state
  server = serving.Server(experiment.serving_model(exp, state), candidate_sizes=(8, 64))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3, 50, 17, 4]}
  ids = np.arange(0, 120, 3)
  scorer = ExportedScorer(str(out))
  assert scorer.candidate_sizes == (8, 64)  # --buckets: the flag's earlier name
  np.testing.assert_allclose(scorer.score(scorer.encode_user(user), ids),
                             server.score(server.encode_user(user), ids), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="not a readable exported scorer"):
    ExportedScorer(str(workdir / "config.json"))


def test_make_pretrains_in_the_loop_then_evaluates_the_joined_model(tmp_path):
  """MAKE's 'pretrain' steps come first (logged as such, never evaluated), then the main ones;
  test results include the cold-item metrics."""
  from dmf_jax.train import writers

  config = tiny_train_config(tmp_path / "data", model="make", num_train_steps=10,
                             eval_every_steps=5, checkpoint_every_steps=5)
  config.model_config.make_pretrain_epochs = 1
  results = loop.train_and_evaluate(config, str(tmp_path / "run"))
  records = writers.read_metrics(tmp_path / "run")
  pretrain = [r["step"] for r in records if r["kind"] == "pretrain"]
  evals = [r["step"] for r in records if r["kind"] == "eval"]
  total = results["steps"]
  pretrain_steps = total - 10  # one epoch of the tiny training split
  assert pretrain and max(pretrain) <= pretrain_steps
  assert evals and min(evals) > pretrain_steps and evals[-1] == total  # main phase only
  assert results["best_step"] in evals
  cold = results["test"]["cold"]
  assert cold is None or 0 < cold["count"] < results["test"]["count"]
