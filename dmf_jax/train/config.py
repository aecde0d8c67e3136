"""Experiment configuration: the ConfigDict layout, its defaults, and validation.

`default_config()` is the base every file in experiments/configs/ starts from. `validate`
checks a whole config before anything runs and raises one `ConfigError` listing every problem
(unknown model, bad dimensions, batch not divisible by the data axis, missing data, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import ml_collections
from etils import epath

from dmf_jax import data
from dmf_jax.core.errors import ConfigError
from dmf_jax.models import registry
from dmf_jax.models.base import ModelConfig
from dmf_jax.train.optimizers import OptimizerConfig
from dmf_jax.train.partitioner import MeshConfig




def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "dmf"
  # Every family's fields, flat (one command line for any model); each model reads its own.
  c.model_config = ml_collections.ConfigDict(registry.default_values())
  c.dataset = "generated_ctr"
  c.dataset_config = "default"
  c.data_dir = os.environ.get("DMF_DATA_DIR", "/tmp/dmf_data")
  c.manual_dir = ml_collections.config_dict.placeholder(str)
  c.optimizer = ml_collections.ConfigDict(dataclasses.asdict(OptimizerConfig()))
  c.optimizer.embedding_name = ml_collections.config_dict.placeholder(str)
  c.optimizer.embedding_learning_rate = ml_collections.config_dict.placeholder(float)
  c.optimizer.content_learning_rate = ml_collections.config_dict.placeholder(float)
  c.batch_size = 512
  c.eval_batch_size = 0  # examples per evaluation batch; 0: the largest that fits (eval_batch.py)
  c.num_epochs = 3
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 250
  c.keep_checkpoints = 2
  c.patience = 3  # evaluations without a better validation AUC before stopping; 0 = off
  c.log_every_steps = 50
  c.seed = 0
  c.mesh = ml_collections.ConfigDict(dataclasses.asdict(MeshConfig()))
  c.worker_count = 0  # input worker processes for a streamed training split
  # Training splits with at most this many records are parsed once into memory (a few hundred
  # bytes each) and served without worker processes, instead of read and parsed every batch;
  # 0: always stream from the files.
  c.in_memory_max_records = 1_000_000
  c.prefetch = 4
  # Frozen cosines of a catalog too large for the all-pairs matrix are computed per batch by
  # the input pipeline (`data.pipeline.RecordSimilarities`), so the steps read no vectors;
  # False: the steps read each behaviour's vectors. The same values up to float rounding.
  c.record_similarities = True
  c.progress = True
  # Start afresh in a workdir that holds a run: its files are moved to <workdir>.replaced-<time>
  # (never deleted). Without it, a workdir resumes, and refuses a run of another config.
  c.overwrite = False
  # Start from another run's best checkpoint (the daily-update flow: a newer build with more
  # users and items; see README "Scale"): its workdir, and whether to carry its optimizer state.
  c.init_from = ""
  c.init_from_optimizer = False
  return c


def _listed(error: Exception) -> list[str]:
  return list(getattr(error, "problems", None) or [str(error)])


@dataclasses.dataclass(frozen=True)
class Validated:
  model: ModelConfig
  optimizer: OptimizerConfig
  mesh: MeshConfig


def with_model_values(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config with its model's study values merged in; `variants` and `per_model` dropped.

  A study config may name variants of a model ({name: {'model': registered model, section:
  {field: value}}}, e.g. variants.em3_tower = {'model': 'em3', 'model_config':
  {'lora_rank': 0}}): `config.model` set to a variant's name runs that model with those values
  (a component study's rungs, each under its own name). It keeps each model's tuned values in
  `per_model` ({model: {section: {field: value}}}, e.g. per_model.din.optimizer.learning_rate),
  applied before a variant's own. A run sees only its own model's and variant's values, so its
  identity does not change when another's do. Unknown fields are errors."""
  config = copy.deepcopy(config)
  variants, per_model = config.get("variants"), config.get("per_model")
  variant = None
  if variants is not None and config.model not in variants and config.model not in registry.MODELS:
    raise ConfigError(f"model: unknown model {config.model!r}; valid models: "
                      f"{', '.join(registry.model_names())}; variants of this config: "
                      f"{', '.join(variants)}")
  if variants is not None and config.model in variants:
    variant = variants[config.model].to_dict()
    if not isinstance(variant.get("model"), str):
      raise ConfigError(f"variants.{config.model}: needs 'model', the registered model it varies")
  with config.unlocked():
    for key in ("variants", "per_model"):
      if key in config:
        del config[key]
    name = config.model
    if variant is not None:
      config.model = variant.pop("model")
    values = per_model.get(config.model) if per_model is not None else None
    if values is not None:
      _merge(config, values.to_dict(), f"per_model.{config.model}")
    if variant is not None:
      _merge(config, variant, f"variants.{name}")
  return config


def _merge(node: ml_collections.ConfigDict, values: dict, where: str) -> None:
  for key, value in values.items():
    if key not in node:
      raise ConfigError(f"{where}.{key}: not a config field")
    if isinstance(value, dict):
      _merge(node[key], value, f"{where}.{key}")
    else:
      node[key] = tuple(value) if isinstance(value, list) else value


def validate(config: ml_collections.ConfigDict, *, num_devices: int,
             num_processes: int = 1) -> Validated:
  """Checks everything that can be checked before running; one ConfigError lists all problems."""
  problems = []
  model = optimizer = mesh = None
  names = [config.model]
  if config.model not in registry.MODELS:
    problems.append(f"model: unknown model {config.model!r}; valid models: "
                    f"{', '.join(registry.model_names())}")
    names = registry.model_names()  # still check the fields, against every family
  for name in names:
    try:
      model = registry.model_config({**config.model_config.to_dict(), "name": name})
    except (ValueError, TypeError) as e:
      problems += [p for p in (f"model_config: {p.removeprefix('model config: ')}"
                               for p in _listed(e)) if p not in problems]
  if config.model not in registry.MODELS:
    model = None
  try:
    optimizer = OptimizerConfig.from_mapping(config.optimizer.to_dict())
  except (ValueError, TypeError) as e:
    problems += [f"optimizer: {p}" for p in _listed(e)]
  try:
    mesh = MeshConfig(**config.mesh.to_dict())
    data_size, _ = mesh.shape(num_devices)
  except (ValueError, TypeError) as e:
    problems.append(f"mesh: {e}")
    data_size = None
  for field in ("batch_size", "eval_batch_size", "eval_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "log_every_steps"):
    least = 0 if field == "eval_batch_size" else 1  # eval_batch_size 0: sized per run
    if not isinstance(config[field], int) or isinstance(config[field], bool) or \
        config[field] < least:
      problems.append(f"{field}: must be a {'non-negative' if least == 0 else 'positive'} "
                      f"integer, got {config[field]!r}")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    problems.append("num_epochs or num_train_steps must be positive")
  if config.patience < 0 or config.worker_count < 0 or config.in_memory_max_records < 0:
    problems.append("patience, worker_count and in_memory_max_records must be >= 0")
  for field in ("batch_size", "eval_batch_size"):
    value = config[field]
    if isinstance(value, int) and value > 0:
      if data_size and value % data_size:
        problems.append(f"{field}={value} is not divisible by the mesh's data axis ({data_size})")
      if value % num_processes:
        problems.append(f"{field}={value} is not divisible by the {num_processes} processes")
  for field in ("overwrite", "init_from_optimizer"):
    if not isinstance(config.get(field, False), bool):
      problems.append(f"{field}: must be True or False, got {config[field]!r}")
  init_from = config.get("init_from", "")
  if init_from and not (epath.Path(init_from).expanduser() / "config.json").exists():
    problems.append(f"init_from: {init_from} is not a training workdir (no config.json)")
  problem = data.config_problem(config.dataset, config.dataset_config)
  if problem:
    problems.append(problem)
  if not config.data_dir:
    problems.append("data_dir: required (where datasets are built and read)")
  elif config.dataset in data.BUILDERS and data.needs_manual_dir(config.dataset):
    built = epath.Path(config.data_dir).expanduser() / config.dataset
    if not config.manual_dir and not built.exists():
      problems.append(f"manual_dir: {config.dataset} is not built under {config.data_dir} and "
                      f"no manual_dir (raw data folder) is given")
    elif config.manual_dir and not epath.Path(config.manual_dir).expanduser().exists():
      problems.append(f"manual_dir: {config.manual_dir} does not exist")
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
  return Validated(model, optimizer, mesh)
