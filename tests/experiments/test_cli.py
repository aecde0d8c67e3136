"""User errors in the binaries: one short message naming the culprit, exit status 2, no
traceback (unless --debug); config validation lists every problem at once."""

import json
import pathlib
import subprocess
import sys

import pytest

from dmf_jax.train import config as config_lib
from helpers import tiny_train_config

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = "experiments/configs/tiny.py"


def run(args, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})


def assert_user_error(done, *fragments):
  assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  errors = [l for l in done.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, done.stderr[-3000:]
  for fragment in fragments:
    assert fragment in done.stderr, done.stderr[-3000:]


def test_validation_lists_every_problem_at_once(tmp_path):
  config = tiny_train_config(tmp_path)
  config.model_config.num_buckets = 0
  config.model_config.dropout = 3.0
  config.optimizer.learning_rate = -1.0
  config.optimizer.schedule = "linear"
  config.dataset_config = "huge"
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(config, num_devices=1)
  message = str(err.value)
  for fragment in ("model_config: num_buckets must be a positive int, got 0",
                   "model_config: dropout must be in [0, 1), got 3.0",
                   "optimizer: optimizer.learning_rate must be > 0",
                   "optimizer: optimizer.schedule 'linear' is not one of",
                   "dataset_config: generated_ctr has no config 'huge'"):
    assert fragment in message, message
  assert len(message.splitlines()) == 6


def test_unknown_config_field(tmp_path):
  done = run(["experiments.train", f"--config={TINY}", f"--workdir={tmp_path / 'w'}",
              "--config.model_config.no_such_field=1"])
  assert_user_error(done, "unknown config field 'no_such_field' in "
                          "--config.model_config.no_such_field=1")
  assert not (tmp_path / "w").exists()
  done = run(["experiments.train", f"--config={TINY}", f"--workdir={tmp_path / 'w'}",
              "--config.model_config.bucket_dimm=1"])  # a misspelt nested field
  assert_user_error(done, "unknown config field 'bucket_dimm' in "
                          "--config.model_config.bucket_dimm=1 (did you mean \"bucket_dim\"?)")
  assert "\\" not in done.stderr


def test_positional_arguments_are_refused(tmp_path):
  done = run(["experiments.tune", f"--config={TINY}", "--model=din",
              f"--output_dir={tmp_path / 't'}", "dmf"])
  assert_user_error(done, "unexpected arguments ['dmf']")
  assert not (tmp_path / "t").exists()


def test_missing_config_file_and_debug(tmp_path):
  done = run(["experiments.train", "--config=experiments/configs/nope.py",
              f"--workdir={tmp_path / 'w'}"])
  assert_user_error(done, "config file experiments/configs/nope.py not found")
  debug = run(["experiments.train", "--config=experiments/configs/nope.py",
               f"--workdir={tmp_path / 'w'}", "--debug"])
  assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_bad_byod_file_through_data_build(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  (raw / "interactions.csv").write_text("user,item,timestamp,label\nu0,i0,1,1\nu0,i1,noon,0\n")
  (raw / "dataset.json").write_text(json.dumps({"interactions": "interactions.csv",
                                                "label": "label"}))
  done = run(["data.build", "--dataset=byod_ctr", f"--data_dir={tmp_path / 'out'}",
              f"--manual_dir={raw}"])
  assert_user_error(done, f"{raw / 'interactions.csv'}:3: timestamp 'noon' is not an integer")


def test_resuming_another_run_through_the_binary(tmp_path):
  data_dir, workdir = tmp_path / "tfds", tmp_path / "run"
  common = [f"--config={TINY}", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
            "--config.progress=False", "--config.num_train_steps=10",
            "--config.eval_every_steps=10"]
  first = run(["experiments.train", *common])
  assert first.returncode == 0, first.stderr[-3000:]
  assert "test, cold items" in first.stdout  # the final table has the cold-item row
  before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  done = run(["experiments.train", *common, "--config.model=din"])
  assert_user_error(done, f"{workdir} holds another run", "model: 'dmf' in the workdir, 'din' now",
                    "--config.overwrite=True")
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_a_first_run_prints_only_the_projects_own_lines(tmp_path):
  """A run that builds its dataset first, its output a log file (not a terminal): no TFDS
  banner, no progress-bar escape sequences, no absl warnings; the build in two lines."""
  done = run(["experiments.train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
              f"--config.data_dir={tmp_path / 'tfds'}", "--config.num_train_steps=10",
              "--config.eval_every_steps=10"])
  assert done.returncode == 0, done.stderr[-3000:]
  said = done.stdout + done.stderr
  for noise in ("Downloading and preparing", "Unknown size", "\x1b[", "\r", "examples/s]",
                "Using custom data configuration", "Subsequent calls will reuse"):
    assert noise not in said, (noise, said[-3000:])
  lines = done.stderr.splitlines()
  assert lines[0].startswith("building generated_ctr/tiny into ") and lines[1].startswith(
      "built generated_ctr/tiny in ")
  assert "validation" in done.stdout and "test" in done.stdout


def test_new_binaries_refuse_to_replace_earlier_output(tmp_path):
  """aot_report's --output_json and benchmark_scale's --exposure are checked before any work;
  an earlier report is never overwritten without --force."""
  earlier = tmp_path / "aot.json"
  earlier.write_text("[]")
  done = run(["experiments.aot_report", "--targets=tpu:v5e:1x1", "--models=din",
              f"--output_json={earlier}"])
  assert_user_error(done, f"--output_json: {earlier} exists", "--force")
  assert earlier.read_text() == "[]"
  done = run(["experiments.benchmark_scale", f"--data_dir={tmp_path}", "--exposure=zipf:0",
              f"--output_json={tmp_path / 's.json'}"])
  assert_user_error(done, "--exposure: item exposure 'zipf:0' is not 'uniform' or 'zipf:A'")
  done = run(["experiments.aot_report", "--targets=tpu:v5e:1x1", "--exposure=zipf:0"])
  assert_user_error(done, "--exposure: item exposure 'zipf:0' is not 'uniform' or 'zipf:A'")
  scale = tmp_path / "scale.json"
  scale.write_text("{}")
  done = run(["experiments.benchmark_scale", f"--data_dir={tmp_path}", f"--output_json={scale}"])
  assert_user_error(done, f"--output_json: {scale} exists", "--force")
  assert scale.read_text() == "{}"


@pytest.mark.parametrize("binary", ["benchmark_train", "benchmark_roofline", "benchmark_serving",
                                    "benchmark_input", "benchmark_em3_memory",
                                    "benchmark_checkpoint"])
def test_benchmarks_refuse_to_replace_earlier_figures(tmp_path, binary):
  """Every benchmark checks its --output_json before any work (`cli.refuse_to_replace`)."""
  earlier = tmp_path / "figures.json"
  earlier.write_text("{}")
  required = [f"--config={TINY}"] if binary == "benchmark_train" else []
  done = run([f"experiments.{binary}", f"--output_json={earlier}", *required])
  assert_user_error(done, f"--output_json: {earlier} exists", "--force")
  assert earlier.read_text() == "{}"


def test_benchmark_checkpoint_keeps_a_folder_it_did_not_make(tmp_path):
  """--directory is a scratch folder that the benchmark removes: a folder of the user's is
  refused (and kept), one the benchmark made (its mark inside) is replaced."""
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep")
  done = run(["experiments.benchmark_checkpoint", f"--directory={mine}"])
  assert_user_error(done, f"--directory: {mine} exists and is not this benchmark's scratch")
  assert (mine / "notes.txt").read_text() == "keep"
  scratch = tmp_path / "scratch"  # left by an earlier run of the benchmark: its mark inside
  scratch.mkdir()
  (scratch / ".dmf_checkpoint_bench").touch()
  (scratch / "step_0").mkdir()
  done = run(["experiments.benchmark_checkpoint", f"--directory={scratch}", "--gigabytes=0.001",
              "--repeats=1", f"--output_json={tmp_path / 'ckpt.json'}"])
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads((tmp_path / "ckpt.json").read_text())["bytes_on_disk"] > 0
  assert not scratch.exists()
