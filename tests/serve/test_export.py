"""Export (`serve.export`, `serve.exported`): one file that scores like its Server in a process
without the model code; overwrites refused unless forced; a damaged file is one clear error."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dmf_jax.core.errors import UserError
from dmf_jax.serve import server as serving
from dmf_jax.serve.export import export
from helpers import serving_model, serving_request, tiny_problem

REPO = pathlib.Path(__file__).resolve().parents[2]


def rewrite(src, dst, change):
  import zipfile  # pylint: disable=g-import-not-at-top

  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for name in zin.namelist():
      payload = change(name, zin.read(name))
      if payload is not None:
        zout.writestr(name, payload)
  return dst


def test_export_reloads_in_a_fresh_process_without_model_code(tmp_path):
  _, _, splits = tiny_problem()
  model = serving_model("dmf", seed=3)
  server = serving.Server(model, candidate_sizes=(8, 64))
  path = tmp_path / "model.dmfx"
  export(server, str(path))
  rng = np.random.default_rng(1)
  requests, expected = [], []
  for row, n in [(3, 1), (40, 7), (12, 150)]:
    user, ids = serving_request(splits["validation"], row, n, rng)
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
