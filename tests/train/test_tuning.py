"""The validation-only tuner: what it samples, successive halving, resuming, and that no part
of it can read the test split."""

import json

import pytest

from helpers import tiny_train_config
from dmf_jax import data
from dmf_jax.core.errors import ConfigError
from dmf_jax.train import config as config_lib
from dmf_jax.train import tuning


class Untouchable:
  """A split that raises on any use."""

  def __getattr__(self, name):
    raise AssertionError(f"the tuner touched the test split ({name})")

  def __len__(self):
    raise AssertionError("the tuner touched the test split (len)")


@pytest.fixture
def no_test_split(monkeypatch):
  prepare = data.prepare

  def guarded(*args, **kwargs):
    built = prepare(*args, **kwargs)
    sources = dict(built.sources, test=Untouchable())
    return type(built)(**{**built.__dict__, "sources": sources})

  monkeypatch.setattr(data, "prepare", guarded)


def test_the_search_space_follows_the_family():
  dmf, din, bst = (set(tuning.search_space(m)) for m in ("dmf", "din", "bst"))
  common = {"optimizer.learning_rate", "optimizer.embedding_learning_rate",
            "optimizer.weight_decay", "model_config.dropout", "model_config.mlp_hidden"}
  assert common <= dmf & din & bst
  assert {"model_config.num_heads", "model_config.head_dim"} <= dmf - din
  assert "model_config.din_hidden" in din and "model_config.bst_dim" in bst - dmf
  assert tuning.sample("dmf", 3, seed=1) == tuning.sample("dmf", 3, seed=1)
  assert tuning.sample("dmf", 3, seed=1) != tuning.sample("dmf", 3, seed=2)
  assert tuning.rungs("halving", 1, 9, 3) == [1, 3, 9]
  assert tuning.rungs("random", 1, 9, 3) == [9]


def test_each_family_owns_its_knobs_and_recorded_searches_draw_the_same_trials():
  """The model knobs come from the family's config class (`search_space`); the draw order
  of knobs that searches recorded before (`compat.TUNING_DRAW_ORDER`) is kept: a recorded
  (model, seed) gives the trials it gave then (values taken from that version)."""
  em3 = tuning.search_space("em3")
  assert {"model_config.qformer_width", "model_config.contrastive_weight",
          "model_config.din_hidden", "model_config.num_heads"} <= set(em3)
  assert not any("qformer" in p for p in tuning.search_space("dmf"))
  first = tuning.sample("dmf", 2, seed=3)[1]
  assert first == {
      "optimizer.learning_rate": 0.0013700015736682236,
      "optimizer.embedding_learning_rate": 0.0027241050480293523,
      "optimizer.weight_decay": 1e-05, "model_config.dropout": 0.0,
      "model_config.mlp_hidden": (512, 256, 128), "model_config.num_heads": 4,
      "model_config.head_dim": 8, "model_config.num_tiers": 10}
  assert list(tuning.sample("simtier", 1, seed=3)[0].values())[-4:] == [
      (512, 256, 128), (64, 32), 10, 16]


def test_knobs_restrict_the_search_and_an_unknown_one_is_refused_before_any_write(tmp_path):
  space = tuning.search_space("em3", ["content_dim", "optimizer.learning_rate"])
  assert list(space) == ["optimizer.learning_rate", "model_config.content_dim"]
  trials = tuning.sample("em3", 3, seed=0, knobs=["content_dim"])
  assert all(set(t) == {"model_config.content_dim"} for t in trials)
  assert tuning.base_values(tiny_train_config(tmp_path / "tfds", model="em3"), "em3",
                            ["content_dim"]) == {"model_config.content_dim": 32}
  with pytest.raises(ConfigError, match=r"knobs: \['qformer_depth'\] not in em3's search space"):
    tuning.tune(tiny_train_config(tmp_path / "tfds"), "em3", 2, tmp_path / "out",
                knobs=["qformer_depth"])
  assert not (tmp_path / "out").exists()


def test_a_variant_of_the_config_is_tuned_from_its_own_values(tmp_path, no_test_split):
  """`--model=<variant>` searches the registered model's space from the variant's values,
  and best.json gives the values to merge into the variant."""
  base = tiny_train_config(tmp_path / "tfds", model="dmf", num_epochs=1)
  with base.unlocked():
    base.variants = {"em3_small": {"model": "em3", "model_config": {"content_dim": 16}}}
  assert tuning.registered_model(base, "em3_small") == "em3"
  assert tuning.registered_model(base, "din") == "din"
  knobs = ["content_dim", "optimizer.content_learning_rate"]
  assert tuning.base_values(base, "em3_small", knobs) == {"model_config.content_dim": 16}
  trial = tuning.trial_config(base, "em3_small", {"optimizer.content_learning_rate": 4e-3}, 1)
  assert (trial.model, trial.model_config.content_dim) == ("em3", 16)
  assert trial.optimizer.content_learning_rate == 4e-3
  best = tuning.tune(base, "em3_small", 1, tmp_path / "out", knobs=knobs, log=lambda m: None)
  assert best["variants"] == {"em3_small": {"model_config": {"content_dim": 16}}}
  assert "per_model" not in best
  with pytest.raises(ConfigError, match="variants of this config: em3_small"):
    tuning.tune(base, "em4", 2, tmp_path / "t")


def test_halving_tunes_on_validation_only_and_resumes(tmp_path, no_test_split):
  base = tiny_train_config(tmp_path / "tfds", model="din", num_epochs=2)
  out = tmp_path / "tune"
  logs = []
  best = tuning.tune(base, "din", 2, out, method="halving", min_epochs=1, eta=2,
                     log=logs.append)
  records = [json.loads(l) for l in (out / "trials.jsonl").read_text().splitlines()]
  assert [(r["trial"], r["epochs"]) for r in records][:2] == [(0, 1), (1, 1)]
  assert records[0]["values"] == tuning._jsonable(tuning.base_values(base, "din"))
  assert len(records) == 3 and records[2]["epochs"] == 2  # the better half goes on
  first = max(records[:2], key=lambda r: r["val_auc"])
  assert records[2]["trial"] == first["trial"] == best["trial"]
  for trial in (0, 1):
    results = json.loads((out / "trials" / f"trial_{trial}" / "results.json").read_text())
    assert "test" not in results and "validation" in results
  table = (out / "trials.md").read_text().splitlines()
  assert len(table) == 2 + len(records) and "optimizer.learning_rate" in table[0]
  assert table[2].startswith(f"| {first['trial']} | 1 | {first['val_auc']:.4f} |")
  # best.json is a per_model entry a study config takes as it is.
  assert best["per_model"]["din"]["optimizer"]["learning_rate"] == best["values"][
      "optimizer.learning_rate"]
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.per_model = best["per_model"]
  resolved = config_lib.with_model_values(config)
  assert resolved.optimizer.learning_rate == best["values"]["optimizer.learning_rate"]
  assert "per_model" not in resolved
  # A re-run trains nothing; another search in the same folder is refused.
  logs.clear()
  assert tuning.tune(base, "din", 2, out, method="halving", min_epochs=1, eta=2,
                     log=logs.append) == best
  assert not [m for m in logs if "training" in m]
  with pytest.raises(ConfigError, match="holds another search"):
    tuning.tune(base, "din", 3, out, method="halving", min_epochs=1, eta=2)


def test_trial_0_is_the_base_config(tmp_path):
  base = tiny_train_config(tmp_path / "tfds", model="dmf", num_epochs=2)
  with base.unlocked():
    base.per_model = {"dmf": {"model_config": {"dropout": 0.3}}}
  values = tuning.base_values(base, "dmf")
  assert values["model_config.dropout"] == 0.3  # the study values are the base
  assert values["optimizer.learning_rate"] == base.optimizer.learning_rate
  assert "optimizer.embedding_learning_rate" not in values  # unset in the base: left unset
  as_trial = tuning.trial_config(base, "dmf", values, 2)
  assert as_trial.to_dict() == tuning.trial_config(base, "dmf", {}, 2).to_dict()
  assert set(values) == set(tuning.search_space("dmf")) - {"optimizer.embedding_learning_rate"}


def test_bad_settings_are_config_errors(tmp_path):
  base = tiny_train_config(tmp_path / "tfds")
  with pytest.raises(ConfigError, match="method: 'grid' is not one of"):
    tuning.tune(base, "din", 2, tmp_path / "t", method="grid")
  with pytest.raises(ConfigError, match="unknown model 'dnn'"):
    tuning.tune(base, "dnn", 2, tmp_path / "t")
