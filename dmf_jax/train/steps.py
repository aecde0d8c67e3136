"""Pure train and eval steps over a split NNX model (single device; issue 4 adds the mesh).

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


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, rest) with params the nnx.Param variables."""
  return nnx.split(model, nnx.Param, ...)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, seed: int = 0
) -> tuple[nnx.GraphDef, TrainState]:
  graphdef, params, rest = split_model(model)
  rng = jax.random.key_data(jax.random.key(seed))
  state = TrainState(jnp.zeros((), jnp.int32), rng, params, tx.init(params), rest)
  return graphdef, state


def param_path_names(keypath) -> tuple[str, ...]:
  """A pytree key path into an nnx.State -> the attribute names from the model root."""
  names = []
  for key in keypath:
    name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
    if name is not None and name != "value":
      names.append(str(name))
  return tuple(names)


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

  def step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.rest)
      # Created inside the differentiated function: nnx.Rngs counters are trace-local.
      rngs = nnx.Rngs(dropout=key, sample=jax.random.fold_in(key, 1))
      loss, extras = model.training_loss(batch, phase=phase, rngs=rngs)
      return loss, (extras, nnx.state(model, nnx.Not(nnx.Param)))

    (loss, (extras, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = freeze_updates(nnx.merge(graphdef, state.params, state.rest), phase, updates)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(state.step + 1, state.rng, params, opt_state, rest)
    return new_state, {"loss": loss, **extras}

  return jax.jit(step, donate_argnums=0) if jit else step


def make_predict_step(graphdef: nnx.GraphDef, *, jit: bool = True):
  """predict(state, batch) -> logits [B] in inference mode."""

  def predict(state: TrainState, batch):
    model = nnx.merge(graphdef, state.params, state.rest)
    return model(batch, train=False)

  return jax.jit(predict) if jit else predict
