"""The model registry (`models.registry`): names, each family's typed config, and every model
training end to end on a small generated problem."""

import numpy as np
import pytest

from helpers import small_model, train_steps
from dmf_jax.models import registry
from dmf_jax.models.din import DinConfig
from dmf_jax.models.dmf import DmfConfig
from dmf_jax.models.em3 import EM3Config

def test_registry_lists_models_and_rejects_unknown_names():
  assert set(registry.model_names()) >= {"din", "dmf", "dmf_early_fusion", "dmf_no_me", "dmf_no_mc",
                                       "din_mm_concat", "simscore", "simtier", "make", "em3", "bst", "dien",
                                       "bst_mm_concat", "dien_mm_concat"}
  with pytest.raises(ValueError, match="unknown model 'dnn'; valid models: bst, bst_mm_concat, "
                                       "dien, dien_mm_concat, din, din_mm_concat, dmf,"):
    small_model("dnn")
  with pytest.raises(ValueError, match="model 'din' is already registered"):
    registry.register_model("din", registry.DIN)


def test_model_config_validation():
  with pytest.raises(ValueError, match="num_heads must be a positive int"):
    DmfConfig(num_heads=0)
  with pytest.raises(ValueError, match="cmm='mean' is not one of"):
    DmfConfig(cmm="mean")
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\]"):
    registry.ModelConfig.from_mapping({"heads": 2})
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['heads'\]"):
    registry.model_config({"name": "din", "heads": 2})
  with pytest.raises(ValueError, match="mlp_hidden must be a non-empty list"):
    registry.ModelConfig(mlp_hidden=())
  # Every problem at once, one message each.
  with pytest.raises(ValueError) as e:
    DmfConfig(num_heads=0, dropout=2.0, cmm="mean")
  assert len(e.value.problems) == 3


def test_each_model_gets_its_familys_config():
  """The flat mapping's fields of other families are ignored; a retired field is accepted."""
  values = {"num_heads": 3, "din_hidden": (8,), "em3_head": "dmf", "item_table_max_items": 0}
  din = registry.model_config({"name": "din", **values})
  dmf = registry.model_config({"name": "dmf", **values})
  em3 = registry.model_config({"name": "em3", **values})
  assert type(din) is DinConfig and din.din_hidden == (8,) and not hasattr(din, "num_heads")
  assert type(dmf) is DmfConfig and dmf.num_heads == 3 and not hasattr(dmf, "din_hidden")
  assert type(em3) is EM3Config and (em3.num_heads, em3.din_hidden) == (3, (8,))
  assert set(registry.default_values()) == set(registry.config_fields()) - {"name"}


@pytest.mark.parametrize("name", [n for n in registry.model_names()
                                  if n != "em3"])  # em3: tests/models/test_em3.py, both losses
def test_models_train_and_loss_falls(name):
  _, state, outputs = train_steps(small_model(name), 60)
  losses = [float(o["loss"]) for o in outputs]
  assert int(state.step) == 60
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.03, (losses[:10], losses[-10:])
