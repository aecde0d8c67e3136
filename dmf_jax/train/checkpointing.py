"""Orbax (v1) checkpoints of the train state and the Grain iterator, saved together.

Each checkpoint step holds three checkpointables: 'state' (the TrainState: params, optimizer
state, step, rng, other variables), 'dataset' (the Grain iterator's position) and, as custom
metadata, the loop's bookkeeping (evaluation history for early stopping). Orbax writes each step
into a temporary directory and renames it when complete, so a crash mid-save leaves no
half-written step. The latest `keep` steps are kept, plus the best one by validation AUC.

`restore_latest` walks back from the newest step. A step whose files cannot be read (truncated
or garbled arrays, an empty or unreadable bookkeeping record) is corrupt: it is moved to
`<directory>/corrupt/<step>-<time>` with one warning line, and the previous step is tried. A
step that reads fine but holds a differently shaped state (another model or config) is not
corrupt: `CheckpointMismatchError` names the first differing arrays and nothing is moved.

The frozen item catalog (the model's `catalog` variables: side fields, vectors) is data, not
training state: checkpoints leave it out and record its fingerprint (`ItemCatalog.fingerprint`)
instead. `restore` puts the caller's catalog (loaded from the dataset) back into the state,
and refuses a checkpoint whose fingerprint differs (`CatalogMismatchError`). Checkpoints
written before this (with the catalog inside) still restore; their catalog is replaced by the
caller's.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import time
import warnings
from collections.abc import Callable

import jax
from absl import logging
from etils import epath
from flax import nnx
from orbax.checkpoint import v1 as ocp

from dmf_jax.core.errors import UserError, WorkdirError

BEST_METRIC = "val_auc"
CORRUPT_DIR = "corrupt"


METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's per-step record (holds the bookkeeping)


def _record_is_readable(step_dir: epath.Path) -> bool:
  try:
    return isinstance(json.loads((step_dir / METADATA_FILE).read_text()), dict)
  except (OSError, ValueError):
    return False


class CheckpointMismatchError(UserError):
  """A readable checkpoint whose state does not have the structure of the current model."""


class CatalogMismatchError(UserError):
  """A checkpoint trained with another item catalog than the one given to restore it."""


CATALOG_KEY = "catalog"  # the model attribute holding the frozen catalog (`CatalogTables`)
FINGERPRINT_KEY = "catalog_fingerprint"  # in each step's custom metadata


def without_catalog(state):
  """The TrainState with the frozen catalog left out of `rest`."""
  rest = {k: v for k, v in state.rest.raw_mapping.items() if k != CATALOG_KEY}
  return dataclasses.replace(state, rest=nnx.State(rest))


def with_catalog(state, catalog):
  """The TrainState with `catalog` (the model's catalog variables) put into `rest`."""
  rest = {k: v for k, v in state.rest.raw_mapping.items() if k != CATALOG_KEY}
  return dataclasses.replace(state, rest=nnx.State({**rest, CATALOG_KEY: catalog}))


def catalog_of(state):
  """The catalog variables of a TrainState (a nested mapping, to pass to `restore`)."""
  return state.rest.raw_mapping[CATALOG_KEY]


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _shapes(tree) -> dict[str, tuple]:
  """{'params/item/embedding/value': (shape, dtype name)} of a pytree of arrays or metadata."""
  return {"/".join(_key_name(k) for k in path): (tuple(x.shape), str(x.dtype))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def structure_differences(saved, expected, limit: int = 5) -> list[str]:
  """Lines naming the arrays that differ between two trees of shapes (at most `limit`)."""
  a, b = _shapes(saved), _shapes(expected)
  order = lambda k: (not k.startswith("params/"), k)  # parameters first, then optimizer state
  lines = [f"{k}: {a[k][0]} {a[k][1]} saved, {b[k][0]} {b[k][1]} expected"
           for k in sorted(set(a) & set(b), key=order) if a[k] != b[k]]
  lines += [f"{k}: saved, not in the current model" for k in sorted(set(a) - set(b), key=order)]
  lines += [f"{k}: in the current model, not saved" for k in sorted(set(b) - set(a), key=order)]
  return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: object
  bookkeeping: object  # the saved dict, or what restore_latest's parse_bookkeeping made of it


class CheckpointManager:
  """Saves every `every_steps` steps (and when forced); keeps the latest `keep` and the best."""

  def __init__(self, directory: epath.PathLike, *, every_steps: int, keep: int = 2,
               repair: bool = False, log: Callable[[str], None] = print,
               catalog_fingerprint: str | None = None):
    """repair: move steps whose checkpoint record is unreadable aside before Orbax scans them
    (training does; evaluation and export only read). catalog_fingerprint: the catalog the
    states belong to (recorded when saving, checked when restoring; None: not checked)."""
    self.catalog_fingerprint = catalog_fingerprint
    if every_steps < 1 or keep < 1:
      raise ValueError(f"checkpoint every_steps ({every_steps}) and keep ({keep}) must be >= 1")
    self.directory = epath.Path(directory)
    self._moved: list[epath.Path] = []
    if repair and self.directory.exists():
      for path in sorted(self.directory.iterdir()):
        if path.is_dir() and path.name.isdigit() and not _record_is_readable(path):
          self._moved.append(self._move(int(path.name)))
          log(f"WARNING: checkpoint at step {path.name} is unreadable (its record "
              f"{path / METADATA_FILE} is empty or garbled); moved it to {self._moved[-1]}")
    policies = ocp.training.preservation_policies
    decisions = ocp.training.save_decision_policies
    self._checkpointer = ocp.training.Checkpointer(
        self.directory,
        save_decision_policy=decisions.FixedIntervalPolicy(every_steps),
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                           keep_checkpoints_without_metrics=False),
        ]),
        cleanup_tmp_directories=True,
    )

  def save(self, step: int, state, iterator, bookkeeping: dict, *, metrics: dict | None = None,
           force: bool = False) -> bool:
    """Saves if the policy says so (or `force`); blocks until the step is on disk."""
    if self.catalog_fingerprint is not None:
      bookkeeping = {**bookkeeping, FINGERPRINT_KEY: self.catalog_fingerprint}
    saved = self._checkpointer.save_checkpointables(
        step, {"state": without_catalog(state), "dataset": iterator},
        metrics=metrics, custom_metadata=bookkeeping, force=force,
    )
    self._checkpointer.wait()
    return saved

  @property
  def steps(self) -> list[int]:
    return sorted(c.step for c in self._checkpointer.checkpoints)

  def best_step(self) -> int | None:
    """The kept step with the highest validation AUC, if any was saved with metrics."""
    best, best_value = None, float("-inf")
    for c in self._checkpointer.checkpoints:
      metrics = c.metrics or {}
      if BEST_METRIC in metrics and metrics[BEST_METRIC] > best_value:
        best, best_value = c.step, metrics[BEST_METRIC]
    return best

  def best_or_latest(self, step: int | None = None) -> int:
    """`step` if kept, else the best step (by validation AUC), else the latest; raises
    `WorkdirError` when there is no such checkpoint."""
    if step is None:
      step = self.best_step() or (self.steps[-1] if self.steps else None)
    if step is None or step not in self.steps:
      raise WorkdirError(f"no checkpoint for step {step} in {self.directory}; kept: {self.steps}")
    return step

  def check_catalog(self, step: int) -> None:
    """Raises `CatalogMismatchError` when the step was saved with another catalog."""
    saved = dict(self._checkpointer.metadata(step).custom_metadata or {}).get(FINGERPRINT_KEY)
    if saved is not None and self.catalog_fingerprint not in (None, saved):
      raise CatalogMismatchError(
          f"the checkpoint at step {step} in {self.directory} was trained with another item "
          f"catalog (fingerprint {saved[:12]}, the dataset's is {self.catalog_fingerprint[:12]}):"
          f" the dataset build changed since; train again or restore with the original build")

  def restore(self, step: int, abstract_state, iterator=None, *, catalog) -> Restored:
    """The state at `step` (abstract_state: the full TrainState's structure) with `catalog`
    (`catalog_of(a live state)`: the dataset's catalog variables) put into it."""
    self.check_catalog(step)
    legacy = any(k.startswith(f"rest/{CATALOG_KEY}/") for k in _shapes(self._saved_structure(step)))
    wanted = {"state": abstract_state if legacy else without_catalog(abstract_state)}
    if iterator is not None:
      wanted["dataset"] = iterator
    loaded = self._checkpointer.load_checkpointables(step, wanted)
    metadata = self._checkpointer.metadata(step)
    bookkeeping = {k: v for k, v in dict(metadata.custom_metadata or {}).items()
                   if k != FINGERPRINT_KEY}
    return Restored(step, with_catalog(loaded["state"], catalog), bookkeeping)

  def _saved_structure(self, step: int):
    """The saved state's tree of array metadata; raises if it cannot be read."""
    absl_logger = logging.get_absl_logger()
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)  # Orbax warns (two lines) before returning None
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        saved = ocp.pytree_metadata(self.directory / str(step),
                                    checkpointable_name="state").metadata
    finally:
      absl_logger.setLevel(level)
    if not saved:
      raise ValueError("its state metadata is unreadable")
    return saved

  def _move(self, step: int) -> epath.Path:
    target = self.directory / CORRUPT_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    (self.directory / str(step)).rename(target)
    return target

  def move_aside(self, step: int) -> epath.Path:
    """Moves a step's folder to corrupt/<step>-<time> (never deleted) and rescans."""
    target = self._move(step)
    self._checkpointer.reload()
    return target

  def restore_latest(self, abstract_state, iterator_factory: Callable[[], object], *, catalog,
                     parse_bookkeeping: Callable[[dict], object] = lambda b: b,
                     log: Callable[[str], None] = print):
    """(Restored, iterator) from the newest readable step, or (None, fresh iterator); `catalog`
    as for `restore`.

    Corrupt steps are moved aside (one `log` line each); `parse_bookkeeping` turns the
    bookkeeping record into the returned `Restored.bookkeeping` and raises on one that is
    empty or incomplete (a corrupt step too). Raises
    `CheckpointMismatchError` for a readable step of a differently shaped state.
    """
    moved = list(self._moved)
    for step in reversed(self.steps):
      try:
        saved, error = self._saved_structure(step), None
      except Exception as e:  # pylint: disable=broad-except  (any read failure: corrupt)
        saved, error = None, e
      if saved is not None:
        legacy = any(k.startswith(f"rest/{CATALOG_KEY}/") for k in _shapes(saved))
        differences = structure_differences(
            saved, abstract_state if legacy else without_catalog(abstract_state))
        if differences:
          raise CheckpointMismatchError(
              f"the checkpoint at step {step} in {self.directory} holds a state of another "
              f"shape than the current model (it is intact, not corrupt):\n  "
              + "\n  ".join(differences))
        self.check_catalog(step)  # a readable step of another catalog: refused, not moved
        iterator = iterator_factory()
        try:
          restored = self.restore(step, abstract_state, iterator, catalog=catalog)
          restored = dataclasses.replace(
              restored, bookkeeping=parse_bookkeeping(restored.bookkeeping))
          return restored, iterator
        except Exception as e:  # pylint: disable=broad-except
          error = e
      target = self.move_aside(step)
      moved.append(target)
      reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
      message = (f"checkpoint at step {step} is unreadable ({reason}); moved it to {target}, "
                 f"trying the previous one")
      log(f"WARNING: {message}")
    if moved:
      log(f"WARNING: no readable checkpoint left in {self.directory} ({len(moved)} unreadable "
          f"moved to {self.directory / CORRUPT_DIR}); starting from step 0")
    return None, iterator_factory()

  def close(self) -> None:
    self._checkpointer.close()
