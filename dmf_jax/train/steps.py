"""Pure train and eval steps over a split NNX model (`train.partitioner` jits them on a mesh).

The model is split once into a static graphdef, its trainable `nnx.Param`s and the remaining
state (batch statistics, frozen catalog). Steps are plain `jax.jit` functions that merge them
inside, so the whole state is an explicit pytree that can be donated, sharded and checkpointed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dmf_jax.nn import precision
from dmf_jax.nn.embedding import EmbeddingTable, RowProbes, row_probes
from dmf_jax.train import sparse


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  """The whole training state, one pytree.

  step: int32 scalar; rng: uint32 key data (per-step keys are fold_in(rng, step));
  params: trainable Params; opt_state: optax state; rest: the other variables (batch
  statistics, the frozen catalog).
  """

  step: jax.Array
  rng: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rest: nnx.State

  @property
  def eval_params(self) -> nnx.State:
    """The parameters a model is evaluated, selected and served with."""
    return self.params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AveragedTrainState(TrainState):
  """A `TrainState` that also keeps the parameters' moving average (`optimizer.ema_decay` d):
  after each step t = 1, 2, ... the bias-corrected average of the params so far,
      ema_t = sum_{s<=t} (1 - d) d^(t-s) params_s / (1 - d^t),
  kept as ema_t = ema_{t-1} + (params_t - ema_{t-1}) (1 - d) / (1 - d^t) (ema_0 = the initial
  params, which step 1 replaces whole). Evaluation, the best checkpoint's choice and serving
  use it (`eval_params`); training does not read it. (A class of its own, so that a state
  without an average is the same pytree, and reads the same checkpoints, as before.)
  """

  ema: nnx.State
  ema_decay: float = dataclasses.field(default=0.0, metadata={"static": True})

  @property
  def eval_params(self) -> nnx.State:
    return self.ema


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, rest) with params the nnx.Param variables."""
  return nnx.split(model, nnx.Param, ...)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, seed: int = 0, ema_decay: float = 0.0
) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, the state at step 0); ema_decay > 0 adds the parameters' moving average."""
  graphdef, params, rest = split_model(model)
  rng = jax.random.key_data(jax.random.key(seed))
  state = TrainState(jnp.zeros((), jnp.int32), rng, params, tx.init(params), rest)
  if ema_decay:
    state = AveragedTrainState(state.step, state.rng, params, state.opt_state, rest,
                               ema=jax.tree.map(jnp.copy, params), ema_decay=float(ema_decay))
  return graphdef, state


def moving_average(ema: nnx.State, params: nnx.State, step: jax.Array, decay: float
                   ) -> nnx.State:
  """The bias-corrected average after step `step` (>= 1) has produced `params`:
  ema + (params - ema) (1 - d) / (1 - d^step) (`AveragedTrainState`)."""
  weight = (1 - decay) / (1 - jnp.power(jnp.float32(decay), step.astype(jnp.float32)))
  return jax.tree.map(lambda e, p: e + (p - e) * weight.astype(e.dtype), ema, params)


param_path_names = sparse.path_names  # a pytree key path -> the attribute names


def freeze_updates(model: nnx.Module, phase: str, updates: nnx.State) -> nnx.State:
  """Zeroes the updates of parameters that `model.is_trainable(phase, path)` excludes."""
  def keep(keypath, update):
    trainable = model.is_trainable(phase, param_path_names(keypath))
    return update if trainable else jnp.zeros_like(update)

  return jax.tree_util.tree_map_with_path(keep, updates)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, phase: str = "main",
    jit: bool = True,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
  """step(state, batch) -> (new state, {'loss', model extras}) for a training `phase`.

  The loss is the model's `training_loss(batch, phase=...)`; parameters the model marks as
  not trainable in that phase keep their values (their updates are zeroed, weight decay
  included). Dropout keys are fold_in(state.rng, step).
  """

  row_sparse = tx if isinstance(tx, sparse.RowSparse) else None

  def step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    # Row-sparse tables are inputs, not differentiated: their rows' gradients come from probes.
    params, tables = (row_sparse.split(state.params) if row_sparse is not None
                      else (state.params, nnx.State({})))
    table_names = {"/".join(sparse.path_names(kp)) for kp, _ in
                   jax.tree_util.tree_flatten_with_path(tables)[0]}
    traced = []  # the RowProbes of each trace of `loss_fn` (the lookups, recorded when traced)
    # The model outside the differentiated function: its dtype, what each phase trains.
    outside = nnx.merge(graphdef, state.params, state.rest)
    compute_dtype = outside.config.compute_dtype

    def loss_fn(params, probes):
      model = nnx.merge(graphdef, precision.cast_params(params, compute_dtype),
                        precision.cast_params(tables, compute_dtype), state.rest)
      names = {id(m): name for path, m in nnx.iter_modules(model)
               if isinstance(m, EmbeddingTable)
               and (name := "/".join(map(str, path)) + "/embedding") in table_names}
      recorder = RowProbes(names, probes)
      traced.append(recorder)
      # Created inside the differentiated function: nnx.Rngs counters are trace-local.
      rngs = nnx.Rngs(dropout=key, sample=jax.random.fold_in(key, 1))
      with row_probes(recorder):
        loss, extras = model.training_loss(batch, phase=phase, rngs=rngs)
      rows = [r for _, r in recorder.calls]
      return loss, (extras, nnx.state(model, nnx.Not(nnx.Param)), rows)

    probes = []
    if table_names:  # a shape-only trace finds the lookups of the row-sparse tables
      jax.eval_shape(loss_fn, params, None)
      widths = {"/".join(sparse.path_names(kp)): x.shape[-1]
                for kp, x in jax.tree_util.tree_flatten_with_path(tables)[0]}
      probes = [jnp.zeros(rows.shape + (widths[name],), jnp.float32)
                for name, rows in traced[-1].calls]
    (loss, (extras, rest, rows)), (grads, probe_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(params, probes)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    updates = freeze_updates(outside, phase, updates)
    params = optax.apply_updates(params, updates)
    if table_names:
      lookups = {}
      for (name, _), r, g in zip(traced[-1].calls, rows, probe_grads):
        ids, grad = lookups.setdefault(name, ([], []))
        ids.append(r.reshape(-1))
        grad.append(g.reshape(-1, g.shape[-1]))
      lookups = {k: (jnp.concatenate(i), jnp.concatenate(g)) for k, (i, g) in lookups.items()}
      tables, opt_state = row_sparse.apply_rows(
          tables, opt_state, lookups, lambda path: outside.is_trainable(phase, path))
      params = sparse.join(params, tables)
    new_state = dataclasses.replace(state, step=state.step + 1, params=params,
                                    opt_state=opt_state, rest=rest)
    if isinstance(state, AveragedTrainState):
      new_state = dataclasses.replace(
          new_state, ema=moving_average(state.ema, params, new_state.step, state.ema_decay))
    return new_state, {"loss": loss, **extras}

  return jax.jit(step, donate_argnums=0) if jit else step


def make_predict_step(graphdef: nnx.GraphDef, *, jit: bool = True):
  """predict(state, batch) -> logits [B] in inference mode, with `state.eval_params`."""

  def predict(state: TrainState, batch):
    model = nnx.merge(graphdef, state.eval_params, state.rest)
    return precision.to_compute_dtype(model, model.config.compute_dtype)(batch, train=False)

  return jax.jit(predict) if jit else predict
