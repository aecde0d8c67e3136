"""The content-signal problem of the generated data (`synthetic.ContentSignal`): hidden item
content x, y written into the first two modalities, clicks following w * s(user) * x * y, the
rest of the problem drawn as without it, existing builds unchanged."""

import dataclasses

import numpy as np
import pytest

from dmf_jax.data import generated
from dmf_jax.data import synthetic

CONFIG = synthetic.SyntheticConfig(num_users=400, num_items=300, events_per_user=30,
                                   content_weight=3.0)


def click_rate_gap(labels, term):
  """Click rate where the planted term is high minus where it is low."""
  return labels[term > 1.0].mean() - labels[term < -1.0].mean()


def test_the_modalities_carry_the_hidden_content_and_the_clicks_follow_it():
  catalog, users, events = synthetic.generate(CONFIG)
  plain_catalog, _, plain_events = synthetic.generate(dataclasses.replace(CONFIG, content_weight=0))
  content = synthetic.ContentSignal.draw(CONFIG)
  for (name, _, _), hidden, direction in zip(CONFIG.modalities, (content.x, content.y),
                                             content.directions):
    added = catalog.modalities[name] - plain_catalog.modalities[name]  # only the content part
    np.testing.assert_allclose(added, np.outer(hidden, direction), rtol=1e-4, atol=1e-5)
  for side in ("category", "tags"):
    np.testing.assert_array_equal(catalog.side[side], plain_catalog.side[side])
  term = content.term(CONFIG, users["group"][events["user"]], events["item"])
  assert click_rate_gap(events["label"].astype(float), term) > 0.3
  plain_term = content.term(CONFIG, users["group"][plain_events["user"]], plain_events["item"])
  assert abs(click_rate_gap(plain_events["label"].astype(float), plain_term)) < 0.1


def test_the_streamed_generator_plants_the_same_signal():
  problem = synthetic.StreamedProblem(dataclasses.replace(CONFIG, num_users=3000), 3000)
  catalog, content = problem.catalog(), problem.content
  text = catalog.modalities["text"] @ content.directions[0] / np.sum(content.directions[0] ** 2)
  assert np.corrcoef(text, content.x)[0, 1] > 0.9
  rows = problem.chunk(0)
  # the chunk's user groups are not returned; the sign is +1 for the lower half of the groups
  term = content.term(CONFIG, rows["user/group"], rows["item_id"])
  assert click_rate_gap(rows["label"], term) > 0.3


def test_existing_builds_keep_their_fingerprint_and_the_new_config_is_registered():
  builder = generated.GeneratedCtr(config="tiny", data_dir="/nonexistent")
  assert "content_weight" not in builder.build_parameters()["synthetic"]
  signal = generated.GeneratedCtr(config="content_signal", data_dir="/nonexistent")
  assert signal.build_parameters()["synthetic"]["content_weight"] == 2.0


@pytest.mark.parametrize("kwargs", [dict(content_weight=-1.0),
                                    dict(content_weight=1.0, modalities=(("text", 8, 0.3),))])
def test_a_bad_content_weight_is_named(kwargs):
  with pytest.raises(ValueError, match="content_weight must be >= 0, and > 0 only with two"):
    synthetic.SyntheticConfig(**kwargs)
