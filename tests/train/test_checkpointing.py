"""Checkpoints (`train.checkpointing`): a content manifest per step, verified before a restore
(missing, damaged or older-version steps), the fall-back to the previous step, and the frozen
catalog kept as a fingerprint rather than saved."""

import json
import shutil

import jax
import numpy as np
import pytest

from dmf_jax.core import integrity
from dmf_jax.train import checkpointing
from dmf_jax.train import experiment
from dmf_jax.train import loop
from helpers import copy_run, tiny_train_config


def test_every_saved_step_has_a_manifest_of_its_files(finished):
  workdir, results = finished
  assert results["best_step"] == 40 and results["steps"] == 40  # the step damaged below
  for step_dir in (workdir / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      manifest = json.loads((step_dir / integrity.MANIFEST_FILE).read_text())
      on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*")
                 if p.is_file() and p.name != integrity.MANIFEST_FILE}
      assert set(manifest["files"]) == on_disk
      assert integrity.verify_manifest(step_dir) > 0


def test_a_step_of_an_older_version_restores_unverified(finished, tmp_path, capsys):
  workdir = copy_run(finished, tmp_path)
  for step_dir in (workdir / "checkpoints").iterdir():
    if step_dir.name.isdigit():
      (step_dir / integrity.MANIFEST_FILE).unlink()
      record_file = step_dir / checkpointing.METADATA_FILE
      record = json.loads(record_file.read_text())
      del record["custom_metadata"][checkpointing.MANIFEST_KEY]
      record_file.write_text(json.dumps(record))
  got = loop.evaluate_checkpoint(str(workdir), "test")
  assert got["auc"] == finished[1]["test"]["auc"]
  said = capsys.readouterr()
  assert (said.out + said.err).count("restored unverified") == 1


def test_a_step_whose_manifest_was_never_written_is_not_trusted(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  (workdir / "checkpoints" / "40" / integrity.MANIFEST_FILE).unlink()  # killed in between
  with pytest.raises(checkpointing.CorruptCheckpointError, match="manifest .* is missing"):
    loop.evaluate_checkpoint(str(workdir), "test", step=40)


def test_unreadable_state_metadata_is_a_clear_error(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  step_dir = workdir / "checkpoints" / "40"
  (step_dir / "state" / "_METADATA").write_text("{")
  integrity.write_manifest(step_dir)  # damaged before the manifest was written
  with pytest.raises(checkpointing.CorruptCheckpointError, match="step 40 .* cannot be read"):
    loop.evaluate_checkpoint(str(workdir), "test", step=40)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(data_dir, finished, capsys,
                                                              tmp_path):
  original, _ = finished
  workdir = tmp_path / "copy"  # corrupt a copy: other tests restore the original
  shutil.copytree(original, workdir)
  exp = experiment.build_experiment(tiny_train_config(data_dir))
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


def test_checkpoints_hold_a_catalog_fingerprint_not_the_catalog(data_dir, finished, tmp_path):
  """The frozen catalog is data: left out of checkpoints (its fingerprint is kept), put back
  from the dataset on restore; another catalog is refused; a checkpoint from before (catalog
  inside) still restores."""
  original, results = finished
  exp = experiment.build_experiment(tiny_train_config(data_dir))
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
