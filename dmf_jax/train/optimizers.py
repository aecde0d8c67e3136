"""Optax optimizers from a config: Adam by default, schedules, clipping, embedding-table groups.

Config fields (all in `OptimizerConfig`): name, learning_rate, schedule ('constant', 'cosine',
'warmup_cosine'), warmup_steps, weight_decay (AdamW when > 0), grad_clip_norm (0 = off), an
optional separate optimizer for embedding tables (embedding_name, embedding_learning_rate),
applied through `optax.multi_transform` to every `EmbeddingTable`'s rows, an optional learning
rate of its own for the item-content tower (content_learning_rate: the Params under the
model's `content` attribute, e.g. EM3's Q-Former and its contrastive heads), and row-sparse
updates of the tables of at least `sparse_min_rows` rows (`dmf_jax.train.sparse`; 0 = off),
and ema_decay: the train state's moving average of the parameters, which evaluation, the
choice of the best checkpoint and serving use instead of the parameters (0 = off).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import optax
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.train import sparse

OPTIMIZERS = ("adam", "adamw", "sgd", "adagrad")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adam"
  learning_rate: float = 1e-3
  schedule: str = "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  grad_clip_norm: float = 0.0
  embedding_name: str | None = None
  embedding_learning_rate: float | None = None
  # The content tower's Params (`CTRModel.content`) at this rate, same optimizer; None: the
  # dense rate (and no group of its own, so the optimizer state is as before).
  content_learning_rate: float | None = None
  # Tables of at least this many rows get lazy row-sparse updates with the embedding optimizer
  # (dmf_jax.train.sparse): O(rows looked up) per step instead of O(rows). 0: off.
  sparse_min_rows: int = 0
  # Evaluate, select and serve the exponential moving average of the parameters (Polyak
  # averaging, bias-corrected: `train.steps.AveragedTrainState`) with this decay; 0: off (the
  # parameters as trained). Training itself is unchanged.
  ema_decay: float = 0.0

  def __post_init__(self):
    problems = []  # every problem is reported at once
    if self.name not in OPTIMIZERS:
      problems.append(f"optimizer.name {self.name!r} is not one of {OPTIMIZERS}")
    if self.embedding_name is not None and self.embedding_name not in OPTIMIZERS:
      problems.append(f"optimizer.embedding_name {self.embedding_name!r} is not one of {OPTIMIZERS}")
    if self.schedule not in SCHEDULES:
      problems.append(f"optimizer.schedule {self.schedule!r} is not one of {SCHEDULES}")
    if not self.learning_rate > 0:
      problems.append(f"optimizer.learning_rate must be > 0, got {self.learning_rate}")
    if self.embedding_learning_rate is not None and not self.embedding_learning_rate > 0:
      problems.append("optimizer.embedding_learning_rate must be > 0")
    if self.content_learning_rate is not None and not self.content_learning_rate > 0:
      problems.append(f"optimizer.content_learning_rate must be > 0, got "
                      f"{self.content_learning_rate}")
    if isinstance(self.sparse_min_rows, bool) or not isinstance(self.sparse_min_rows, int) or (
        self.sparse_min_rows < 0):
      problems.append(f"optimizer.sparse_min_rows must be an integer >= 0, got "
                      f"{self.sparse_min_rows!r}")
    if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) or (
        not 0 <= self.ema_decay < 1):
      problems.append(f"optimizer.ema_decay must be in [0, 1), got {self.ema_decay!r}")
    elif self.ema_decay and self.sparse_min_rows:
      problems.append("optimizer.ema_decay cannot be used with sparse_min_rows: the average "
                      "would rewrite every row of the row-sparse tables each step")
    if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip_norm < 0:
      problems.append("optimizer.warmup_steps, weight_decay and grad_clip_norm must be >= 0")
    if problems:
      raise checks.Problems(problems)

  @classmethod
  def from_mapping(cls, values: Mapping) -> "OptimizerConfig":
    return checks.dataclass_from_mapping(cls, values, "optimizer config")


def schedule(config: OptimizerConfig, learning_rate: float, total_steps: int) -> optax.Schedule:
  if config.schedule == "constant":
    return optax.constant_schedule(learning_rate)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(learning_rate, max(1, total_steps))
  return optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, config.warmup_steps), max(config.warmup_steps + 1, total_steps)
  )


def _base(name: str, lr: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
  if name == "adam" and weight_decay == 0:
    return optax.adam(lr)
  if name in ("adam", "adamw"):
    return optax.adamw(lr, weight_decay=weight_decay)
  if name == "sgd":
    return optax.sgd(lr, momentum=0.9)
  return optax.adagrad(lr)


def is_embedding_table(path: tuple) -> bool:
  """An EmbeddingTable's rows are the Param named 'embedding'."""
  return bool(path) and path[-1] == "embedding"


CONTENT_TOWER = "content"  # the attribute of `CTRModel` that holds its item-content tower


def in_content_tower(path: tuple) -> bool:
  """A Param of the model's item-content tower (its path starts at `CTRModel.content`)."""
  return tuple(path[:1]) == (CONTENT_TOWER,)


def param_labels(params: nnx.State, content: bool = False) -> nnx.State:
  """'embedding', 'dense' or, with `content`, 'content' (a Param under the content tower that
  is not an embedding table) for every Param: the groups of `multi_transform`."""

  def label(path, _):
    names = sparse.path_names(path)
    if is_embedding_table(names):
      return "embedding"
    return "content" if content and in_content_tower(names) else "dense"

  return jax.tree_util.tree_map_with_path(
      label, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  """The optax transformation of `config`; with sparse_min_rows > 0 a `sparse.RowSparse` (the
  transformation for the other parameters, and lazy updates of the large tables)."""
  dense = _base(config.name, schedule(config, config.learning_rate, total_steps),
                config.weight_decay)
  emb_lr = schedule(config, config.embedding_learning_rate or config.learning_rate, total_steps)
  emb_name = config.embedding_name or config.name
  groups = {"dense": dense}
  if config.embedding_name is not None or config.embedding_learning_rate is not None:
    groups["embedding"] = _base(emb_name, emb_lr, 0.0)
  if config.content_learning_rate is not None:
    groups["content"] = _base(config.name, schedule(config, config.content_learning_rate,
                                                    total_steps), config.weight_decay)
  if len(groups) > 1:
    groups.setdefault("embedding", dense)
    tx = optax.multi_transform(
        groups, functools.partial(param_labels, content="content" in groups))
  else:
    tx = dense
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.sparse_min_rows:
    tx = sparse.RowSparse(tx, config.sparse_min_rows, emb_name, emb_lr)
  return tx
