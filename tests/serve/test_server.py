"""Serving: encode once / score N equals the training-time model; export reloads elsewhere."""

import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dmf_jax.core.errors import UserError
from dmf_jax.models import registry
from dmf_jax.serve import server as serving
from dmf_jax.serve.export import export
from dmf_jax.train import steps as training
from dmf_jax.nn.attention import DecoupledTargetAttention, EarlyFusionTargetAttention
from dmf_jax.nn.similarity import bucketize
from helpers import jitted, tiny_problem, tiny_run

REPO = pathlib.Path(__file__).resolve().parents[2]
SMALL = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
             mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8)


def make_model(name, seed=0, **overrides):
  schema, catalog, _ = tiny_problem()
  model = registry.build_model({"name": name, **SMALL, **overrides}, schema, rngs=nnx.Rngs(seed),
                               catalog=catalog)
  # Non-trivial bucket tables, so that a wrong bucket would change the logits.
  if isinstance(model.attention, (DecoupledTargetAttention, EarlyFusionTargetAttention)):
    tables = model.attention.weights.buckets.tables
    tables[...] = tables[...] * 30
  return model


def request(split, row, num_candidates, rng):
  user = {k: split[k][row] for k in split if k.startswith("user/")}
  user["hist_item_id"] = split["hist_item_id"][row][split["hist_mask"][row]]
  return user, rng.integers(0, 90, num_candidates)


def model_logits(model, split, row, ids, call=None):
  batch = {k: np.repeat(np.asarray(v[row])[None], len(ids), 0) for k, v in split.items()}
  batch["item_id"] = ids.astype(np.int32)
  return np.asarray((call or jitted(model))(batch)), batch


def test_eager_model_equals_split_and_merged_model():
  _, _, splits = tiny_problem()
  model = make_model("dmf")
  batch = {k: v[:16] for k, v in splits["train"].items()}
  graphdef, params, rest = training.split_model(model)
  merged = nnx.merge(graphdef, params, rest)
  np.testing.assert_allclose(np.asarray(merged(batch)), np.asarray(model(batch)), atol=1e-6)


@pytest.mark.parametrize("name,pairwise", [
    ("dmf", True), ("dmf", False), ("dmf_early_fusion", True), ("dmf_early_fusion", False),
    ("dmf_no_me", True), ("dmf_no_mc", True), ("din", True)])
def test_served_logits_equal_the_model(name, pairwise):
  _, _, splits = tiny_problem()
  model = make_model(name, pairwise_similarity_max_items=4096 if pairwise else 0)
  server = serving.Server(model, buckets=(8, 64, 512))
  rng = np.random.default_rng(0)
  call, similarities = jitted(model), jitted(model, "similarities")
  for row, n in [(3, 1), (40, 7), (77, 1200), (5, 64)]:
    user, ids = request(splits["validation"], row, n, rng)
    got = server.score(server.encode_user(user), ids)
    want, batch = model_logits(model, splits["validation"], row, ids, call)
    assert got.shape == (n,)
    if name.startswith("dmf") and name != "dmf_no_me":  # same buckets in both paths
      assert model.catalog.has_pairwise == pairwise
      s = similarities(batch)
      state = server.encode_user(user)
      ids_j = jnp.asarray(ids)
      if pairwise:
        sims = [model.catalog.pairwise_similarity(k, ids_j, state["similarity"]["history"][0])
                for k in model.schema.modality_names]
      else:  # frozen cosines: stored vectors and inverse norms of the history
        hist = state["similarity"]
        sims = [(np.asarray(model.catalog.vectors(k, ids_j)) @ np.asarray(h[0], np.float32).T)
                * np.asarray(model.catalog.inverse_norms(k, ids_j))[:, None]
                * np.asarray(inv[0])[None, :]
                for k, h, inv in zip(model.schema.modality_names, hist["vectors"],
                                     hist["inv_norms"])]
      served = jnp.clip(jnp.stack(sims, -1), -1, 1) * batch["hist_mask"][..., None]
      np.testing.assert_array_equal(bucketize(served, 8), bucketize(s, 8))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_edge_cases():
  _, _, splits = tiny_problem()
  model = make_model("dmf")
  server = serving.Server(model, buckets=(8,))
  user, _ = request(splits["validation"], 3, 1, np.random.default_rng(0))
  state = server.encode_user(user)
  assert server.score(state, []).shape == (0,)
  empty = dict(user, hist_item_id=[])
  logits = server.score(server.encode_user(empty), np.arange(20))  # 20 > bucket: chunks
  assert logits.shape == (20,) and np.all(np.isfinite(logits))
  want, _ = model_logits(model, {k: v[3:4] for k, v in splits["validation"].items()}
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


def test_export_reloads_in_a_fresh_process_without_model_code(tmp_path):
  _, _, splits = tiny_problem()
  model = make_model("dmf", seed=3)
  server = serving.Server(model, buckets=(8, 64))
  path = tmp_path / "model.dmfx"
  export(server, str(path))
  rng = np.random.default_rng(1)
  requests, expected = [], []
  for row, n in [(3, 1), (40, 7), (12, 150)]:
    user, ids = request(splits["validation"], row, n, rng)
    expected.append(server.score(server.encode_user(user), ids).tolist())
    requests.append({"user": {k: np.asarray(v).tolist() for k, v in user.items()},
                     "ids": ids.tolist()})
  (tmp_path / "requests.json").write_text(json.dumps(requests))
  script = f"""
import json, sys
import numpy as np
from dmf_jax.serve.exported import ExportedScorer
scorer = ExportedScorer({str(path)!r})
out = []
for r in json.load(open({str(tmp_path / 'requests.json')!r})):
  out.append(scorer.score(scorer.encode_user(r["user"]), r["ids"]).tolist())
assert not any(m.startswith("dmf_jax.models.registry") or m.startswith("flax") for m in sys.modules), \\
    sorted(m for m in sys.modules if m.startswith(("dmf_jax", "flax")))
try:
  scorer.score(scorer.encode_user(json.load(open({str(tmp_path / 'requests.json')!r}))[0]["user"]), [99])
  raise SystemExit("out-of-range id accepted")
except ValueError as e:
  assert "item_ids" in str(e)
print(json.dumps(out))
"""
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(done.stdout.strip().splitlines()[-1])
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(path of an exported tiny DMF, its Server)."""
  server = serving.Server(make_model("dmf", seed=5), buckets=(8,))
  path = tmp_path_factory.mktemp("export") / "model.dmfx"
  export(server, str(path))
  return path, server


BAD_REQUESTS = [
    ({"user/user_id": 500}, r"user/user_id: value out of range \[0, 120\)"),
    ({"user/group": 99}, r"user/group: value out of range \[0, 8\)"),
    ({"user/group": -1}, r"user/group: value out of range \[0, 8\)"),
    ({"user/user_id": 3.5}, r"user/user_id: ids must be integers, got 3.5"),
    ({"user/user_id": [3]}, r"user/user_id: expected a scalar, got shape \(1,\)"),
    ({"user/user_id": "3"}, r"user/user_id: expected integer ids"),
    ({"hist_item_id": [1, 2.5]}, r"hist_item_id: ids must be integers, got 2.5"),
    ({"hist_item_id": [[1, 2]]}, r"hist_item_id: expected rank 1, got shape \(1, 2\)"),
    ({"hist_item_id": [1, 90]}, r"hist_item_id: item id 90 is out of range \[0, 90\)"),
]


@pytest.mark.parametrize("change,message", BAD_REQUESTS)
def test_server_and_exported_scorer_check_requests_alike(exported, change, message):
  from dmf_jax.serve.exported import ExportedScorer  # pylint: disable=g-import-not-at-top

  path, server = exported
  scorer = ExportedScorer(str(path))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3, 50, 17]} | change
  for impl in (server, scorer):
    with pytest.raises(ValueError, match=message):
      impl.encode_user(user)


def test_unknown_user_fields_and_a_missing_state_are_refused_alike(exported):
  from dmf_jax.serve.exported import ExportedScorer  # pylint: disable=g-import-not-at-top

  path, server = exported
  scorer = ExportedScorer(str(path))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3], "user/grup": 1}
  for impl in (server, scorer):
    with pytest.raises(ValueError, match=r"unknown user features \['user/grup'\]: this model "
                                         r"reads \['user/user_id', 'user/group'\]"):
      impl.encode_user(user)
    with pytest.raises(ValueError, match="user_state is None; pass what encode_user"):
      impl.score(None, [1, 2])


def test_export_refuses_to_overwrite_unless_forced(exported, tmp_path):
  _, server = exported
  target = tmp_path / "model.dmfx"
  target.write_bytes(b"an earlier export")
  with pytest.raises(UserError, match="exists; pass force=True"):
    export(server, str(target))
  assert target.read_bytes() == b"an earlier export"
  export(server, str(target), force=True)
  assert target.read_bytes()[:2] == b"PK"
  with pytest.raises(UserError, match="its folder .*missing_dir does not exist"):
    export(server, str(tmp_path / "missing_dir" / "model.dmfx"))
  with pytest.raises(UserError, match="is a folder"):
    export(server, str(tmp_path))


def test_candidate_ids_are_checked_alike(exported):
  from dmf_jax.serve.exported import ExportedScorer  # pylint: disable=g-import-not-at-top

  path, server = exported
  scorer = ExportedScorer(str(path))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3.0, 50, 17]}  # 3.0 is an id
  states = [impl.encode_user(user) for impl in (server, scorer)]
  np.testing.assert_allclose(scorer.score(states[1], [1.0, 2, 3]),
                             server.score(states[0], [1, 2, 3]), rtol=1e-5, atol=1e-5)
  for impl, state in zip((server, scorer), states):
    for ids, message in [([1, 90], r"item_ids: item id 90 is out of range"),
                         ([1.5], "item_ids: ids must be integers, got 1.5"),
                         ([[1, 2]], r"item_ids: expected rank 1, got shape \(1, 2\)"),
                         ([np.nan], "item_ids: ids must be integers, got nan"),
                         ([True], "item_ids: expected integer ids, got bool")]:
      with pytest.raises(ValueError, match=message):
        impl.score(state, ids)


def rewrite(src, dst, change):
  import zipfile  # pylint: disable=g-import-not-at-top

  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for name in zin.namelist():
      payload = change(name, zin.read(name))
      if payload is not None:
        zout.writestr(name, payload)
  return dst


@pytest.mark.parametrize("case,message", [
    ("missing member", "no score_candidates_8.bin"),
    ("bad manifest", "manifest.json is not valid JSON"),
    ("manifest without layout", "manifest.json is damaged"),
    ("garbage program", "encode_user.bin is damaged"),
    ("garbage weights", "weights.npz is damaged"),
    ("not a zip", "not a readable exported scorer"),
])
def test_a_damaged_export_is_one_value_error_naming_the_file(exported, tmp_path, case, message):
  from dmf_jax.serve.exported import ExportedScorer  # pylint: disable=g-import-not-at-top

  path, _ = exported
  dst = tmp_path / "damaged.dmfx"

  def change(name, payload):
    if case == "missing member" and name == "score_candidates_8.bin":
      return None
    if case == "bad manifest" and name == "manifest.json":
      return b"{not json"
    if case == "manifest without layout" and name == "manifest.json":
      manifest = json.loads(payload)
      del manifest["layout"]
      return json.dumps(manifest)
    if case == "garbage program" and name == "encode_user.bin":
      return b"\x00\x01garbage" * 10
    if case == "garbage weights" and name == "weights.npz":
      return payload[:100]
    return payload

  if case == "not a zip":
    dst.write_bytes(path.read_bytes()[:1000])
  else:
    rewrite(path, dst, change)
  with pytest.raises(ValueError) as err:
    ExportedScorer(str(dst))
  assert type(err.value) is ValueError
  assert str(dst) in str(err.value) and message in str(err.value)


@pytest.fixture(scope="module")
def hashed_run(tmp_path_factory):
  """A tiny run on generated data with hashed user and item ids (2 hashes each)."""
  from dmf_jax import data

  data_dir, workdir = tiny_run(tmp_path_factory, "tiny_hashed", num_train_steps=120,
                               eval_every_steps=40, checkpoint_every_steps=40)
  return workdir, data.prepare("generated_ctr", "tiny_hashed", str(data_dir))


def test_hashed_fields_take_ids_never_seen_in_training(hashed_run):
  workdir, built = hashed_run
  server = serving.Server.from_workdir(str(workdir), buckets=(8, 64))
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
  server = serving.Server.from_workdir(str(workdir), buckets=(8, 64))
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
