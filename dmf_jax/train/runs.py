"""A workdir holds one run: its lock, its identity (fingerprint) and how to start over.

A run claims its workdir in three steps, so that a refused run changes nothing:
1. `lock_workdir`, first of all (before the dataset is opened): the workdir lock (`run.lock`,
   see `dmf_jax.core.locking`); a second run into the same workdir stops at once with
   `LockedError`; a lock left by a dead run is taken over. A workdir that is a file or not
   writable is refused here (`WorkdirError`).
2. `check_identity`: compares the run's identity with the one recorded in `run.json` (or, for
   a workdir of an older version, in `config.json`). The identity is every config field except
   `RESUMABLE_FIELDS`, plus the dataset's build (`BuiltDataset.full_name` and `fingerprint`);
   of the flat model_config, only the fields of the run's model family count (`differences`).
   A different identity raises `RunMismatchError`, naming the fields; nothing is written.
3. `record_run`, once every other check has passed too (the checkpoint fits the model, the
   warm start's source fits): writes `run.json` and `config.json`. With `config.overwrite`
   set, an earlier run's files are first moved to `<workdir>.replaced-<time>` (never deleted)
   and the run starts afresh, whatever its identity.
Evaluation, export and serving open the dataset build recorded here (`recorded_build`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import ml_collections
from etils import epath

from dmf_jax.core import compat, jsonio
from dmf_jax.core.errors import UserError, WorkdirError
from dmf_jax.core.locking import FileLock
from dmf_jax.models.registry import MODELS

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
# Fields that may change when a run resumes: they decide how long and how visibly it runs,
# not what the state is or which data it trains on. `mesh.data` may change too (the data
# axis shards batches only); `mesh.model` pads the embedding tables, so it is part of the
# identity.
RESUMABLE_FIELDS = (
    "num_epochs", "num_train_steps", "eval_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "patience", "log_every_steps", "eval_batch_size", "progress",
    "prefetch", "worker_count", "in_memory_max_records", "record_similarities", "data_dir", "manual_dir",
    "dataset_config", "overwrite", "mesh.data",
)
_RETIRED = tuple(f"model_config.{name}" for name in compat.RETIRED_MODEL_FIELDS)  # ignored
ADDED_FIELDS = compat.ADDED_FIELDS  # fields added later, at their old-behaviour values
MAX_LISTED = 8


class RunMismatchError(UserError):
  """The workdir holds a run of another config or dataset."""


def _flatten(value, prefix: str = "") -> dict:
  if isinstance(value, dict):
    out = {}
    for key, inner in value.items():
      out.update(_flatten(inner, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def _identity_fields(config_json: dict) -> dict:
  """The flattened config without the fields that may change on resume."""
  return {k: v for k, v in _flatten(config_json).items()
          if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_FIELDS)
          and k not in _RETIRED and not _at_default(k, v)}


def identity(config: ml_collections.ConfigDict, dataset) -> dict:
  """The fields that must match for a run to resume: {dotted field: value}; the config's
  resumable fields are left out."""
  out = _identity_fields(json.loads(config.to_json_best_effort()))
  out["dataset.build"] = dataset.full_name
  out["dataset.fingerprint"] = dataset.fingerprint
  return out


def _recorded_identity(workdir: epath.Path) -> dict | None:
  """The identity of the run in `workdir`; None for a fresh workdir."""
  run_file, config_file = workdir / RUN_FILE, workdir / "config.json"
  for path in (run_file, config_file):
    if path.exists():
      try:
        recorded = json.loads(path.read_text())
      except ValueError as e:
        raise RunMismatchError(f"{path} is unreadable ({e}): cannot tell which run {workdir} "
                               f"holds; use a new --workdir or --config.overwrite=True") from None
      if path == run_file:
        return recorded["identity"]
      return _identity_fields(recorded)  # an older run: config.json only, no dataset build
  return None


def _at_default(key: str, value) -> bool:
  """A field added after runs were recorded, at the value that means the old behaviour."""
  return key in ADDED_FIELDS and value == ADDED_FIELDS[key]


def _family_fields(identity: dict) -> set[str] | None:
  """The model_config fields of the identity's model family (None: a model not registered)."""
  entry = MODELS.get(identity.get("model"))
  return None if entry is None else {f.name for f in dataclasses.fields(entry.config_class)}


def differences(recorded: dict, current: dict) -> list[str]:
  """Lines naming the identity fields that differ (an added field at its default and the same
  field absent are the same). model_config fields count only where they belong to the model
  families of both sides: another family's settings (DMF's bucket_dim for a DIN run) do not
  change a run."""
  own = [f for f in (_family_fields(recorded), _family_fields(current)) if f is not None]
  shared = set.intersection(*own) if own else None

  def view(identity: dict) -> dict:
    return {k: v for k, v in identity.items() if not _at_default(k, v) and (
        shared is None or not k.startswith("model_config.")
        or k.removeprefix("model_config.") in shared)}

  recorded, current = view(recorded), view(current)
  lines = []
  for key in sorted(set(recorded) | set(current)):
    if key.startswith("dataset.") and key not in recorded:
      continue  # an older run did not record its dataset build
    then, now = recorded.get(key, "<unset>"), current.get(key, "<unset>")
    if then != now:
      lines.append(f"{key}: {then!r} in the workdir, {now!r} now")
  return lines


def check_finished(workdir: epath.Path, config: ml_collections.ConfigDict, dataset) -> None:
  """Raises RunMismatchError when the finished run in `workdir` is of another config or
  dataset than `config` would train (so its results must not stand in for this one's)."""
  recorded = _recorded_identity(workdir)
  diff = differences(recorded, identity(config, dataset)) if recorded is not None else [
      f"{workdir / RUN_FILE}: missing"]
  if diff:
    raise RunMismatchError(
        f"{workdir} holds a finished run of another config or dataset; its results were not "
        f"used. It differs in:\n  " + "\n  ".join(diff[:MAX_LISTED])
        + "\nUse a new --output_dir (or move that run away) to train this one.")


def _move_old_run(workdir: epath.Path) -> epath.Path:
  target = epath.Path(f"{workdir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
  target.mkdir(parents=True)
  for entry in workdir.iterdir():
    if entry.name != LOCK_FILE:
      entry.rename(target / entry.name)
  return target


def lock_workdir(workdir: epath.Path, config: ml_collections.ConfigDict, *,
                 is_main: bool = True, log=None) -> FileLock | None:
  """Takes the workdir's lock (process 0; the first thing a run does, before any dataset is
  opened): raises `LockedError` at once when another live run holds it, `WorkdirError` for a
  workdir that is a file or cannot be written. Returns the held lock (release it when the run
  ends), or None on other processes."""
  if not is_main:
    return None
  log = log or (lambda message: print(message, file=sys.stderr, flush=True))
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder: give a folder")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    return FileLock(os.fspath(workdir / LOCK_FILE), purpose=f"training run ({config.model})",
                    wait=False, log=log).acquire()
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} cannot be written ({e.strerror or e}: "
                       f"{e.filename or workdir}); give a folder you can write") from None


def holds_run(workdir: epath.Path) -> bool:
  """Whether `workdir` holds anything but its lock (an earlier run's files)."""
  return workdir.exists() and any(e.name != LOCK_FILE for e in workdir.iterdir())


def check_identity(workdir: epath.Path, config: ml_collections.ConfigDict, dataset) -> None:
  """Raises `RunMismatchError` (nothing written) when `workdir` holds a run of another
  identity, unless `config.overwrite` is set (see module doc)."""
  recorded = _recorded_identity(workdir)
  diff = differences(recorded, identity(config, dataset)) if recorded is not None else []
  if diff and not config.get("overwrite", False):
    shown = diff[:MAX_LISTED] + ([f"... and {len(diff) - MAX_LISTED} more"]
                                 if len(diff) > MAX_LISTED else [])
    raise RunMismatchError(
        f"{workdir} holds another run; nothing was changed. It differs in:\n  "
        + "\n  ".join(shown)
        + "\nUse a new --workdir, or add --config.overwrite=True to move the old run to "
          f"{workdir}.replaced-<time> and start afresh.\n(Fields that may change on resume: "
          "README 'Runs and workdirs', dmf_jax.train.runs.RESUMABLE_FIELDS.)")


def record_run(workdir: epath.Path, config: ml_collections.ConfigDict, dataset, *,
               log=None) -> None:
  """Claims `workdir` for this run (process 0, once every check has passed): with
  `config.overwrite`, moves an earlier run's files to `<workdir>.replaced-<time>`; then writes
  `run.json` (the identity) and `config.json` (the whole config)."""
  log = log or (lambda message: print(message, file=sys.stderr, flush=True))
  if config.get("overwrite", False) and holds_run(workdir):
    log(f"overwrite: moved the old run in {workdir} to {_move_old_run(workdir)}")
  jsonio.write_json(workdir / RUN_FILE, {"identity": identity(config, dataset)})
  jsonio.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))


def recorded_build(workdir: epath.Path) -> tuple[str, str] | None:
  """(dataset build full name, fingerprint) that the run in `workdir` trained on; None for a
  run of an older version (its run.json did not record them) or none."""
  recorded = _recorded_identity(workdir) or {}
  if "dataset.build" not in recorded:
    return None
  return recorded["dataset.build"], recorded.get("dataset.fingerprint", "")
