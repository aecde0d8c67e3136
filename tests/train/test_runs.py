"""Workdirs: one run each (the lock), resume only into the same run (the fingerprint),
starting over only on request (overwrite moves the old run aside), and corrupt checkpoints
moved aside so that the run finishes."""

import json
import os
import subprocess
import sys
import time

import pytest

from dmf_jax.train import checkpointing
from dmf_jax.core import locking
from dmf_jax.train import config as config_lib
from dmf_jax.train import runs
from dmf_jax.train import experiment
from dmf_jax.train import loop
from dmf_jax.train import restore
from dmf_jax.train import tuning
from helpers import copy_run, snapshot, tiny_train_config


def test_changed_config_refuses_and_leaves_the_run_intact(data_dir, finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  before = snapshot(workdir)
  for change, field in [({"model": "din"}, "model: 'dmf' in the workdir, 'din' now"),
                        ({"model_config.bucket_dim": 8}, "model_config.bucket_dim: 4 in the "
                                                         "workdir, 8 now")]:
    config = tiny_train_config(data_dir)
    for key, value in change.items():
      section, _, name = key.rpartition(".")
      (config[section] if section else config)[name] = value
    with pytest.raises(runs.RunMismatchError) as err:
      loop.train_and_evaluate(config, str(workdir))
    message = str(err.value)
    assert field in message and "--workdir" in message and "--config.overwrite=True" in message
    assert "corrupt" not in message and len(message.splitlines()) <= 6
  assert snapshot(workdir) == before  # byte-identical: nothing written, nothing moved
  got = loop.evaluate_checkpoint(str(workdir), "test")
  assert got["auc"] == pytest.approx(finished[1]["test"]["auc"], rel=1e-9)


def test_fields_that_may_change_resume(data_dir, finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  config = tiny_train_config(data_dir, num_train_steps=50, patience=2, log_every_steps=10,
                             eval_every_steps=25)
  results = loop.train_and_evaluate(config, str(workdir))
  assert results["steps"] == 50
  for field in ("num_epochs", "num_train_steps", "eval_every_steps", "patience",
                "log_every_steps"):
    assert field in runs.RESUMABLE_FIELDS


def test_overwrite_moves_the_old_run_aside(data_dir, finished, tmp_path, capsys):
  workdir = copy_run(finished, tmp_path)
  before = snapshot(workdir)
  config = tiny_train_config(data_dir, overwrite=True, num_train_steps=10)
  config.model = "din"
  results = loop.train_and_evaluate(config, str(workdir))
  assert results["model"] == "din" and results["steps"] == 10
  moved = [p for p in tmp_path.iterdir() if p.name.startswith("copy.replaced-")]
  assert len(moved) == 1 and snapshot(moved[0]) == before
  assert f"moved the old run in {workdir} to {moved[0]}" in capsys.readouterr().err
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in records) == 10  # no lines of the old run


def test_an_older_workdir_without_run_json_is_checked_against_its_config(data_dir, finished,
                                                                          tmp_path):
  workdir = copy_run(finished, tmp_path)
  (workdir / runs.RUN_FILE).unlink()
  config = tiny_train_config(data_dir)
  config.model = "din"
  with pytest.raises(runs.RunMismatchError, match="model: 'dmf' in the workdir, 'din' now"):
    loop.train_and_evaluate(config, str(workdir))


def test_a_mismatched_checkpoint_is_not_called_corrupt(data_dir, finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  for name in (runs.RUN_FILE, "config.json"):  # no record of the run: only the checkpoints
    (workdir / name).unlink()
  config = tiny_train_config(data_dir)
  config.model_config.bucket_dim = 8
  with pytest.raises(checkpointing.CheckpointMismatchError) as err:
    loop.train_and_evaluate(config, str(workdir))
  message = str(err.value)
  assert "not corrupt" in message, message
  assert "params/attention/weights/buckets/tables/value: (2, 8, 4) float32 saved, (2, 8, 8)" in message
  assert not (workdir / "checkpoints" / checkpointing.CORRUPT_DIR).exists()


def garble(step_dir, mode):
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and (mode == "garbage" or "/d/" in str(path)):
      if mode == "garbage":
        path.write_bytes(b"garbage")
      else:  # truncate the array data, keep the metadata
        with open(path, "r+b") as f:
          f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("mode", ["garbage", "truncated"])
def test_a_corrupt_latest_checkpoint_is_moved_aside_and_the_rerun_finishes(
    data_dir, finished, tmp_path, capsys, mode):
  workdir = copy_run(finished, tmp_path)
  garble(workdir / "checkpoints" / "40", mode)
  results = loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
  assert results["steps"] == 40
  err = capsys.readouterr().err
  warnings = [l for l in err.splitlines() if "unreadable" in l]
  assert len(warnings) == 1 and "step 40" in warnings[0], err
  assert "resumed from step 30" in err
  moved = list((workdir / "checkpoints" / checkpointing.CORRUPT_DIR).iterdir())
  assert [p.name.split("-")[0] for p in moved] == ["40"]
  assert 40 in checkpointing.CheckpointManager(workdir / "checkpoints", every_steps=10).steps
  # and again: nothing left to trip on
  assert loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))["steps"] == 40


def test_all_checkpoints_corrupt_start_afresh_after_moving_them(data_dir, finished, tmp_path,
                                                                 capsys):
  workdir = copy_run(finished, tmp_path)
  steps = checkpointing.CheckpointManager(workdir / "checkpoints", every_steps=10).steps
  assert len(steps) == 2
  (workdir / "checkpoints" / str(steps[-1]) / checkpointing.METADATA_FILE).write_text("")
  garble(workdir / "checkpoints" / str(steps[0]), "garbage")
  results = loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
  assert results["steps"] == 40
  err = capsys.readouterr().err
  assert "no readable checkpoint left" in err and "starting from step 0" in err
  assert "resumed" not in err
  moved = sorted(p.name.split("-")[0] for p in
                 (workdir / "checkpoints" / checkpointing.CORRUPT_DIR).iterdir())
  assert moved == sorted(str(s) for s in steps)
  assert len(err.splitlines()) < 10


def test_bookkeeping_records_must_be_complete():
  with pytest.raises(ValueError, match="lacks"):
    loop.Bookkeeping.from_json({})
  with pytest.raises(ValueError, match="lacks"):
    loop.Bookkeeping.from_json({"best_step": 3})


HOLD = """
import sys, time
from dmf_jax.core.locking import FileLock
with FileLock(sys.argv[1], purpose="a test holder"):
  print("held", flush=True)
  time.sleep(60)
"""


def test_a_second_run_into_a_locked_workdir_stops_at_once(data_dir, finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir / runs.LOCK_FILE)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    start = time.time()
    with pytest.raises(locking.LockedError) as err:
      loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
    assert f"pid {holder.pid}" in str(err.value) and "a test holder" in str(err.value)
    assert time.time() - start < 60
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_of_a_dead_run_is_taken_over(data_dir, finished, tmp_path, capsys):
  workdir = copy_run(finished, tmp_path)
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (workdir / runs.LOCK_FILE).write_text(json.dumps(
      {"pid": dead.pid, "host": "somewhere", "started": time.time(), "purpose": "training run"}))
  assert loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))["steps"] == 40
  err = capsys.readouterr().err
  assert f"took over the stale lock {workdir / runs.LOCK_FILE} of pid {dead.pid}" in err
  assert not (workdir / runs.LOCK_FILE).exists()  # released at the end


def test_file_lock_waits_for_its_holder(tmp_path):
  path = tmp_path / "x.lock"
  holder = subprocess.Popen([sys.executable, "-c", HOLD.replace("60", "2"), str(path)],
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  said = []
  start = time.time()
  with locking.FileLock(path, purpose="waiter", wait=True, log=said.append):
    assert time.time() - start > 0.5
    assert locking.FileLock(path, purpose="x").holder()["purpose"] == "waiter"
  holder.wait()
  assert len(said) == 1 and "waiting for" in said[0] and "a test holder" in said[0]
  assert not os.path.exists(path)


def test_the_readme_serving_example_runs_as_written(finished):
  import pathlib  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top

  workdir, _ = finished
  readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
  block = readme.split("\n## Serving\n")[1].split("```python\n")[1].split("```")[0]
  assert 'Server.from_workdir("/tmp/dmf_run")' in block  # the main job's workdir
  model, _, _ = restore.load_model(str(workdir))
  namespace = {"model": model}
  exec(block.replace("/tmp/dmf_run", str(workdir)), namespace)  # pylint: disable=exec-used
  logits = namespace["logits"]
  assert logits.shape == (100,) and np.all(np.isfinite(logits))


def test_server_from_workdir_serves_a_model_sharded_run(data_dir, tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top

  from dmf_jax.serve import server as serving  # pylint: disable=g-import-not-at-top

  config = tiny_train_config(data_dir, num_train_steps=4, eval_every_steps=4,
                             checkpoint_every_steps=4)
  config.mesh.model = 2  # tables row-sharded (and padded) over 2 devices
  workdir = tmp_path / "sharded"
  results = loop.train_and_evaluate(config, str(workdir))
  server = serving.Server.from_workdir(str(workdir), candidate_sizes=(8, 64))
  assert server.step == results["best_step"]
  exp = experiment.build_experiment(config)
  manager = checkpointing.CheckpointManager(workdir / "checkpoints", every_steps=4)
  state = manager.restore(server.step,
                          exp.partitioner.abstract_state(exp.shardings, exp.state),
                          catalog=checkpointing.catalog_of(exp.state)).state
  reference = serving.Server(experiment.serving_model(exp, state), candidate_sizes=(8, 64))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3, 50, 17, 4]}
  ids = np.arange(0, 120, 3)
  np.testing.assert_allclose(server.score(server.encode_user(user), ids),
                             reference.score(reference.encode_user(user), ids), rtol=1e-5,
                             atol=1e-6)


def test_metrics_label_both_throughputs(finished):
  workdir, results = finished
  train = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
           if json.loads(l)["kind"] == "train"]
  assert train and all(r["examples_per_s"] > 0 and r["wall_examples_per_s"] > 0 for r in train)
  assert (workdir / "curves.png").exists() and results["dataset"] == "generated_ctr/tiny"


def test_fields_added_later_at_their_defaults_do_not_change_a_run_identity():
  """A run recorded before `init_from` / `vector_dtype` existed (or by a version that wrote
  them at their defaults) resumes; a non-default value is a difference."""
  base = {"model": "dmf", "seed": 0}
  for recorded, current in ((base, {**base, "model_config.vector_dtype": "float32"}),
                            ({**base, "model_config.vector_dtype": "float32", "init_from": ""},
                             base)):
    assert runs.differences(recorded, current) == []
  assert runs.differences(base, {**base, "init_from": "/runs/yesterday"}) == [
      "init_from: '<unset>' in the workdir, '/runs/yesterday' now"]
  assert runs.differences({**base, "model_config.vector_dtype": "float32"},
                          {**base, "model_config.vector_dtype": "bfloat16"}) != []


def test_a_finished_din_run_resumes_after_a_dmf_only_field_changes(data_dir, tmp_path):
  """A run's identity is its family's config: DMF's bucket_dim or num_tiers do not touch a
  DIN run; DIN's own fields (and the model) still do."""
  config = tiny_train_config(data_dir, num_train_steps=10)
  config.model = "din"
  workdir = tmp_path / "din"
  first = loop.train_and_evaluate(config, str(workdir))
  for field, value in (("bucket_dim", 8), ("num_tiers", 3)):
    config.model_config[field] = value
  again = loop.train_and_evaluate(config, str(workdir))  # finished: resumes, reports
  assert again["test"]["auc"] == first["test"]["auc"]
  config.model_config.din_hidden = (7,)  # DIN's own field: another run
  with pytest.raises(runs.RunMismatchError, match="model_config.din_hidden"):
    loop.train_and_evaluate(config, str(workdir))
  recorded, current = {"model": "dmf", "model_config.bucket_dim": 4}, {"model": "din"}
  assert runs.differences(recorded, current) == ["model: 'dmf' in the workdir, 'din' now"]


def test_fields_added_later_are_listed_at_the_defaults_the_config_has():
  """ADDED_FIELDS must name real config fields at their current defaults, or runs recorded
  before a field existed would not resume (or would resume under another setting)."""
  flat = runs._flatten(config_lib.default_config().to_dict())  # pylint: disable=protected-access
  for key, default in runs.ADDED_FIELDS.items():
    assert key in flat, key
    assert flat[key] == default, key


def test_a_new_model_family_is_one_module_and_one_registry_line(data_dir, finished, tmp_path):
  """A toy family (its own config class and field, defined here as its module would be)
  registered with `register_model`: it trains from the command-line config, and a finished run
  of another family, recorded before the toy existed, still resumes, with no identity
  bookkeeping (`runs.ADDED_FIELDS`) touched; the tuner searches its knobs."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from dmf_jax.core import checks  # pylint: disable=g-import-not-at-top
  from dmf_jax.models import registry  # pylint: disable=g-import-not-at-top
  from dmf_jax.models.din import DIN, DinConfig  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class ToyConfig(DinConfig):
    toy_scale: float = checks.field(1.0, "positive")

    @classmethod
    def search_space(cls):
      return {**super().search_space(), "toy_scale": [0.5, 1.0]}

  class Toy(DIN):
    def score(self, state, candidates, *, train=False, rngs=None):
      return self.config.toy_scale * super().score(state, candidates, train=train, rngs=rngs)

  workdir = copy_run(finished, tmp_path)  # a dmf run recorded before the toy family existed
  added = dict(runs.ADDED_FIELDS)
  registry.register_model("toy", Toy, ToyConfig)
  try:
    config = tiny_train_config(data_dir, num_train_steps=10)
    assert config.model_config.toy_scale == 1.0  # the flat config gained the field
    space = tuning.search_space("toy")  # the tuner tries the family's own knobs too
    assert {"model_config.toy_scale", "model_config.din_hidden"} <= set(space)
    assert "model_config.num_heads" not in space
    config.model = "toy"
    config.model_config.toy_scale = 0.5
    results = loop.train_and_evaluate(config, str(tmp_path / "toy"))
    assert results["model"] == "toy" and 0.0 < results["test"]["auc"] < 1.0
    again = loop.train_and_evaluate(tiny_train_config(data_dir), str(workdir))
    assert again["test"]["auc"] == finished[1]["test"]["auc"]
  finally:
    registry.MODELS.pop("toy")
  assert runs.ADDED_FIELDS == added
