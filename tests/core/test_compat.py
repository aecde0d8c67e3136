"""Compatibility shims (`core.compat`): a retired model field is accepted and ignored, an added
field at its old value leaves a recorded run's identity alone, the older checkpoint layout is
recognised, and recorded searches keep their draw order."""

import dataclasses

from dmf_jax.core import compat
from dmf_jax.models import registry
from dmf_jax.train import runs


def test_a_retired_model_field_is_accepted_and_ignored():
  for name in compat.RETIRED_MODEL_FIELDS:
    config = registry.model_config({"name": "dmf", name: 123})
    assert name not in {f.name for f in dataclasses.fields(config)}
    assert config == registry.model_config({"name": "dmf"})


def test_an_added_field_at_its_old_value_leaves_a_recorded_identity_alone():
  flat = registry.default_values()
  recorded = {"model": "dmf", "model_config.num_heads": 2}  # written before the fields existed
  for path, old in compat.ADDED_FIELDS.items():
    section, _, name = path.rpartition(".")
    if section == "model_config":
      assert flat[name] == old, path  # the default keeps an older run's behaviour
    assert runs.differences(recorded, {**recorded, path: old}) == [], path
  changed = {**recorded, "model_config.lookup_mode": "one_hot"}
  assert runs.differences(recorded, changed) == [
      "model_config.lookup_mode: '<unset>' in the workdir, 'one_hot' now"]


def test_the_older_checkpoint_layout_is_recognised():
  assert compat.checkpoint_holds_catalog(["params/x", "rest/catalog/modalities/text"], "catalog")
  assert not compat.checkpoint_holds_catalog(["params/x", "rest/items/catalogue"], "catalog")


def test_every_knob_in_the_recorded_draw_order_is_some_familys():
  knobs = set()
  for entry in registry.MODELS.values():
    knobs |= set(entry.config_class.search_space())
  assert set(compat.TUNING_DRAW_ORDER) <= knobs
