"""The training system in-process: results files, evaluate, config errors, resume fallback,
the non-finite guard, and tables sharded over a ('data', 'model') mesh of 8 fake devices."""

import json
import shutil

import jax
import numpy as np
import optax
import pytest

from dmf_jax.train import checkpointing
from dmf_jax.train import config as config_lib
from dmf_jax.models import registry
from dmf_jax.train import partitioner as pt
from dmf_jax.data import synthetic
from dmf_jax.train import loop
from helpers import TINY, one_device_and_mesh_runs, tiny_train_config


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


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(finished_run, capsys, tmp_path):
  data_dir, original, _ = finished_run
  workdir = tmp_path / "copy"  # corrupt a copy: other tests restore the original
  shutil.copytree(original, workdir)
  exp = loop.build_experiment(tiny_train_config(data_dir))
  abstract = exp.partitioner.abstract_state(exp.shardings, exp.state)
  manager = checkpointing.CheckpointManager(workdir / "checkpoints", every_steps=10)
  latest, previous = manager.steps[-1], manager.steps[-2]
  for path in (workdir / "checkpoints" / str(latest) / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b"garbage")
  restored, _ = manager.restore_latest(abstract, lambda: None,
                                       catalog=checkpointing.catalog_of(exp.state))
  assert restored.step == previous
  assert f"checkpoint at step {latest}" in capsys.readouterr().out


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


def test_training_iterator_in_memory_or_streamed_gives_the_same_batches(tmp_path):
  config = tiny_train_config(tmp_path)
  cached = loop.build_experiment(config)
  config = config.copy_and_resolve_references()  # the experiment keeps the one it was given
  config.in_memory_max_records = 0
  streamed = loop.build_experiment(config)
  assert cached.train_in_memory and not streamed.train_in_memory
  a, b = cached.train_iterator(), streamed.train_iterator()
  for _ in range(3):
    x, y = next(a), next(b)
    for key in y:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)
  config.in_memory_max_records = -1
  with pytest.raises(config_lib.ConfigError, match="in_memory_max_records must be >= 0"):
    config_lib.validate(config, num_devices=1)


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path):
  config = tiny_train_config(tmp_path / "data", num_train_steps=30)
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 1e30
  with pytest.raises(loop.NonFiniteLossError, match="non-finite training loss at step"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))


def test_tables_sharded_on_model_axis_match_one_device():
  runs = one_device_and_mesh_runs(lambda: optax.adam(3e-3))
  for name, (partitioner, state, _) in runs.items():
    table = state.params["items"]["item_id"]["table"]["embedding"][...]
    if name == "4x2 mesh":
      assert dict(partitioner.mesh.shape) == {"data": 4, "model": 2}
      assert table.sharding.spec == jax.sharding.PartitionSpec("model", None)
      assert len({str(s.index) for s in table.addressable_shards}) == 2  # rows split in two
      adam_mu = state.opt_state[0].mu["items"]["item_id"]["table"]["embedding"][...]
      assert adam_mu.sharding.spec == table.sharding.spec  # optimizer state follows
    else:
      assert table.sharding.spec == jax.sharding.PartitionSpec()
  np.testing.assert_allclose(runs["4x2 mesh"][2], runs["1 device"][2], rtol=2e-5)


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
  exp = loop.build_experiment(tiny_train_config(data_dir))
  manager = checkpointing.CheckpointManager(workdir / "checkpoints", every_steps=10)
  state = manager.restore(results["best_step"],
                          exp.partitioner.abstract_state(exp.shardings, exp.state),
                          catalog=checkpointing.catalog_of(exp.state)).state
  server = serving.Server(loop.serving_model(exp, state), buckets=(8, 64))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3, 50, 17, 4]}
  ids = np.arange(0, 120, 3)
  scorer = ExportedScorer(str(out))
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


SMALL_MODELS = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
                    mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8, modality_token_dim=8,
                    make_hidden=(16,), qformer_width=16, content_dim=8, contrastive_dim=8,
                    contrastive_negatives="sampled", contrastive_num_negatives=16)


@pytest.mark.parametrize("name,head", [(name, "mlp") for name in sorted(registry.MODELS)]
                         + [("din", "dcnv2"), ("dmf", "dcnv2")])
def test_every_model_trains_on_a_sharded_mesh(name, head):
  """Every registered model compiles and trains on a 4x2 ('data', 'model') mesh with explicit
  axes (arrays created inside a model must carry the batch's sharding); MAKE both phases;
  DIN and DMF with the DCNv2 head too."""
  schema, catalog, splits = synthetic.make_examples(TINY)
  config = {"name": name, "head": head, "cross_layers": 2, **SMALL_MODELS}
  factory = lambda rules, rngs: registry.build_model(config, schema, rngs=rngs, sharding=rules)
  partitioner = pt.Partitioner(pt.MeshConfig(model=2))
  tx = optax.adam(3e-3)
  graphdef, state, shardings = partitioner.init(factory, tx, seed=0, schema=schema,
                                                catalog=catalog)
  phases = ("pretrain", "main") if name == "make" else ("main",)
  for phase in phases:
    step = partitioner.train_step(graphdef, tx, shardings, phase)
    for i in range(2):
      batch = partitioner.shard_batch({k: v[i * 32:(i + 1) * 32]
                                       for k, v in splits["train"].items()})
      state, out = step(state, batch)
      assert np.isfinite(float(out["loss"])), (name, phase)
  logits = partitioner.predict_step(graphdef, shardings)(state, batch)
  assert logits.shape == (32,)
  cross = state.params["head"].get("cross") if "head" in state.params else None
  assert (cross is not None and len(cross["up"]) == 2) == (head == "dcnv2")


def test_checkpoints_hold_a_catalog_fingerprint_not_the_catalog(finished_run, tmp_path):
  """The frozen catalog is data: left out of checkpoints (its fingerprint is kept), put back
  from the dataset on restore; another catalog is refused; a checkpoint from before (catalog
  inside) still restores."""
  data_dir, original, results = finished_run
  exp = loop.build_experiment(tiny_train_config(data_dir))
  abstract = exp.partitioner.abstract_state(exp.shardings, exp.state)
  catalog = checkpointing.catalog_of(exp.state)
  manager = checkpointing.CheckpointManager(original / "checkpoints", every_steps=10,
                                            catalog_fingerprint=exp.catalog_fingerprint)
  best = results["best_step"]
  saved = checkpointing._shapes(manager._saved_structure(best))
  assert saved and not [k for k in saved if "catalog" in k]
  assert any(k.startswith("params/items/item_id") for k in saved)
  metadata = manager._checkpointer.metadata(best).custom_metadata
  assert metadata["catalog_fingerprint"] == exp.catalog_fingerprint == (
      exp.dataset.catalog.fingerprint())
  restored = manager.restore(best, abstract, catalog=catalog)
  assert "catalog_fingerprint" not in restored.bookkeeping
  vectors = restored.state.rest["catalog"]["modalities"]["text"][...]
  np.testing.assert_array_equal(np.asarray(vectors)[:120], exp.dataset.catalog.modalities["text"])

  workdir = tmp_path / "copy"
  shutil.copytree(original, workdir)
  other = checkpointing.CheckpointManager(workdir / "checkpoints", every_steps=10,
                                          catalog_fingerprint="0" * 64)
  with pytest.raises(checkpointing.CatalogMismatchError, match="another item catalog"):
    other.restore(best, abstract, catalog=catalog)
  with pytest.raises(checkpointing.CatalogMismatchError, match="the dataset build changed"):
    other.restore_latest(abstract, lambda: None, catalog=catalog)
  assert other.steps == manager.steps and not (workdir / "checkpoints" / "corrupt").exists()

  # A checkpoint written with the catalog inside the state (before it was left out).
  legacy = checkpointing.CheckpointManager(tmp_path / "legacy", every_steps=1)
  legacy._checkpointer.save_checkpointables(1, {"state": restored.state}, force=True)
  legacy._checkpointer.wait()
  assert any("catalog" in k for k in checkpointing._shapes(legacy._saved_structure(1)))
  again = legacy.restore(1, abstract, catalog=catalog).state
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(restored.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
