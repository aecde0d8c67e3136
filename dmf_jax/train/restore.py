"""Reading a finished (or running) run back: its config, its dataset build, its checkpoint
restored on one device as a model. What serving, evaluation and warm starts need from a
workdir, without the training loop or the input pipeline (`serve` imports this, never
`train.loop`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

import jax
import ml_collections
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from dmf_jax import data
from dmf_jax.core.errors import WorkdirError
from dmf_jax.core.sharding import ShardingRules
from dmf_jax.data import format as data_format
from dmf_jax.models.registry import build_model
from dmf_jax.train import config as config_lib
from dmf_jax.train import optimizers, runs
from dmf_jax.train import steps as training
from dmf_jax.train.checkpointing import CheckpointManager, catalog_of


def log_to_stderr(message: str) -> None:
  """The training job's progress and notices: one line on stderr."""
  print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Datasets and configs
# ---------------------------------------------------------------------------------------------


def open_dataset(config) -> data_format.BuiltDataset:
  """Builds the dataset on process 0 if needed, then opens it on every process."""
  data_dir = str(epath.Path(config.data_dir).expanduser())
  manual = str(epath.Path(config.manual_dir).expanduser()) if config.manual_dir else None
  built = None
  if jax.process_index() == 0:  # builds (once) and opens
    built = data.prepare(config.dataset, config.dataset_config, data_dir, manual)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("dataset built")
  return built or data.prepare(config.dataset, config.dataset_config, data_dir, manual)


def select_modalities(dataset: data_format.BuiltDataset, names) -> data_format.BuiltDataset:
  """The dataset as a model restricted to the modalities `names` sees it (all when empty)."""
  if not names:
    return dataset
  try:
    schema = dataset.schema.with_modalities(names)
  except ValueError as e:
    raise config_lib.ConfigError(f"invalid config:\n  - model_config.modalities: {e}") from None
  return dataclasses.replace(dataset, schema=schema, catalog=dataset.catalog.with_modalities(
      schema.modality_names))


def open_run_dataset(workdir: epath.Path, config) -> data_format.BuiltDataset:
  """The dataset build the run in `workdir` trained on (recorded in its run.json), opened as
  it is: `DataError` when it is gone or changed since. A run of an older version, which did
  not record its build, opens its config's dataset."""
  recorded = runs.recorded_build(workdir)
  if recorded is None:
    return open_dataset(config)
  return data.open_recorded(*recorded, config.data_dir, owner=f"the run in {workdir}")


def read_run_config(workdir: epath.Path) -> ml_collections.ConfigDict:
  """The config a workdir's run was trained with (its config.json)."""
  path = epath.Path(workdir).expanduser() / "config.json"
  if not path.exists():
    raise WorkdirError(f"{path} is missing: {workdir} is not a training workdir")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as e:
    raise WorkdirError(f"{path} is unreadable ({e})") from None


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def verify_checkpoint(workdir, step: int, log=log_to_stderr) -> None:
  """Checks one step of a workdir's checkpoints against its content manifest; raises
  `CorruptCheckpointError` (see `CheckpointManager.verify`). A step not kept is not checked."""
  ckpt = CheckpointManager(epath.Path(workdir).expanduser() / "checkpoints", every_steps=1,
                           log=log)
  try:
    if step in ckpt.steps:
      ckpt.verify(step)
  finally:
    ckpt.close()


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """A run's checkpoint restored on one device (see `restore_run`)."""

  config: ml_collections.ConfigDict
  dataset: data_format.BuiltDataset
  graphdef: object
  state: training.TrainState
  step: int

  def model(self):
    return nnx.merge(self.graphdef, self.state.eval_params, self.state.rest)


def restore_run(workdir, step: int | None = None) -> RestoredRun:
  """The best (or a given) checkpoint of a workdir's run as one single-device train state,
  whatever mesh it was trained on (the tables keep the row padding of its `mesh.model`),
  with the catalog of its dataset (which must be available, and unchanged)."""
  workdir = epath.Path(workdir).expanduser()
  config = read_run_config(workdir)
  local = copy.deepcopy(config)
  with local.unlocked():
    local.mesh.data, local.mesh.model = -1, 1  # validated for one device
  validated = config_lib.validate(local, num_devices=1)
  dataset = select_modalities(open_run_dataset(workdir, config), validated.model.modalities)
  rules = ShardingRules(table_shards=int(config.mesh.model))
  model = build_model(validated.model, dataset.schema, rngs=nnx.Rngs(config.seed), sharding=rules)
  model.catalog.load(dataset.schema, dataset.catalog)
  tx = optimizers.make_optimizer(validated.optimizer, 1)  # for the state's structure only
  graphdef, like = training.create_train_state(model, tx, config.seed,
                                                validated.optimizer.ema_decay)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
  ckpt = CheckpointManager(workdir / "checkpoints", every_steps=config.checkpoint_every_steps,
                           keep=config.keep_checkpoints,
                           catalog_fingerprint=dataset.catalog.fingerprint())
  step = ckpt.best_or_latest(step)
  state = ckpt.restore(step, abstract, catalog=catalog_of(like)).state
  ckpt.close()
  return RestoredRun(config, dataset, graphdef, state, step)


def load_model(workdir: str, step: int | None = None):
  """(model, schema, step): the best (or a given) checkpoint of a workdir's run as one
  single-device model in inference mode (`restore_run`)."""
  run = restore_run(workdir, step)
  return run.model(), run.dataset.schema, run.step
