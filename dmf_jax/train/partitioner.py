"""The mesh owner: builds the ('data', 'model') mesh and hands out jitted, sharded steps.

Batches are split on 'data'; embedding tables are row-sharded on 'model' when that axis has more
than one device (otherwise replicated), and the optimizer state follows the parameters. The
train state is created already sharded: `jax.eval_shape` gives its structure, the variables'
sharding metadata gives the shardings, and a jitted init materializes it in place. Steps are
plain `jax.jit` functions with explicit in/out shardings; the train step donates its state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from dmf_jax.train import steps as training
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.core.schema import FeatureSchema
from dmf_jax.core.sharding import ShardingRules

AXES = ("data", "model")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; data=-1 takes all devices not used by 'model'."""

  data: int = -1
  model: int = 1

  def shape(self, num_devices: int) -> tuple[int, int]:
    if self.model < 1 or num_devices % self.model:
      raise ValueError(f"mesh.model={self.model} does not divide the {num_devices} devices")
    data = num_devices // self.model if self.data == -1 else self.data
    if data < 1 or data * self.model != num_devices:
      raise ValueError(f"mesh data={self.data} x model={self.model} does not match the "
                       f"{num_devices} devices")
    return data, self.model


class Partitioner:
  """Owns the mesh; returns jitted init / train / eval functions with explicit shardings."""

  def __init__(self, mesh_config: MeshConfig = MeshConfig(), devices=None):
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_config.shape(len(devices))
    self.mesh = jax.make_mesh(shape, AXES, devices=devices)
    self.rules = ShardingRules(
        batch_axis="data", table_axis="model" if shape[1] > 1 else None, table_shards=shape[1]
    )
    self._replicated = NamedSharding(self.mesh, P())

  @property
  def data_size(self) -> int:
    return self.mesh.shape["data"]

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return NamedSharding(self.mesh, P("data", *([None] * (ndim - 1))))

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays split over 'data' (multi-host aware)."""
    return {
        k: jax.make_array_from_process_local_data(self.batch_sharding(np.ndim(v)), np.asarray(v))
        for k, v in local_batch.items()
    }

  def gather(self, x: jax.Array) -> np.ndarray:
    """A global array as one numpy array on every process."""
    if jax.process_count() == 1:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  def state_shardings(self, abstract_state):
    specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), specs,
                        is_leaf=lambda x: isinstance(x, P))

  def _creator(self, model_factory, tx, seed: int, ema_decay: float):
    """() -> (graphdef, TrainState) of a new model on this mesh's sharding rules."""
    def create():
      model = model_factory(self.rules, nnx.Rngs(seed))
      return training.create_train_state(model, tx, seed, ema_decay)
    return create

  def init(
      self,
      model_factory: Callable[[ShardingRules, nnx.Rngs], nnx.Module],
      tx: optax.GradientTransformation,
      *,
      seed: int,
      schema: FeatureSchema,
      catalog: ItemCatalog,
      ema_decay: float = 0.0,
  ) -> tuple[nnx.GraphDef, training.TrainState, object]:
    """(graphdef, sharded TrainState, its shardings), catalog loaded (ema_decay > 0: with the
    parameters' moving average, `training.AveragedTrainState`).

    `model_factory(rules, rngs)` builds the model with a placeholder catalog; the real catalog
    is validated and put on the devices afterwards, so it is never baked into the program.
    """
    create = self._creator(model_factory, tx, seed, ema_decay)
    with jax.set_mesh(self.mesh):
      graphdef, abstract_state = nnx.eval_shape(create)
      shardings = self.state_shardings(abstract_state)
      state = jax.jit(lambda: create()[1], out_shardings=shardings)()
      model = nnx.merge(graphdef, state.params, state.rest)
      model.catalog.load(schema, catalog)
      _, _, rest = training.split_model(model)
      state = dataclasses.replace(state, rest=jax.device_put(rest, shardings.rest))
    return graphdef, state, shardings

  def abstract_init(
      self,
      model_factory: Callable[[ShardingRules, nnx.Rngs], nnx.Module],
      tx: optax.GradientTransformation,
      *,
      seed: int = 0,
      ema_decay: float = 0.0,
  ) -> tuple[nnx.GraphDef, training.TrainState, object]:
    """(graphdef, abstract TrainState, its shardings): `init` without creating anything, the
    leaves `jax.ShapeDtypeStruct`s carrying their shardings (the catalog's too, at the size
    the model's schema gives it). For compiling ahead of time for devices that are not
    present (`jax.jit(...).trace(abstract_state, ...).lower().compile()`)."""
    with jax.set_mesh(self.mesh):
      graphdef, abstract = nnx.eval_shape(self._creator(model_factory, tx, seed, ema_decay))
      shardings = self.state_shardings(abstract)
    return graphdef, self.abstract_state(shardings, abstract), shardings

  def abstract_batch(self, batch_like: Mapping[str, object]) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a global batch (arrays or structs), split over 'data'."""
    return {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=self.batch_sharding(np.ndim(v)))
            for k, v in batch_like.items()}

  def abstract_state(self, shardings, state_like):
    """ShapeDtypeStructs with shardings, for restoring a checkpoint into this mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_like, shardings
    )

  def jit_train_step(self, graphdef, tx, shardings, phase: str = "main"):
    """The `jax.jit` of the train step (call or trace it under `jax.set_mesh(self.mesh)`)."""
    step = training.make_train_step(graphdef, tx, phase=phase, jit=False)
    return jax.jit(step, in_shardings=(shardings, None),
                   out_shardings=(shardings, self._replicated), donate_argnums=0)

  def train_step(self, graphdef, tx, shardings, phase: str = "main") -> Callable:
    """step(state, batch) -> (state, {'loss', ...}) for a training phase, state donated."""
    jitted = self.jit_train_step(graphdef, tx, shardings, phase)

    def run(state, batch):
      with jax.set_mesh(self.mesh):
        return jitted(state, batch)

    return run

  def predict_step(self, graphdef, shardings) -> Callable:
    """predict(state, batch) -> logits [B] split over 'data'; `predict.compile(state, batch)`
    compiles it ahead of time (abstract arguments accepted), as the calls would, and keeps
    the program: a later call with a batch of the same shapes, dtypes and shardings runs it
    (the evaluation batch's sizing compiles the size it picks, `train.eval_batch`)."""
    predict = training.make_predict_step(graphdef, jit=False)
    jitted = jax.jit(predict, in_shardings=(shardings, None),
                     out_shardings=self.batch_sharding(1))
    compiled = {}
    signature = lambda batch: tuple(sorted(
        (k, tuple(v.shape), str(v.dtype), str(getattr(v, "sharding", None)))
        for k, v in batch.items()))

    def run(state, batch):
      with jax.set_mesh(self.mesh):
        program = compiled.get(signature(batch))
        return (jitted if program is None else program)(state, batch)

    def compile_for(state, batch):
      with jax.set_mesh(self.mesh):
        program = jitted.lower(state, batch).compile()
      compiled[signature(batch)] = program
      return program

    run.compile = compile_for
    return run
