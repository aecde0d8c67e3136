"""The binaries as processes: SIGKILL and resume is bit-identical; 2 processes (gloo) follow the
1-process loss trajectory; bad flags get clear errors."""

import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dmf_jax import data
from dmf_jax.train import checkpointing
from dmf_jax.train import experiment
from helpers import tiny_train_config

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = "experiments/configs/tiny.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  data.prepare("generated_ctr", "tiny", str(path))  # built once, before any process starts
  return path


def train_cmd(workdir, data_dir, *flags):
  return [sys.executable, "-m", "experiments.train", f"--config={TINY}", f"--workdir={workdir}",
          f"--config.data_dir={data_dir}", "--config.progress=False", *flags]


def env_with_devices(n):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def run(cmd, env, timeout=300):
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


KILL_FLAGS = ("--config.num_train_steps=160", "--config.checkpoint_every_steps=10",
              "--config.eval_every_steps=80")


def final_state(workdir, data_dir, step):
  config = tiny_train_config(data_dir, num_train_steps=160)
  exp = experiment.build_experiment(config)
  abstract = exp.partitioner.abstract_state(exp.shardings, exp.state)
  manager = checkpointing.CheckpointManager(pathlib.Path(workdir) / "checkpoints", every_steps=10)
  return manager.restore(step, abstract, catalog=checkpointing.catalog_of(exp.state)).state


def test_sigkill_and_resume_is_bit_identical(data_dir, tmp_path):
  env = env_with_devices(8)  # the same device count as this process (conftest)
  run(train_cmd(tmp_path / "straight", data_dir, *KILL_FLAGS), env)

  workdir = tmp_path / "killed"
  kills = 0
  rng = random.Random(0)
  for _ in range(2):  # kill twice, at random moments after some checkpoint exists
    proc = subprocess.Popen(train_cmd(workdir, data_dir, *KILL_FLAGS), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    ckpt_dir = workdir / "checkpoints"
    before = {p.name for p in ckpt_dir.iterdir()} if ckpt_dir.exists() else set()
    while time.time() < deadline and proc.poll() is None:
      now = {p.name for p in ckpt_dir.iterdir() if p.name.isdigit()} if ckpt_dir.exists() else set()
      if now - before:
        break
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait()
  assert kills >= 1, "the run finished before it could be killed"
  resumed = run(train_cmd(workdir, data_dir, *KILL_FLAGS), env)
  assert "resumed from step" in resumed.stderr

  a = final_state(tmp_path / "straight", data_dir, 160)
  b = final_state(workdir, data_dir, 160)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 10
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # bit-identical
  results_a = json.loads((tmp_path / "straight" / "results.json").read_text())
  results_b = json.loads((workdir / "results.json").read_text())
  assert results_a["test"] == results_b["test"]


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_losses(workdir):
  records = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["loss"] for r in records if r["kind"] == "train"]


@pytest.mark.parametrize("batch_size", [32, 8])
def test_two_processes_with_gloo_follow_the_single_process_trajectory(data_dir, tmp_path,
                                                                      batch_size):
  """Batch 8: a data shard's 4 x 13 item positions are fewer than the catalog's 121 rows, so
  each process's batches carry their own distinct items and the processes agree on their
  count every step; batch 32 takes the catalog path."""
  flags = ("--config.num_train_steps=20", "--config.log_every_steps=1",
           "--config.eval_every_steps=10", f"--config.batch_size={batch_size}")
  single = run(train_cmd(tmp_path / "one", data_dir, *flags), env_with_devices(1))
  port = free_port()
  procs = [
      subprocess.Popen(
          train_cmd(tmp_path / "two", data_dir, *flags, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={i}"),
          cwd=REPO, env=env_with_devices(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          text=True)
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  unique = "training batches carry their distinct items: 1 data shard(s) per process"
  assert (unique in single.stderr) == (unique in outputs[0][1]) == (batch_size == 8)
  one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
  assert len(one) == len(two) == 20
  np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
  r1 = json.loads((tmp_path / "one" / "results.json").read_text())
  r2 = json.loads((tmp_path / "two" / "results.json").read_text())
  assert r2["test"]["count"] == r1["test"]["count"] == 346
  np.testing.assert_allclose(r2["test"]["auc"], r1["test"]["auc"], rtol=1e-5)


@pytest.mark.parametrize("flag,message", [
    ("--config.batch_size=abc", "batch_size"),
    ("--config.no_such_field=1", "no_such_field"),
    ("--config.model=dnn", "unknown model 'dnn'; valid models"),
    ("--config.batch_size=33", "batch_size=33 is not divisible by the mesh's data axis"),
])
def test_bad_flags_get_clear_errors(data_dir, tmp_path, flag, message):
  done = subprocess.run(train_cmd(tmp_path / "bad", data_dir, flag), cwd=REPO,
                        env=env_with_devices(8), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]  # a user error: one message, no traceback
  assert message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
  assert not (tmp_path / "bad" / "checkpoints").exists()


def test_missing_workdir_flag(tmp_path):
  done = subprocess.run([sys.executable, "-m", "experiments.train", f"--config={TINY}"],
                        cwd=REPO, env=env_with_devices(1), capture_output=True, text=True,
                        timeout=120)
  assert done.returncode != 0 and "--workdir" in done.stderr
