"""experiments.ablation's library: specs, runs, resume, and the three summary files."""

import json
import math

import numpy as np
import pytest

from helpers import flip_array_bytes, tiny_train_config
from dmf_jax.train import ablation
from dmf_jax.train.config import ConfigError
from dmf_jax.train.runs import RunMismatchError


def test_model_specs():
  assert ablation.ModelSpec.parse("dmf") == ablation.ModelSpec("dmf")
  spec = ablation.ModelSpec.parse("simtier[text+image]")
  assert spec == ablation.ModelSpec("simtier", ("text", "image"))
  assert spec.label == "simtier[text+image]" and spec.dirname == "simtier--text-image"
  for bad in ("dmf[", "dmf[]", "d mf", "dmf[text]x"):
    with pytest.raises(ValueError, match="bad model spec"):
      ablation.ModelSpec.parse(bad)


def test_summary_statistics_against_hand_computed_values():
  records = [dict(model=m, seed=s, val_auc=v, test_auc=t, test_gauc=t, test_logloss=0.5,
                  cold_test_auc=None, train_seconds=1.0, params=10)
             for m, s, v, t in [("din", 0, 0.70, 0.70), ("din", 1, 0.71, 0.72),
                                ("dmf", 0, 0.72, 0.73), ("dmf", 1, 0.73, 0.74)]]
  rows = ablation.summarize(records)
  assert [r["model"] for r in rows] == ["dmf", "din"]
  dmf = rows[0]
  np.testing.assert_allclose(dmf["test_auc"], (0.735, np.std([0.73, 0.74], ddof=1)))
  diffs = [0.03, 0.02]
  vs = dmf["vs_baseline"]
  np.testing.assert_allclose([vs["auc_diff_mean"], vs["auc_diff_std"]],
                             [0.025, np.std(diffs, ddof=1)])
  np.testing.assert_allclose(vs["rel_impr"], (0.735 - 0.5) / (0.71 - 0.5) - 1)
  assert vs["above_two_std"] is True  # 0.025 > 2 * 0.00707
  assert math.isnan(dmf["cold_test_auc"][0])
  table = ablation.markdown_table(rows)
  assert "| dmf | 2 | 0.7250 ± 0.0071 | 0.7350 ± 0.0071 |" in table


def test_ablation_writes_results_and_resume_skips_finished_runs(tmp_path):
  config = tiny_train_config(tmp_path / "data", num_train_steps=12, eval_every_steps=6,
                             checkpoint_every_steps=6)
  out = tmp_path / "ablation"
  logs = []
  specs = [ablation.ModelSpec("din"), ablation.ModelSpec("dmf", ("text",))]
  records = ablation.run_ablation(config, specs, [0, 1], out, log=logs.append)
  assert sum("training in" in line for line in logs) == 4
  saved = json.loads((out / "results.json").read_text())
  assert saved == json.loads(json.dumps(records))
  assert [(r["model"], r["seed"]) for r in saved] == [
      ("din", 0), ("din", 1), ("dmf[text]", 0), ("dmf[text]", 1)]
  for record in saved:
    assert set(ablation.RECORD_KEYS) <= set(record)
    assert 0.0 <= record["test_auc"] <= 1.0 and record["params"] > 0
  table = (out / "results.md").read_text()
  assert "| dmf[text] | 2 |" in table and "| din | 2 |" in table and "ΔAUC vs din" in table
  assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (out / "runs" / "dmf--text" / "seed_1" / "results.json").exists()

  # Again: the four finished runs are read back, nothing trains.
  logs.clear()
  stamp = (out / "runs" / "din" / "seed_0" / "results.json").stat().st_mtime_ns
  again = ablation.run_ablation(config, specs, [0, 1], out, log=logs.append)
  assert not [line for line in logs if "training in" in line]
  assert sum("finished earlier" in line for line in logs) == 4
  assert (out / "runs" / "din" / "seed_0" / "results.json").stat().st_mtime_ns == stamp
  assert again == records
  # A finished run whose best checkpoint rotted on disk is run again (and repairs itself).
  din_0 = out / "runs" / "din" / "seed_0"
  best = json.loads((din_0 / "results.json").read_text())["best_step"]
  flip_array_bytes(din_0, best)
  logs.clear()
  repaired = ablation.run_ablation(config, specs[:1], [0], out, log=logs.append)
  assert any(line.startswith("WARNING: din seed 0") and f"step {best}" in line for line in logs)
  assert repaired[0]["test_auc"] == records[0]["test_auc"]
  assert (din_0 / "checkpoints" / "corrupt").exists()
  with pytest.raises(ConfigError, match="baseline 'bst' is not one of the models"):
    ablation.run_ablation(config, specs, [0], out, baseline="bst", log=logs.append)
  # Summarize only: seed 2 has not run, so it is left out and nothing trains.
  logs.clear()
  partial = ablation.run_ablation(config, specs, [1, 2], out, train=False, log=logs.append)
  assert not [line for line in logs if "training in" in line]
  assert sum("not finished, left out" in line for line in logs) == 2
  assert [(r["model"], r["seed"]) for r in partial] == [("din", 1), ("dmf[text]", 1)]
  assert not (out / "runs" / "din" / "seed_2").exists()
  with pytest.raises(ConfigError, match="none of the runs"):
    ablation.run_ablation(config, specs, [5], out, train=False, log=logs.append)
  # A finished run of another config is not taken for this one's.
  changed = config.copy_and_resolve_references()
  with changed.unlocked():
    changed.optimizer.learning_rate = 0.5
  with pytest.raises(RunMismatchError, match="optimizer.learning_rate"):
    ablation.run_ablation(changed, specs, [0], out, log=logs.append)
  with pytest.raises(ValueError, match="duplicate model specs"):
    ablation.run_ablation(config, specs + specs, [0], out, log=logs.append)


def test_ablation_rejects_bad_specs_before_training(tmp_path):
  config = tiny_train_config(tmp_path / "data")
  with pytest.raises(ConfigError, match="unknown model 'dfm'"):
    ablation.run_ablation(config, [ablation.ModelSpec("din"), ablation.ModelSpec("dfm")], [0],
                          tmp_path / "out", log=lambda _: None)
  assert not (tmp_path / "out" / "runs").exists()


def test_a_named_variant_runs_its_model_with_its_values(tmp_path):
  """config.variants: a component study's rung under its own name (its own runs and table
  row), the registered model with the variant's values on top of per_model's."""
  config = tiny_train_config(tmp_path / "data", num_train_steps=4, eval_every_steps=4,
                             checkpoint_every_steps=4)
  with config.unlocked():
    config.per_model = {"dmf": {"model_config": {"dropout": 0.2, "num_tiers": 6}}}
    config.variants = {"dmf_fewer_tiers": {"model": "dmf", "model_config": {"num_tiers": 4}}}
  out = tmp_path / "ablation"
  records = ablation.run_ablation(config, [ablation.ModelSpec("dmf_fewer_tiers")], [0], out,
                                  baseline="dmf_fewer_tiers", log=lambda m: None)
  assert records[0]["model"] == "dmf_fewer_tiers"
  run = json.loads((out / "runs" / "dmf_fewer_tiers" / "seed_0" / "config.json").read_text())
  assert run["model"] == "dmf" and "variants" not in run and "per_model" not in run
  assert run["model_config"]["num_tiers"] == 4 and run["model_config"]["dropout"] == 0.2
  with config.unlocked():
    config.variants = {"broken": {"model_config": {"num_tiers": 4}}}
  with pytest.raises(ConfigError, match="variants.broken: needs 'model'"):
    ablation.run_ablation(config, [ablation.ModelSpec("broken")], [0], out, baseline="broken")
  with pytest.raises(ConfigError, match="unknown model 'dmf_fewer_tires'; valid models: .*; "
                     "variants of this config: broken"):
    ablation.run_ablation(config, [ablation.ModelSpec("dmf_fewer_tires")], [0], out,
                          baseline="dmf_fewer_tires")
  with config.unlocked():
    config.variants = {"typo": {"model": "dmf", "model_config": {"num_teirs": 4}}}
  with pytest.raises(ConfigError, match="variants.typo.model_config.num_teirs: not a config"):
    ablation.run_ablation(config, [ablation.ModelSpec("typo")], [0], out, baseline="typo")
