"""The package works outside its checkout: a wheel of the repository, installed (not editable)
into a fresh virtual environment, trains, evaluates and serves from another directory with no
PYTHONPATH.

The fresh environment gets the dependencies of this test environment through a `.pth` file
(paths only: the editable install of this checkout is not on it), so the test needs no
network and checks exactly what matters: that `dmf_jax` and nothing from the repository's
top-level folders is imported.
"""

import json
import os
import pathlib
import site
import subprocess
import sys
import sysconfig

REPO = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib.util, json, sys
import dmf_jax
assert importlib.util.find_spec("data") is None, "the repository's data/ is importable"
assert importlib.util.find_spec("experiments") is None
config = dmf_jax.default_config()
config.dataset_config = "tiny"
config.data_dir = sys.argv[1]
config.num_train_steps = 8
config.eval_every_steps = config.checkpoint_every_steps = 8
config.batch_size, config.eval_batch_size = 64, 256
config.progress = False
results = dmf_jax.train_and_evaluate(config, sys.argv[2])
server = dmf_jax.Server.from_workdir(sys.argv[2])
logits = server.score(server.encode_user({"user/user_id": 3, "user/group": 1,
                                          "hist_item_id": [4, 8, 15]}), [16, 23, 42])
print(json.dumps({"file": dmf_jax.__file__, "test_auc": results["test"]["auc"],
                  "dataset": results["dataset"], "logits": logits.tolist()}))
"""


def test_a_wheel_installed_elsewhere_trains_evaluates_and_serves(tmp_path):
  wheels = tmp_path / "wheels"
  build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels),
           str(REPO)]
  done = subprocess.run(build, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  (wheel,) = wheels.glob("dmf_jax-*.whl")

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = venv / "bin" / "python"
  purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                            "['purelib'])"], capture_output=True, text=True, check=True).stdout
  deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
          *site.getsitepackages()}
  pathlib.Path(purelib.strip(), "test_env_deps.pth").write_text(
      "\n".join(p for p in deps if p and pathlib.Path(p) != REPO) + "\n")
  done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps",
                         "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
         "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([str(python), "-c", SCRIPT, str(tmp_path / "tfds"),
                         str(tmp_path / "run")], cwd=elsewhere, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  out = json.loads(done.stdout.strip().splitlines()[-1])
  assert out["file"].startswith(str(venv)), out["file"]
  assert out["dataset"] == "generated_ctr/tiny" and 0.0 < out["test_auc"] < 1.0
  assert len(out["logits"]) == 3 and all(abs(x) < 100 for x in out["logits"])
  assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 8
