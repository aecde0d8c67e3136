"""Orbax (v1) checkpoints of the train state and the Grain iterator, saved together.

Each checkpoint step holds three checkpointables: 'state' (the TrainState: params, optimizer
state, step, rng, other variables), 'dataset' (the Grain iterator's position) and, as custom
metadata, the loop's bookkeeping (evaluation history for early stopping). Orbax writes each step
into a temporary directory and renames it when complete, so a crash mid-save leaves no
half-written step. The latest `keep` steps are kept, plus the best one by validation AUC.

Each saved step carries a content manifest (`dmf_jax.core.integrity`: every file's size and
XXH3-128 hash), written atomically once Orbax has finished the step; every restore verifies it
first (resume, evaluation, export, serving, warm starts, the robustness report), so flipped bits
in an array file are found before anything is read. A step whose bookkeeping says it was saved
with a manifest but has none was cut off between the two writes: it is unverifiable, treated
as corrupt. A step of an older version (no manifest) restores with one line saying so.

`restore_latest` walks back from the newest step. A step whose files cannot be read (truncated
or garbled arrays, an empty or unreadable bookkeeping record) or fail their content check is
corrupt: it is moved to `<directory>/corrupt/<step>-<time>` with one warning line, and the
previous step is tried. A step that reads fine but holds a differently shaped state (another
model or config) is not corrupt: `CheckpointMismatchError` names the first differing arrays
and nothing is moved. `restore` of one named step refuses a corrupt one
(`CorruptCheckpointError`) and moves nothing: evaluation and export only read.

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
from jax.experimental import multihost_utils
from orbax.checkpoint import v1 as ocp

from dmf_jax.core import compat, integrity
from dmf_jax.core.errors import UserError, WorkdirError

BEST_METRIC = "val_auc"
CORRUPT_DIR = "corrupt"


METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's per-step record (holds the bookkeeping)


def _record(step_dir: epath.Path) -> dict | None:
  """Orbax's record of a step (None when it is missing, empty or garbled)."""
  try:
    record = json.loads((step_dir / METADATA_FILE).read_text())
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


class CheckpointMismatchError(UserError):
  """A readable checkpoint whose state does not have the structure of the current model."""


class CorruptCheckpointError(UserError):
  """A checkpoint step whose files fail their content check (or cannot be checked)."""

  def __init__(self, step: int, directory, detail: str):
    super().__init__(f"the checkpoint at step {step} in {directory} is corrupt: {detail}")
    self.detail = detail


class CatalogMismatchError(UserError):
  """A checkpoint trained with another item catalog than the one given to restore it."""


CATALOG_KEY = "catalog"  # the model attribute holding the frozen catalog (`CatalogTables`)
FINGERPRINT_KEY = "catalog_fingerprint"  # in each step's custom metadata
MANIFEST_KEY = "content_manifest"  # in each step's custom metadata: a manifest follows the save
RESERVED_KEYS = (FINGERPRINT_KEY, MANIFEST_KEY)  # the manager's, not the caller's bookkeeping


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
    self._log = log
    self._unverified: set[int] = set()  # steps without a manifest, reported once each
    if every_steps < 1 or keep < 1:
      raise ValueError(f"checkpoint every_steps ({every_steps}) and keep ({keep}) must be >= 1")
    self.directory = epath.Path(directory)
    self._moved: list[epath.Path] = []
    if repair and self.directory.exists():
      for path in sorted(self.directory.iterdir()):
        if path.is_dir() and path.name.isdigit() and _record(path) is None:
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
    bookkeeping = {**bookkeeping, MANIFEST_KEY: integrity.ALGORITHM}
    if self.catalog_fingerprint is not None:
      bookkeeping = {**bookkeeping, FINGERPRINT_KEY: self.catalog_fingerprint}
    saved = self._checkpointer.save_checkpointables(
        step, {"state": without_catalog(state), "dataset": iterator},
        metrics=metrics, custom_metadata=bookkeeping, force=force,
    )
    self._checkpointer.wait()
    if saved and jax.process_index() == 0:
      integrity.write_manifest(self.directory / str(step))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint manifest {step}")
    return saved

  def verify(self, step: int) -> bool:
    """Checks the step's files against its content manifest: True when verified, False for a
    step of an older version (no manifest: one `log` line says so). Raises
    `CorruptCheckpointError` naming the step and the file that differs."""
    step_dir = self.directory / str(step)
    if integrity.has_manifest(step_dir):
      try:
        integrity.verify_manifest(step_dir)
      except integrity.IntegrityError as e:
        raise CorruptCheckpointError(step, self.directory, str(e)) from None
      return True
    if ((_record(step_dir) or {}).get("custom_metadata") or {}).get(MANIFEST_KEY):
      raise CorruptCheckpointError(
          step, self.directory, f"its content manifest {step_dir / integrity.MANIFEST_FILE} is "
          f"missing (the save was cut off), so its files cannot be checked")
    if step not in self._unverified:
      self._unverified.add(step)
      self._log(f"checkpoint at step {step} has no content manifest (written by an older "
                f"version): restored unverified")
    return False

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
    if step is None:
      raise WorkdirError(f"{self.directory} holds no checkpoint (the run has not saved one yet, "
                         f"or this is not a training workdir)")
    if step not in self.steps:
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
    (`catalog_of(a live state)`: the dataset's catalog variables) put into it. Raises
    `CorruptCheckpointError` when the step fails its content check (nothing is moved)."""
    self.verify(step)
    try:
      return self._restore_verified(step, abstract_state, iterator, catalog=catalog)
    except (CheckpointMismatchError, CatalogMismatchError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (a read failure: --debug shows it)
      reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
      raise CorruptCheckpointError(step, self.directory, f"it cannot be read ({reason})") from e

  def _restore_verified(self, step: int, abstract_state, iterator=None, *, catalog) -> Restored:
    self.check_catalog(step)
    saved = self._saved_structure(step)
    legacy = compat.checkpoint_holds_catalog(_shapes(saved), CATALOG_KEY)
    differences = structure_differences(
        saved, abstract_state if legacy else without_catalog(abstract_state))
    if differences:
      raise CheckpointMismatchError(
          f"the checkpoint at step {step} in {self.directory} holds a state of another "
          f"shape than the current model (it is intact, not corrupt):\n  "
          + "\n  ".join(differences))
    wanted = {"state": abstract_state if legacy else without_catalog(abstract_state)}
    if iterator is not None:
      wanted["dataset"] = iterator
    loaded = self._checkpointer.load_checkpointables(step, wanted)
    metadata = self._checkpointer.metadata(step)
    bookkeeping = {k: v for k, v in dict(metadata.custom_metadata or {}).items()
                   if k not in RESERVED_KEYS}
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
      iterator = iterator_factory()
      try:
        self.verify(step)  # before anything of the step is read
        restored = self._restore_verified(step, abstract_state, iterator, catalog=catalog)
        restored = dataclasses.replace(
            restored, bookkeeping=parse_bookkeeping(restored.bookkeeping))
        return restored, iterator
      except (CheckpointMismatchError, CatalogMismatchError):
        raise  # a readable step of another model or catalog: refused, nothing moved
      except Exception as e:  # pylint: disable=broad-except  (any read failure: corrupt)
        error = e
      target = self.move_aside(step)
      moved.append(target)
      reason = (error.detail if isinstance(error, CorruptCheckpointError)
                else " ".join(f"{type(error).__name__}: {error}".split())[:200])
      message = (f"checkpoint at step {step} is unreadable ({reason}); moved it to {target}, "
                 f"trying the previous one")
      log(f"WARNING: {message}")
    if moved:
      log(f"WARNING: no readable checkpoint left in {self.directory} ({len(moved)} unreadable "
          f"moved to {self.directory / CORRUPT_DIR}); starting from step 0")
    return None, iterator_factory()

  def close(self) -> None:
    self._checkpointer.close()
