r"""Every model compiled ahead of time for TPU and GPU targets that are not present: per-device
memory, compile time, XLA's cost analysis and a roofline estimate of the step time.

  python -m experiments.aot_report --targets=tpu:v5e:2x4 --models=din,dmf \
      --num_items=1682,1000000 --output_json=/tmp/aot.json

A target is `tpu:<chip>:<topology>` (libtpu: `pip install -e ".[aot]" -c requirements.lock`)
or `gpu:<chip>:<count>` (the CUDA plugin: the `aot-gpu` extra; without it GPU rows say so).
For each target, model and catalog size it compiles three phases:
  train   the sharded, donated train step (the loop's own `Partitioner.jit_train_step`) at the
          global batch `--batch_size` (MovieLens model dimensions and schema; catalogs of more
          than `--shard_items` items are row-sharded over `mesh.model` = `--mesh_model`);
  encode  serving's `encode_user` for one user with L = `--serve_seq_len` behaviours;
  score   serving's `score_candidates` for N = `--candidates` candidates (one device).
Each row: {"target", "model", "num_items", "mesh", "phase", "compiled", "error",
"compile_seconds", "bytes_per_device": {"arguments", "outputs", "temp", "alias", "total"},
"flops", "bytes_accessed", "collectives", "estimated_seconds", "estimated_examples_per_s"}.
flops and bytes are XLA's cost analysis of the per-device program; the estimate is a
roofline, max(flops / peak FLOP/s, bytes / HBM bandwidth), from the chip figures in `CHIPS`
(published peaks: an estimate, not a measurement). Compiles run on this machine's CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
import time

# Compile for absent devices; run nothing (`--targets=local` needs JAX_PLATFORMS set to the
# attached accelerator's platform, plus cpu: e.g. JAX_PLATFORMS=cuda,cpu).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) when loaded; compiling needs no TPU,
# so several processes (test workers, a report beside them) may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# GPU rows take their cost analysis from the same program compiled for as many CPU devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from dmf_jax.core.rows import batch_unique_rows, catalog_exceeds_positions  # noqa: E402
from dmf_jax.core.sharding import ShardingRules  # noqa: E402
from dmf_jax.data import synthetic  # noqa: E402
from dmf_jax.models import registry  # noqa: E402
from dmf_jax.nn import precision  # noqa: E402
from dmf_jax.serve import server as serving  # noqa: E402
from dmf_jax.serve.request import RequestLayout  # noqa: E402
from dmf_jax.train import optimizers, partitioner as pt  # noqa: E402
from dmf_jax import cli  # noqa: E402
from experiments import bench_utils  # noqa: E402
from experiments.configs import movielens  # noqa: E402

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip peaks: dense bf16 matmul FLOP/s, HBM bandwidth (bytes/s), HBM bytes."""

  flops: float
  hbm_bandwidth: float
  hbm_bytes: float
  source: str


# One table of the chips' published figures (per chip; dense, no sparsity).
CHIPS = {
    "v4": Chip(275e12, 1228e9, 32 * GiB, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip(197e12, 819e9, 16 * GiB, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip(459e12, 2765e9, 95 * GiB, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip(918e12, 1640e9, 32 * GiB, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip(989e12, 3.35e12, 80 * GiB, "NVIDIA H100 SXM5 datasheet (BF16 dense)"),
    "h200": Chip(989e12, 4.8e12, 141e9, "NVIDIA H200 SXM datasheet (BF16 dense)"),
}

_TARGETS = flags.DEFINE_list(
    "targets", ["tpu:v5e:1x1", "tpu:v5e:2x4", "tpu:v6e:2x4", "tpu:v5p:2x2x1", "gpu:h100:8",
                "gpu:h200:8"], "Targets: tpu:<chip>:<topology> or gpu:<chip>:<devices>.")
_MODELS = flags.DEFINE_list("models", ["din", "dmf"], "Registered models, or 'all'.")
_ITEMS = flags.DEFINE_list("num_items", ["1682", "1000000"], "Catalog sizes.")
_PHASES = flags.DEFINE_list("phases", ["train", "encode", "score"], "Phases to compile.")
_BATCH = flags.DEFINE_integer("batch_size", 4096, "Global train batch (MovieLens-size catalogs).")
_LARGE_BATCH = flags.DEFINE_integer("large_batch_size", 1024,
                                    "Global train batch for catalogs above --shard_items.")
_SHARD_ITEMS = flags.DEFINE_integer("shard_items", 100_000,
                                    "Catalogs above this many items are row-sharded.")
_MESH_MODEL = flags.DEFINE_integer("mesh_model", 4, "mesh.model for the sharded catalogs.")
_SPARSE = flags.DEFINE_integer("sparse_min_rows", 100_000,
                               "Row-sparse Adam for tables of at least this many rows.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 50, "Behaviours per training example.")
_SERVE_SEQ_LEN = flags.DEFINE_integer("serve_seq_len", 200, "Behaviours of the served user.")
_CANDIDATES = flags.DEFINE_integer("candidates", 1200, "Candidates scored per request.")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                           "The models' compute dtype (model_config.compute_dtype).")
_PIPELINE = flags.DEFINE_bool(
    "pipeline_inputs", True, "Train batches carry the input pipeline's distinct items and "
    "frozen cosines where training sends them (a large catalog); False: ids only.")
_EXPOSURE = flags.DEFINE_string("exposure", "zipf:1.0",
                                "Item exposure of the batch that sizes the distinct items.")
_OUTPUT = flags.DEFINE_string("output_json", None, "Where to write the rows (JSON list).")
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --output_json.")
_GPU_CONFIGS = flags.DEFINE_string(
    "gpu_target_configs", None, "Folder of openxla/xla's GPU target specs (h100_sxm.txtpb, "
    "h200.txtpb; default $DMF_GPU_TARGET_CONFIGS) for gpu:<chip>:<n> targets.")


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target: `tpu:v5e:2x4`, `gpu:h100:8`."""

  name: str
  platform: str  # 'tpu' | 'gpu'
  chip: str
  topology: str

  @classmethod
  def parse(cls, text: str) -> "Target":
    if text == "local":  # this machine's accelerators (experiments/accelerator_check.sh)
      return cls.local()
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in ("tpu", "gpu") or parts[1] not in CHIPS:
      raise ValueError(f"--targets: {text!r} is not tpu:<chip>:<topology> or "
                       f"gpu:<chip>:<devices> with a chip of {sorted(CHIPS)}")
    return cls(text, *parts)

  @classmethod
  def local(cls) -> "Target":
    """The attached devices, compiled for as they are (the chip: the first of `CHIPS` that
    their device kind names, e.g. 'NVIDIA H200' -> h200)."""
    devices = jax.devices()
    kind = devices[0].device_kind.lower().replace(" ", "")
    chip = next((c for c in CHIPS if c in kind), None)
    if devices[0].platform not in ("tpu", "gpu") or chip is None:
      raise ValueError(f"--targets=local: the attached devices ({devices[0].device_kind!r}, "
                       f"{devices[0].platform}) are not an accelerator of {sorted(CHIPS)}")
    return cls("local", "local-" + devices[0].platform, chip, str(len(devices)))

  def devices(self) -> list:
    """The target's devices (abstract: nothing runs on them)."""
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

    if self.platform.startswith("local"):
      return jax.devices()
    if self.platform == "tpu":
      if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError('TPU targets need libtpu: pip install -e ".[aot]" -c requirements.lock')
      kwargs = {"chip_config_name": "megacore"} if self.chip == "v4" else {}
      chips = [int(n) for n in self.topology.split("x")]
      if np.prod(chips) < 4:  # fewer chips than a host's default 2x2 (Colab's single v5e)
        kwargs["chips_per_host_bounds"] = [*chips, 1, 1][:3]
      return list(topologies.get_topology_desc(f"{self.chip}:{self.topology}", "tpu",
                                               **kwargs).devices)
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
      raise RuntimeError('GPU targets need the CUDA plugin: pip install -e ".[aot-gpu]" '
                         "-c requirements.lock")
    return list(topologies.get_topology_desc(
        platform="cuda", topology=f"1x1x{int(self.topology)}",
        target_config=gpu_target_config(self.chip)).devices)


# openxla/xla's GpuTargetConfigProto files (xla/backends/gpu/target_config/specs/) per chip.
GPU_SPEC_FILES = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
# Fields of newer specs that jaxlib 0.10.2's proto does not know (its parser rejects the file).
GPU_SPEC_FIELDS_UNKNOWN = ("collective_memory_granularity",)


def gpu_target_config(chip: str) -> str:
  """The text of `chip`'s GpuTargetConfigProto from --gpu_target_configs (a folder holding
  openxla/xla's spec files, e.g. h100_sxm.txtpb), without the fields this jaxlib rejects."""
  folder = _GPU_CONFIGS.value or os.environ.get("DMF_GPU_TARGET_CONFIGS", "")
  if not folder:
    raise RuntimeError("GPU targets need --gpu_target_configs (or DMF_GPU_TARGET_CONFIGS): a "
                       "folder with openxla/xla's xla/backends/gpu/target_config/specs/"
                       f"{GPU_SPEC_FILES.get(chip, chip + '.txtpb')}")
  path = os.path.join(folder, GPU_SPEC_FILES.get(chip, f"{chip}.txtpb"))
  if not os.path.isfile(path):
    raise RuntimeError(f"--gpu_target_configs: no {path}")
  with open(path) as f:
    lines = f.read().splitlines()
  return "\n".join(l for l in lines if l.strip().split(":")[0] not in GPU_SPEC_FIELDS_UNKNOWN)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a report compiles (the flags' values; the tests give their own)."""

  seq_len: int = 50  # behaviours per training example
  serve_seq_len: int = 200  # behaviours of the served user
  candidates: int = 1200  # candidates scored per request
  batch_size: int = 4096  # global train batch, catalogs up to shard_items
  large_batch_size: int = 1024  # global train batch above shard_items
  shard_items: int = 100_000  # catalogs above this are row-sharded over mesh.model
  mesh_model: int = 4
  sparse_min_rows: int = 100_000  # row-sparse Adam for tables this large (sharded catalogs)
  compute_dtype: str = "float32"  # the models' compute dtype (mixed precision: 'bfloat16')
  # The train batch carries what the input pipeline sends a large catalog's steps: the
  # batch's distinct items (when the catalog has more rows than a data shard's positions; U
  # from a batch drawn with `exposure`) and the frozen cosines (a model that takes them).
  pipeline_inputs: bool = True
  exposure: str = "zipf:1.0"

  @classmethod
  def from_flags(cls) -> "Settings":
    return cls(_SEQ_LEN.value, _SERVE_SEQ_LEN.value, _CANDIDATES.value, _BATCH.value,
               _LARGE_BATCH.value, _SHARD_ITEMS.value, _MESH_MODEL.value, _SPARSE.value,
               _DTYPE.value, _PIPELINE.value, _EXPOSURE.value)

  def batch(self, num_items: int) -> int:
    return self.batch_size if num_items <= self.shard_items else self.large_batch_size


def mesh_shape(num_devices: int, num_items: int, settings: Settings) -> tuple[int, int]:
  """(data, model): row-sharded tables and catalog above `settings.shard_items` items."""
  model = settings.mesh_model if num_items > settings.shard_items else 1
  model = min(model, num_devices)
  while num_devices % model:
    model -= 1
  return num_devices // model, model


def model_schema(num_items: int, seq_len: int):
  return bench_utils.movielens_like_schema(seq_len, num_items)


def model_config(name: str, compute_dtype: str = "float32", platform: str = "cpu"):
  """MovieLens's model config of `name`; `lookup_mode='auto'` resolves by the backend of the
  process that builds the model, so for a TPU target it is stated: one-hot, as on a TPU."""
  config = movielens.get_config()
  config.model_config.compute_dtype = compute_dtype
  if platform == "tpu":
    config.model_config.lookup_mode = "one_hot"
  return bench_utils.model_config(config, name)


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
         "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
  out["total"] = out["arguments"] + out["outputs"] + out["temp"] - out["alias"]
  return out


def costs(compiled) -> tuple[float | None, float | None]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None, None
  return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(compiled) -> dict[str, int]:
  """How many of each collective the compiled per-device program holds."""
  text = compiled.as_text() or ""
  found = {}
  for op in COLLECTIVES:
    n = len(re.findall(rf"= [^=\n]*\b{op}(-start)?\(", text))
    if n:
      found[op] = n
  return found


def estimate(chip: Chip, flops, bytes_accessed, examples: int) -> tuple[float | None, float | None]:
  if flops is None or bytes_accessed is None:
    return None, None
  seconds = max(flops / chip.flops, bytes_accessed / chip.hbm_bandwidth)
  return seconds, (examples / seconds if seconds > 0 else None)


# Compiling for GPUs that are not present: XLA's CUB radix sort (the sorts of row-sparse Adam's
# unique rows, above ~1,000 keys) sizes its scratch on a live device ("invalid device ordinal"
# without one), and the Triton GEMM emitter, untuned without a device, finds no tiling for some
# fused dots ("Couldn't find output tile sizes", BST's attention output, DMF/EM3 backward dots
# at 1M items). Without a device, sorts and GEMMs compile as XLA's own sort and cuBLAS calls.
GPU_AOT_OPTIONS = {"xla_gpu_enable_cub_radix_sort": False, "xla_gpu_enable_triton_gemm": False}


def compile_phase(fn, *args, options=None):
  """(compiled, seconds): trace, lower and compile `fn` (a jax.jit) for abstract `args`."""
  start = time.perf_counter()
  compiled = fn.trace(*args).lower().compile(compiler_options=options)
  return compiled, time.perf_counter() - start


def train_program(devices, name: str, num_items: int, settings: Settings, schema=None,
                  config=None):
  """(jitted train step, abstract state, abstract batch, partitioner) on `devices`; schema and
  config default to MovieLens's at `num_items` items."""
  data, model = mesh_shape(len(devices), num_items, settings)
  partitioner = pt.Partitioner(pt.MeshConfig(data=data, model=model), devices=devices)
  schema = schema or model_schema(num_items, settings.seq_len)
  config = config or model_config(name, settings.compute_dtype, devices[0].platform)
  batch_size = settings.batch(num_items)
  tx = optimizers.make_optimizer(optimizers.OptimizerConfig(
      learning_rate=1e-3, sparse_min_rows=settings.sparse_min_rows
      if num_items > settings.shard_items else 0), 1000)
  factory = lambda rules, rngs: registry.build_model(config, schema, rngs=rngs, sharding=rules)
  graphdef, state, shardings = partitioner.abstract_init(factory, tx)
  like = bench_utils.random_batch(schema.replace(num_items=min(num_items, 1000)), 8,
                                  np.random.default_rng(0))
  shapes = {k: jax.ShapeDtypeStruct((batch_size, *np.shape(like[k])[1:]), like[k].dtype)
            for k in schema.batch_keys()}
  if settings.pipeline_inputs:
    shapes |= pipeline_inputs(nnx.merge(graphdef, state.params, state.rest), schema, batch_size,
                              partitioner.data_size, settings.exposure)
  batch = partitioner.abstract_batch(shapes)
  return partitioner.jit_train_step(graphdef, tx, shardings), state, batch, partitioner


def pipeline_inputs(model, schema, batch_size: int, shards: int, exposure: str) -> dict:
  """The shapes of what the input pipeline adds to a train batch for `model` (as
  `train.experiment.Experiment` decides): the distinct items per data shard when the catalog has
  more rows than a shard's positions (U from one batch drawn with `exposure`), the frozen
  cosines when the model takes them."""
  out = {}
  if catalog_exceeds_positions(schema.num_items, batch_size, shards, schema.seq_len):
    drawn = bench_utils.random_batch(schema, batch_size, np.random.default_rng(0), exposure)
    unique = batch_unique_rows(np.asarray(drawn["item_id"]), np.asarray(drawn["hist_item_id"]),
                               shards)
    out |= {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in unique.items()}
  if model.takes_record_similarities:
    out["hist_similarity"] = jax.ShapeDtypeStruct(
        (batch_size, schema.seq_len, len(schema.modalities)), np.float32)
  return out


def serving_programs(device, name: str, num_items: int, settings: Settings, config=None):
  """(encode_fn, score_fn, abstract params, abstract user, abstract ids) on one device."""
  schema = model_schema(num_items, settings.serve_seq_len)
  config = config or model_config(name, settings.compute_dtype, device.platform)
  abstract_model = nnx.eval_shape(
      lambda: registry.build_model(config, schema, rngs=nnx.Rngs(0), sharding=ShardingRules()))
  graphdef, params, rest = nnx.split(abstract_model, nnx.Param, ...)
  # As `Server` holds them: Params in the compute dtype, cast once.
  params = nnx.merge_state(
      jax.eval_shape(lambda p: precision.cast_params(p, config.compute_dtype), params), rest)
  on_device = jax.sharding.SingleDeviceSharding(device)
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device)
  params = jax.tree.map(place, params)
  layout = RequestLayout.from_schema(schema)
  user = jax.tree.map(lambda x: place(np.asarray(x)),
                      layout.user_features(layout.example_user() | {"hist_item_id": [0]}))
  encode_fn, score_fn = serving.make_serving_fns(graphdef)
  ids = place(np.zeros(settings.candidates, np.int32))
  return encode_fn, score_fn, params, user, ids


def cpu_devices() -> list:
  """The CPU devices (none where JAX_PLATFORMS leaves the CPU out)."""
  try:
    return jax.devices("cpu")
  except RuntimeError:
    return []


def compile_program(devices, name: str, num_items: int, phase: str, settings: Settings,
                    cache: dict, options=None):
  """(compiled, seconds, examples per device-program, mesh) of one phase on `devices`;
  `cache` keeps the serving programs of (devices, name, num_items) between phases."""
  if phase == "train":
    step, state, batch, partitioner = train_program(devices, name, num_items, settings)
    with jax.set_mesh(partitioner.mesh):
      compiled, seconds = compile_phase(step, state, batch, options=options)
    return (compiled, seconds, settings.batch(num_items) // partitioner.data_size,
            dict(partitioner.mesh.shape))
  key = (devices[0], name, num_items)
  if key not in cache:
    cache[key] = serving_programs(devices[0], name, num_items, settings)
  encode_fn, score_fn, params, user, ids = cache[key]
  if phase == "encode":
    compiled, seconds = compile_phase(encode_fn, params, user, options=options)
    return compiled, seconds, 1, {"devices": 1}
  user_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=ids.sharding),
                            jax.eval_shape(encode_fn, params, user))
  compiled, seconds = compile_phase(score_fn, params, user_state, ids, options=options)
  return compiled, seconds, settings.candidates, {"devices": 1}


def report(target: Target, names, sizes, phases, settings: Settings, log=print) -> list[dict]:
  """The rows of one target (a failed compile is a row with its error).

  XLA's GPU compiler gives no cost analysis: a GPU row's flops and bytes are those of the same
  program compiled for as many CPU devices (`cost_source`: 'cpu'; run with
  XLA_FLAGS=--xla_force_host_platform_device_count=N, as `main` does)."""
  rows = []
  try:
    devices = target.devices()
  except Exception as e:  # pylint: disable=broad-except  (no libtpu / plugin: say so)
    log(f"{target.name}: skipped: {e}")
    return [{"target": target.name, "compiled": False, "error": str(e)}]
  chip = CHIPS[target.chip]
  options = GPU_AOT_OPTIONS if target.platform == "gpu" else None  # no device to tune on
  cache, cpu_cache = {}, {}
  for num_items in sizes:
    for name in names:
      for phase in phases:
        row = {"target": target.name, "model": name, "num_items": num_items, "phase": phase,
               "compute_dtype": settings.compute_dtype, "compiled": False, "error": None, "compiler_options": options or {}}
        try:
          compiled, seconds, examples, row["mesh"] = compile_program(
              devices, name, num_items, phase, settings, cache, options)
          held = memory(compiled)
          row.update(compiled=True, compile_seconds=round(seconds, 2), bytes_per_device=held,
                     collectives=collectives(compiled),
                     hbm_fraction=held.get("total", 0) / chip.hbm_bytes)
          flops, bytes_accessed = costs(compiled)
          row["cost_source"] = target.platform
          if flops is None and len(cpu_devices()) >= len(devices):
            flops, bytes_accessed = costs(compile_program(
                cpu_devices()[:len(devices)], name, num_items, phase, settings, cpu_cache)[0])
            row["cost_source"] = "cpu"
          est_s, est_rate = estimate(chip, flops, bytes_accessed, examples)
          if phase == "train" and est_rate is not None:
            est_rate *= row["mesh"]["data"]  # every data-parallel device does its share
          row.update(flops=flops, bytes_accessed=bytes_accessed, estimated_seconds=est_s,
                     estimated_examples_per_s=est_rate)
        except Exception as e:  # pylint: disable=broad-except  (a failed compile is a result)
          row["error"] = " ".join(f"{type(e).__name__}: {e}".split())[:400]
        rows.append(row)
        log(_line(row))
  return rows


def _line(row: dict) -> str:
  head = f"{row['target']:<14} {row['model']:<16} {row['num_items']:>8} {row['phase']:<7}"
  if not row["compiled"]:
    return f"{head} FAILED {row['error']}"
  mem = row["bytes_per_device"]
  return (f"{head} compile {row['compile_seconds']:6.1f} s  per device: args "
          f"{mem.get('arguments', 0) / 2**20:.1f} MiB temp {mem.get('temp', 0) / 2**20:.1f} MiB "
          f"alias {mem.get('alias', 0) / 2**20:.1f} MiB  est "
          f"{(row['estimated_seconds'] or 0) * 1e3:.3f} ms "
          f"({(row['estimated_examples_per_s'] or 0):,.0f} ex/s)")


def markdown(rows: list[dict]) -> str:
  """One line per (target, model, catalog size): the train step's per-device memory, compile
  time and estimated examples/s, and serving's score compile time and candidates/s."""
  by_key: dict[tuple, dict] = {}
  for r in rows:
    if "phase" in r:
      by_key.setdefault((r["target"], r["model"], r["num_items"]), {})[r["phase"]] = r
  lines = ["| target | model | items | mesh | train: MiB per device | train: compile s | "
           "train: est. examples/s | score: compile s | score: est. candidates/s |",
           "|---|---|---:|---|---:|---:|---:|---:|---:|"]
  for (target, model, items), phases in by_key.items():
    train, score = phases.get("train", {}), phases.get("score", {})
    fmt = lambda r, k, f: (f.format(r[k]) if r.get("compiled") and r.get(k) is not None
                           else ("failed" if r else ""))
    mesh = "x".join(str(v) for v in (train.get("mesh") or {}).values())
    mib = (f"{train['bytes_per_device']['total'] / 2**20:,.0f}" if train.get("compiled")
           else ("failed" if train else ""))
    lines.append(f"| {target} | {model} | {items:,} | {mesh} | {mib} | "
                 f"{fmt(train, 'compile_seconds', '{:.1f}')} | "
                 f"{fmt(train, 'estimated_examples_per_s', '{:,.0f}')} | "
                 f"{fmt(score, 'compile_seconds', '{:.1f}')} | "
                 f"{fmt(score, 'estimated_examples_per_s', '{:,.0f}')} |")
  return "\n".join(lines)


def main(argv):
  del argv
  # Programs for absent devices cannot be loaded back from a persistent cache: skip it.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    targets = [Target.parse(t) for t in _TARGETS.value]
  except ValueError as e:
    cli.fail(str(e))
  names = sorted(registry.model_names()) if _MODELS.value == ["all"] else list(_MODELS.value)
  unknown = sorted(set(names) - set(registry.model_names()))
  if unknown:
    cli.fail(f"--models: unknown {unknown}; registered: {sorted(registry.model_names())}")
  try:
    sizes = [int(n) for n in _ITEMS.value]
  except ValueError:
    cli.fail(f"--num_items: expected integers, got {_ITEMS.value}")
  try:
    synthetic.zipf_exponent_of(_EXPOSURE.value)
  except ValueError as e:
    cli.fail(f"--exposure: {e}")
  bad = sorted(set(_PHASES.value) - {"train", "encode", "score"})
  if bad:
    cli.fail(f"--phases: unknown {bad}; valid: train, encode, score")
  cli.refuse_to_replace("output_json", _OUTPUT.value, _FORCE.value)
  rows = []
  for target in targets:
    rows += report(target, names, sizes, _PHASES.value, Settings.from_flags(),
                   log=lambda m: print(m, flush=True))
    if _OUTPUT.value:
      with open(_OUTPUT.value, "w") as f:
        json.dump(rows, f, indent=1)
  failed = [r for r in rows if not r["compiled"]]
  print(markdown(rows))
  print(f"{len(rows) - len(failed)} of {len(rows)} compiled", file=sys.stderr)


if __name__ == "__main__":
  cli.run(main)
