"""Serving (`serve.server`): encode once / score N equals the training-time model; edge cases;
hashed fields and items added after training."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmf_jax.serve import server as serving
from dmf_jax.serve.export import export
from dmf_jax.train import steps as training
from dmf_jax.nn.similarity import bucketize
from helpers import (jitted, serving_logits, serving_model, serving_request, tiny_problem,
                     tiny_run)


def test_eager_model_equals_split_and_merged_model():
  _, _, splits = tiny_problem()
  model = serving_model("dmf")
  batch = {k: v[:16] for k, v in splits["train"].items()}
  graphdef, params, rest = training.split_model(model)
  merged = nnx.merge(graphdef, params, rest)
  np.testing.assert_allclose(np.asarray(merged(batch)), np.asarray(model(batch)), atol=1e-6)


@pytest.mark.parametrize("name,pairwise", [
    ("dmf", True), ("dmf", False), ("dmf_early_fusion", True), ("dmf_early_fusion", False),
    ("dmf_no_me", True), ("dmf_no_mc", True), ("din", True)])
def test_served_logits_equal_the_model(name, pairwise):
  _, _, splits = tiny_problem()
  model = serving_model(name, pairwise_similarity_max_items=4096 if pairwise else 0)
  server = serving.Server(model, candidate_sizes=(8, 64, 512))
  rng = np.random.default_rng(0)
  call, similarities = jitted(model), jitted(model, "similarities")
  for row, n in [(3, 1), (40, 7), (77, 1200), (5, 64)]:
    user, ids = serving_request(splits["validation"], row, n, rng)
    got = server.score(server.encode_user(user), ids)
    want, batch = serving_logits(model, splits["validation"], row, ids, call)
    assert got.shape == (n,)
    if name.startswith("dmf") and name != "dmf_no_me":  # same buckets in both paths
      assert model.catalog.has_pairwise == pairwise
      s = similarities(batch)
      state = server.encode_user(user)
      ids_j = jnp.asarray(ids)
      if pairwise:
        sims = [model.catalog.pairwise_similarity(k, ids_j, state.similarity.ids[0])
                for k in model.schema.modality_names]
      else:  # frozen cosines: stored vectors and inverse norms of the history
        hist = state.similarity
        sims = [(np.asarray(model.catalog.vectors(k, ids_j)) @ np.asarray(h[0], np.float32).T)
                * np.asarray(model.catalog.inverse_norms(k, ids_j))[:, None]
                * np.asarray(inv[0])[None, :]
                for k, h, inv in zip(model.schema.modality_names, hist.vectors,
                                     hist.inv_norms)]
      served = jnp.clip(jnp.stack(sims, -1), -1, 1) * batch["hist_mask"][..., None]
      np.testing.assert_array_equal(bucketize(served, 8), bucketize(s, 8))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_edge_cases():
  _, _, splits = tiny_problem()
  model = serving_model("dmf")
  server = serving.Server(model, candidate_sizes=(8,))
  user, _ = serving_request(splits["validation"], 3, 1, np.random.default_rng(0))
  state = server.encode_user(user)
  assert server.score(state, []).shape == (0,)
  empty = dict(user, hist_item_id=[])
  logits = server.score(server.encode_user(empty), np.arange(20))  # 20 > bucket: chunks
  assert logits.shape == (20,) and np.all(np.isfinite(logits))
  want, _ = serving_logits(model, {k: v[3:4] for k, v in splits["validation"].items()}
                         | {"hist_mask": np.zeros((1, 12), bool)}, 0, np.arange(20))
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  long = dict(user, hist_item_id=np.arange(40) % 90)  # longer than L = 12: last 12 kept
  assert server.user_features(long)["hist_item_id"].tolist() == list(range(28, 40))
  with pytest.raises(ValueError, match=r"item_ids: item id 90 is out of range \[0, 90\)"):
    server.score(state, [1, 90])
  with pytest.raises(ValueError, match="hist_item_id: item id -3 is out of range"):
    server.encode_user(dict(user, hist_item_id=[1, -3]))
  with pytest.raises(KeyError, match="user features miss 'user/group'"):
    server.encode_user({"user/user_id": 1})
  with pytest.raises(ValueError, match=r"user/user_id: value out of range \[0, 120\)"):
    server.encode_user(dict(user, **{"user/user_id": 500}))


@pytest.fixture(scope="module")
def hashed_run(tmp_path_factory):
  """A tiny run on generated data with hashed user and item ids (2 hashes each)."""
  from dmf_jax import data

  data_dir, workdir = tiny_run(tmp_path_factory, "tiny_hashed", num_train_steps=120,
                               eval_every_steps=40, checkpoint_every_steps=40)
  return workdir, data.prepare("generated_ctr", "tiny_hashed", str(data_dir))


def test_hashed_fields_take_ids_never_seen_in_training(hashed_run):
  workdir, built = hashed_run
  server = serving.Server.from_workdir(str(workdir), candidate_sizes=(8, 64))
  ids = np.arange(0, 120, 7)
  scores = {}
  for user_id in (3, 10**15, "a-user-never-seen", np.int64(-5)):
    user = {"user/user_id": user_id, "user/group": 2, "hist_item_id": [3, 50, 17]}
    scores[str(user_id)] = server.score(server.encode_user(user), ids)
    assert np.isfinite(scores[str(user_id)]).all()
    again = server.score(server.encode_user(dict(user)), ids)
    np.testing.assert_array_equal(again, scores[str(user_id)])  # deterministic
  assert not np.allclose(scores["3"], scores["a-user-never-seen"])  # the id matters
  # A vocabulary field still refuses out-of-range values; a hashed one refuses non-ids.
  with pytest.raises(ValueError, match=r"user/group: value out of range \[0, 8\)"):
    server.encode_user({"user/user_id": 3, "user/group": 99})
  with pytest.raises(ValueError, match="user/user_id: a hashed field takes one raw id"):
    server.encode_user({"user/user_id": 1.5, "user/group": 2})
  with pytest.raises(ValueError, match=r"item id 120 is out of range \[0, 120\)"):
    server.score(server.encode_user({"user/user_id": 3, "user/group": 2}), [120])


def test_new_items_are_scored_from_their_side_fields_and_vectors(hashed_run, tmp_path):
  """An item added at serving with a trained item's side fields and vectors (a new raw id)
  scores close to it: far closer than two different trained items do."""
  from dmf_jax.serve.exported import ExportedScorer

  workdir, built = hashed_run
  server = serving.Server.from_workdir(str(workdir), candidate_sizes=(8, 64))
  catalog = built.catalog
  twins_of = np.arange(0, 120, 5)
  users = [{"user/user_id": u, "user/group": u % 8, "hist_item_id": [(u * 7 + k) % 120
                                                                     for k in range(u % 6)]}
           for u in range(12)]
  before = [server.score(server.encode_user(u), np.arange(120)) for u in users]
  new = server.add_items(side={k: v[twins_of] for k, v in catalog.side.items()},
                         vectors={k: v[twins_of] for k, v in catalog.modalities.items()},
                         raw_ids=[f"new-item-{i}" for i in twins_of])
  np.testing.assert_array_equal(new, np.arange(120, 120 + len(twins_of)))
  assert server.num_items == 120 + len(twins_of)
  twin_gap, other_gap = [], []
  for user, old in zip(users, before):
    state = server.encode_user(dict(user, hist_item_id=list(user["hist_item_id"]) + [int(new[0])]))
    now = server.score(server.encode_user(user), np.r_[np.arange(120), new])
    np.testing.assert_allclose(now[:120], old, rtol=1e-5, atol=1e-6)  # trained items unchanged
    twin_gap.append(np.abs(now[120:] - old[twins_of]))
    other_gap.append(np.abs(old[twins_of] - old[(twins_of + 1) % 120]))
    assert np.isfinite(server.score(state, new)).all()  # a new item in the history works too
  twin_gap, other_gap = np.mean(twin_gap), np.mean(other_gap)
  assert twin_gap < 0.5 * other_gap, (twin_gap, other_gap)

  # Bad new items are refused, naming the array; the served catalog is unchanged.
  bad = {k: v[:2].copy() for k, v in catalog.modalities.items()}
  bad["text"][1, 0] = np.nan
  with pytest.raises(ValueError, match=r"catalog.modalities\['text'\]: 1 non-finite"):
    server.add_items(side={k: v[:2] for k, v in catalog.side.items()}, vectors=bad,
                     raw_ids=["x", "y"])
  with pytest.raises(ValueError, match="give the new items' raw_ids"):
    server.add_items(side={k: v[:2] for k, v in catalog.side.items()},
                     vectors={k: v[:2] for k, v in catalog.modalities.items()})
  # A raw id the catalog holds (trained, or added above) is refused, naming its id.
  for raw, at in ((3, 3), ("new-item-5", int(new[1]))):
    with pytest.raises(ValueError, match=f"raw id {raw!r} is already in the catalog "
                                         f"\\(item id {at}\\)"):
      server.add_items(side={k: v[:1] for k, v in catalog.side.items()},
                       vectors={k: v[:1] for k, v in catalog.modalities.items()}, raw_ids=[raw])
  with pytest.raises(ValueError, match="raw id 'z' is given twice"):
    server.add_items(side={k: v[:2] for k, v in catalog.side.items()},
                     vectors={k: v[:2] for k, v in catalog.modalities.items()},
                     raw_ids=["z", "z"])
  assert server.num_items == 120 + len(twins_of)

  # Exported afterwards, the scorer serves the new items too.
  export(server, tmp_path / "model.dmfx")
  scorer = ExportedScorer(str(tmp_path / "model.dmfx"))
  user = users[3]
  np.testing.assert_allclose(scorer.score(scorer.encode_user(user), new),
                             server.score(server.encode_user(user), new), rtol=1e-5, atol=1e-5)
