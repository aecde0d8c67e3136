"""Missing-modality robustness: the dropped item sets, the catalog without some vectors (equal
to a catalog built without them), the per-run report and the ablation's robustness table."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import jitted, take, tiny_problem, tiny_run
from dmf_jax.core.catalog import ItemCatalog, cosine_matrix, without_vectors
from dmf_jax.models.registry import build_model
from dmf_jax.train import ablation, experiment, robustness

SMALL = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
             mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8)


def test_dropped_items_are_seeded_nested_and_exact():
  sets = [robustness.dropped_items(1000, p, 3, "text") for p in (0.0, 0.25, 0.5, 1.0)]
  assert [int(s.sum()) for s in sets] == [0, 250, 500, 1000]
  assert np.all(sets[1] <= sets[2])  # the 25% set lies inside the 50% set
  np.testing.assert_array_equal(sets[1], robustness.dropped_items(1000, 0.25, 3, "text"))
  assert not np.array_equal(sets[1], robustness.dropped_items(1000, 0.25, 3, "image"))
  assert not np.array_equal(sets[1], robustness.dropped_items(1000, 0.25, 4, "text"))
  with pytest.raises(ValueError, match="not in"):
    robustness.dropped_items(10, 1.5, 0, "text")


@pytest.mark.parametrize("model_name", ["dmf", "em3"])
def test_catalog_without_vectors_scores_as_a_catalog_built_without_them(model_name):
  """The model with `without_vectors` tables == the model whose catalog was loaded from an
  ItemCatalog with those items' vectors zeroed and flag field set (calibration kept)."""
  schema, catalog, splits = tiny_problem()
  config = {"name": model_name, **SMALL}
  model = build_model(config, schema, rngs=nnx.Rngs(0), catalog=catalog)
  missing = robustness.dropped_items(schema.num_items, 0.5, 0, "image")
  tables = nnx.to_pure_dict(nnx.state(model.catalog))
  live = jax.tree.map(lambda v: v, dict(nnx.state(model.catalog).raw_mapping))
  new = without_vectors(live, "image", missing, flag_field="category")

  # The reference: the same model with a catalog that never had those vectors.
  reference = build_model(config, schema, rngs=nnx.Rngs(0), catalog=catalog)
  zeroed = dict(catalog.modalities)
  zeroed["image"] = np.where(missing[:, None], 0.0, catalog.modalities["image"]).astype(np.float32)
  side = dict(catalog.side)
  side["category"] = np.where(missing, 1, catalog.side["category"]).astype(np.int32)
  ranges = {k: np.asarray(v[...]) for k, v in reference.catalog.cosine_ranges.items()}
  reference.catalog.load(schema, ItemCatalog(side, zeroed, catalog.raw_ids, catalog.numeric))
  for k, v in ranges.items():  # keep the trained calibration, as without_vectors does
    reference.catalog.cosine_ranges[k].set_value(v)

  # Only the image vectors (and the flag) changed, and the input tables did not.
  assert np.array_equal(np.asarray(live["modalities"]["text"][...]),
                        np.asarray(new["modalities"]["text"][...]))
  np.testing.assert_array_equal(np.asarray(tables["modalities"]["image"]),
                                np.asarray(live["modalities"]["image"][...]))
  np.testing.assert_array_equal(np.asarray(new["modalities"]["image"][...])[:schema.num_items],
                                zeroed["image"])
  if "pairwise" in new:
    np.testing.assert_allclose(np.asarray(new["pairwise"]["image"][...]),
                               cosine_matrix(zeroed["image"]), atol=1e-6)
  nnx.update(model.catalog, nnx.State(new))
  batch = take(splits["test"], np.arange(64))
  got = np.asarray(jitted(model)(batch))
  want = np.asarray(jitted(reference)(batch))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # ... and the drop matters: the original catalog scores differently.
  original = build_model(config, schema, rngs=nnx.Rngs(0), catalog=catalog)
  assert not np.allclose(np.asarray(jitted(original)(batch)), got, atol=1e-4)


def test_without_vectors_names_the_culprit():
  schema, catalog, _ = tiny_problem()
  model = build_model({"name": "dmf", **SMALL}, schema, rngs=nnx.Rngs(0), catalog=catalog)
  live = dict(nnx.state(model.catalog).raw_mapping)
  with pytest.raises(ValueError, match="no modality 'audio'"):
    without_vectors(live, "audio", np.zeros(schema.num_items, bool))
  with pytest.raises(ValueError, match="no side field 'image_missing'"):
    without_vectors(live, "image", np.zeros(schema.num_items, bool), "image_missing")


@pytest.fixture(scope="module")
def dmf_run(tmp_path_factory):
  return tiny_run(tmp_path_factory, "tiny", model="dmf")


def test_report_of_a_run_reads_the_test_split_and_caches(dmf_run, monkeypatch):
  _, workdir = dmf_run
  report = robustness.evaluate_missing_modalities(workdir, (0.5, 1.0))
  results = json.loads((workdir / "results.json").read_text())
  assert report["fractions"] == [0.0, 0.5, 1.0] and report["step"] == results["best_step"]
  assert set(report["modalities"]) == {"text", "image"}
  for name, by_fraction in report["modalities"].items():
    # Nothing missing: exactly the run's own test evaluation.
    unchanged = by_fraction["0.0"]
    for key in ("auc", "gauc", "logloss"):
      assert unchanged[key] == pytest.approx(results["test"][key], abs=1e-9), (name, key)
    assert by_fraction["1.0"]["auc"] != unchanged["auc"], name
  assert json.loads((workdir / robustness.RESULT_FILE).read_text()) == report
  # A second call with the same fractions reads the file (builds nothing).
  monkeypatch.setattr(experiment, "build_experiment", lambda *a, **k: pytest.fail("rebuilt"))
  assert robustness.evaluate_missing_modalities(workdir, (1.0, 0.5)) == report
  with pytest.raises(ValueError, match="not in"):
    robustness.evaluate_missing_modalities(workdir, (2.0,))


def test_ablation_robustness_table(tmp_path):
  from helpers import tiny_train_config

  config = tiny_train_config(tmp_path / "data", num_train_steps=6, eval_every_steps=6,
                             checkpoint_every_steps=6)
  specs = [ablation.ModelSpec("din"), ablation.ModelSpec("simtier", ("text",))]
  records = ablation.run_ablation(config, specs, [0], tmp_path / "out",
                                  missing_fractions=(0.5, 1.0), log=lambda _: None)
  # din reads no vectors (and the tiny data has no missing-flag field): unchanged.
  assert records[0]["missing"] == {name: {"0.5": records[0]["test_auc"],
                                          "1.0": records[0]["test_auc"]}
                                   for name in ("text", "image")}
  report = json.loads((tmp_path / "out" / "runs" / "simtier--text" / "seed_0"
                       / robustness.RESULT_FILE).read_text())
  assert records[1]["missing"] == {"text": {p: report["modalities"]["text"][p]["auc"]
                                            for p in ("0.5", "1.0")}}
  table = (tmp_path / "out" / "results.md").read_text()
  assert ("| model | seeds | test AUC | image missing 50% | image missing 100% | text missing 50% "
          "| text missing 100% |") in table
  auc = records[1]["missing"]["text"]["1.0"]
  assert f"| simtier[text] | 1 | {records[1]['test_auc']:.4f} ± 0.0000 |" in table
  half = records[1]["missing"]["text"]["0.5"]
  assert f"| — | — | {half:.4f} ± 0.0000 | {auc:.4f} ± 0.0000 |" in table  # no image vectors
  assert "| din | 1 |" in table.split("### Robustness")[1]
