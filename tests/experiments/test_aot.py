"""Ahead-of-time compilation for TPU (libtpu, the `aot` extra; nothing runs on a TPU): DMF's
sharded train step and its serving calls compile for a v5e 2x4 slice at MovieLens dimensions,
and the Colab notebook's run for one v5e chip; per-device memory fits, the state is donated,
and a large catalog's tables are split over `mesh.model`."""

import dataclasses

import jax
import numpy as np
import pytest
from absl import flags

from dmf_jax.data import synthetic
from dmf_jax.train.config import default_config
from experiments import aot_report as aot
from experiments import bench_utils

SMALL = aot.Settings(seq_len=50, serve_seq_len=50, candidates=128, batch_size=512)


@pytest.fixture(scope="module", autouse=True)
def parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(["test"])  # the report's flags at their defaults


@pytest.fixture(scope="module", autouse=True)
def no_persistent_cache():
  """Programs for absent devices cannot be loaded from the suite's compilation cache."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  before = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # the flag is read once per process: read it again
  yield
  jax.config.update("jax_enable_compilation_cache", before)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def v5e_2x4():
  return aot.Target.parse("tpu:v5e:2x4").devices()


def state_bytes_per_device(state) -> int:
  return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(state)))


def test_dmf_train_step_and_serving_compile_for_a_v5e_slice(v5e_2x4):
  assert len(v5e_2x4) == 8 and "v5" in v5e_2x4[0].device_kind.lower()
  step, state, batch, partitioner = aot.train_program(v5e_2x4, "dmf", 1682, SMALL)
  assert dict(partitioner.mesh.shape) == {"data": 8, "model": 1}
  with jax.set_mesh(partitioner.mesh):
    compiled, _ = aot.compile_phase(step, state, batch)
  memory = aot.memory(compiled)
  held = state_bytes_per_device(state)
  assert memory["arguments"] >= held  # the state and this device's rows of the batch
  assert memory["alias"] >= 0.95 * held  # donated: the new state reuses the old one's buffers
  assert memory["total"] < 0.1 * aot.CHIPS["v5e"].hbm_bytes  # MovieLens dims: far from full
  flops, bytes_accessed = aot.costs(compiled)
  assert flops > 0 and bytes_accessed > 0
  assert "all-reduce" in aot.collectives(compiled)  # the data-parallel gradient sum

  encode_fn, score_fn, params, user, ids = aot.serving_programs(v5e_2x4[0], "dmf", 1682, SMALL)
  encoded, _ = aot.compile_phase(encode_fn, params, user)
  user_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=ids.sharding),
                            jax.eval_shape(encode_fn, params, user))
  scored, _ = aot.compile_phase(score_fn, params, user_state, ids)
  for program in (encoded, scored):
    assert 0 < aot.memory(program)["total"] < 0.1 * aot.CHIPS["v5e"].hbm_bytes


def test_a_large_catalog_is_split_over_the_model_axis(v5e_2x4):
  settings = dataclasses.replace(SMALL, shard_items=100_000, mesh_model=4, batch_size=512,
                                 large_batch_size=512)
  _, state, _, partitioner = aot.train_program(v5e_2x4, "dmf", 1_000_000, settings)
  assert dict(partitioner.mesh.shape) == {"data": 2, "model": 4}
  table = state.params["items"]["item_id"]["table"]["embedding"]
  table = getattr(table, "value", table)
  per_device = np.prod(table.sharding.shard_shape(table.shape))
  assert per_device * 4 == pytest.approx(np.prod(table.shape), rel=0.01)
  vectors = [x for path, x in jax.tree_util.tree_leaves_with_path(state.rest)
             if "modalities" in jax.tree_util.keystr(path)]
  assert vectors and all(np.prod(v.sharding.shard_shape(v.shape)) * 4 ==
                         pytest.approx(np.prod(v.shape), rel=0.01) for v in vectors)


def test_a_large_catalogs_train_batch_carries_the_pipelines_inputs(v5e_2x4):
  """As training sends them: distinct items per data shard and (DMF) the frozen cosines."""
  settings = dataclasses.replace(SMALL, batch_size=512, large_batch_size=512)
  _, _, batch, _ = aot.train_program(v5e_2x4, "dmf", 1_000_000, settings)
  assert batch["unique_items"].shape[0] == 2  # one row per data shard
  assert 1024 <= batch["unique_items"].shape[1] < 512 // 2 * 51  # zipf: repeats within a shard
  assert batch["hist_similarity"].shape == (512, 50, 2)
  _, _, din, _ = aot.train_program(v5e_2x4, "din", 1_000_000, settings)
  assert "unique_items" in din and "hist_similarity" not in din  # DIN reads no cosines
  _, _, small, _ = aot.train_program(v5e_2x4, "dmf", 1682, settings)
  assert "unique_items" not in small and "hist_similarity" not in small  # matrix, catalog rows
  off = dataclasses.replace(settings, pipeline_inputs=False)
  assert set(aot.train_program(v5e_2x4, "dmf", 1_000_000, off)[2]) == set(din) - {
      "unique_items", "item_row", "hist_item_row"}


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_the_colab_notebooks_run_compiles_for_one_v5e_chip(compute_dtype):
  devices = aot.Target.parse("tpu:v5e:1x1").devices()
  assert len(devices) == 1
  config = default_config()  # the notebook's settings: generated_ctr/default, 128 per device
  config.model_config.compute_dtype = compute_dtype
  config.model_config.lookup_mode = "one_hot"  # what 'auto' is on a TPU
  schema = synthetic.schema_for(synthetic.SyntheticConfig())
  settings = dataclasses.replace(SMALL, batch_size=128)
  model_config = bench_utils.model_config(config, "dmf")
  step, state, batch, partitioner = aot.train_program(devices, "dmf", schema.num_items, settings,
                                                      schema=schema, config=model_config)
  with jax.set_mesh(partitioner.mesh):
    compiled, _ = aot.compile_phase(step, state, batch)
  assert aot.memory(compiled)["alias"] >= 0.95 * state_bytes_per_device(state)
  # Mixed precision keeps the parameters and the optimizer state float32; the program's
  # matmuls run in the compute dtype.
  assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
          if np.issubdtype(x.dtype, np.floating)} == {np.dtype("float32")}
  text = compiled.as_text()
  assert (" bf16[" in text) == (compute_dtype == "bfloat16")


def test_gpu_targets_read_openxlas_spec_files_and_say_what_is_missing(tmp_path, monkeypatch):
  """GPU specs come from a folder of openxla/xla's files; fields this jaxlib's proto does not
  know are dropped; without the folder (or the CUDA plugin) a target's row says so."""
  monkeypatch.delenv("DMF_GPU_TARGET_CONFIGS", raising=False)
  with pytest.raises(RuntimeError, match="GPU targets need --gpu_target_configs"):
    aot.gpu_target_config("h100")
  (tmp_path / "h100_sxm.txtpb").write_text(
      "gpu_device_info {\n  core_count: 132\n  collective_memory_granularity: 2097152\n}\n"
      'platform_name: "CUDA"\n')
  monkeypatch.setenv("DMF_GPU_TARGET_CONFIGS", str(tmp_path))
  text = aot.gpu_target_config("h100")
  assert "core_count: 132" in text and "collective_memory_granularity" not in text
  with pytest.raises(RuntimeError, match=r"no .*h200\.txtpb"):
    aot.gpu_target_config("h200")
  with pytest.raises(ValueError, match="gpu:<chip>:<devices>"):
    aot.Target.parse("gpu:a999:8")
  rows = aot.report(aot.Target.parse("gpu:h200:8"), ["dmf"], [1682], ["train"], SMALL,
                    log=lambda m: None)
  assert len(rows) == 1 and not rows[0]["compiled"]
  assert "aot-gpu" in rows[0]["error"] or "h200.txtpb" in rows[0]["error"]
