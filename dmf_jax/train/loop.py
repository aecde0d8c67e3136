"""The training job: `train_and_evaluate(config, workdir)` and `evaluate_checkpoint`.

The experiment (config validated, dataset opened, sharded state created) is
`train.experiment`'s. Sections:
  1. Evaluation: exact metrics over a whole split, gathered from every process.
  2. Training loop: steps, reports, evaluation and early stopping, checkpoints, the non-finite
     loss guard; resumes from the latest readable checkpoint in `workdir`.
  3. Final report: the best checkpoint (by validation AUC) on validation and test,
     `results.json` and `curves.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dmf_jax.core import jsonio
from dmf_jax.core.errors import UserError
from dmf_jax.data import pipeline
from dmf_jax.train import config as config_lib
from dmf_jax.train import memory, metrics, runs, writers
from dmf_jax.train.checkpointing import CheckpointManager, CorruptCheckpointError, catalog_of
from dmf_jax.train.experiment import Experiment, build_experiment, count_params
from dmf_jax.train.restore import log_to_stderr, open_run_dataset, read_run_config
from dmf_jax.train.warm_start import warm_start


COLD_ITEM_MAX_TRAIN_EXAMPLES = 5  # cold items: fewer training examples than this


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss; the run stops without saving that state."""


class ResultError(UserError):
  """An evaluation that must not be written as a run's result: a non-finite metric, or one
  worse than the result recorded for the same checkpoint step."""


# ---------------------------------------------------------------------------------------------
# 1. Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_split(exp: Experiment, predict, state, split: str,
                   cold_items: np.ndarray | None = None) -> dict:
  """Exact AUC / GAUC / logloss over every example of `split` (padding rows weigh 0).

  cold_items: optional bool [num_items]; adds 'cold': the metrics over the examples whose
  target item is cold.
  """
  ds = pipeline.eval_dataset(exp.records(split), exp.parser,
                             global_batch_size=exp.eval_batch_size(predict), shard=exp.shard)
  acc, cold = metrics.EvalAccumulator(), metrics.EvalAccumulator()
  gather = exp.partitioner.gather
  batches = pipeline.to_iterator(ds, prefetch=exp.config.prefetch,
                                after=exp.record_similarities)
  for local in batches:
    batch = exp.to_model_batch(local, extra=("group",))
    logits = gather(predict(state, batch))
    users, labels, weights = (gather(batch[k]) for k in ("group", "label", "weight"))
    acc.update(users, labels, logits, weights)
    if cold_items is not None:
      cold.update(users, labels, logits, weights * cold_items[gather(batch["item_id"])])
  result = acc.compute()
  if cold_items is not None:
    result["cold"] = cold.compute() if cold.count else None
  return result


def train_item_counts(exp: Experiment, chunk: int = 8192) -> np.ndarray:
  """How many training examples each item is the target of: int64 [num_items]."""
  records = exp.records("train")
  counts = np.zeros(exp.dataset.schema.num_items, np.int64)
  for start in range(0, len(records), chunk):
    ids = exp.parser(records.read(range(start, min(start + chunk, len(records)))))["item_id"]
    counts += np.bincount(ids, minlength=len(counts))
  return counts


# ---------------------------------------------------------------------------------------------
# 2. Training loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Bookkeeping:
  """Loop state saved with each checkpoint (JSON), so a resumed run decides as the original."""

  best_val_auc: float = -math.inf
  best_step: int = -1
  evals_since_best: int = 0
  stopped_early: bool = False
  train_seconds: float = 0.0

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["best_val_auc"] = None if math.isinf(self.best_val_auc) else self.best_val_auc
    return d

  @classmethod
  def from_json(cls, d: dict) -> "Bookkeeping":
    """Raises ValueError for a record that is empty or lacks a field (an unreadable one)."""
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in (d or {})]
    if missing:
      raise ValueError(f"loop bookkeeping record lacks {missing}")
    d = dict(d)
    d["best_val_auc"] = -math.inf if d.get("best_val_auc") is None else d["best_val_auc"]
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


write_json = jsonio.write_json  # strict JSON (no bare NaN), atomically

# Must be finite for an evaluation to be a result: non-finite logits (a damaged state) give a
# non-finite logloss, while their AUC can look like chance. The AUC of a split with one class
# is undefined (NaN), not damage: written as null.
HEADLINE_METRICS = ("logloss",)
RESULT_TOLERANCE = 1e-3  # validation AUC of one step evaluated twice: the same within this


def check_finite(result: dict, what: str) -> None:
  """Raises `ResultError` when a headline metric of `result` is NaN or infinite."""
  bad = {k: result[k] for k in HEADLINE_METRICS
         if k in result and not (isinstance(result[k], (int, float)) and math.isfinite(result[k]))}
  if bad:
    raise ResultError(
        f"{what}: non-finite {', '.join(f'{k} {v}' for k, v in bad.items())}; not written as a "
        f"result. The checkpoint or the data it was evaluated on is damaged")


def check_against_recorded(results: dict, path: epath.Path) -> None:
  """Raises `ResultError` when `path` (a finished run's results.json) records a better
  validation AUC for the same best step than `results`: the same step evaluated again must
  give the same figures, so something changed (the checkpoint or the data) and the recorded
  result is kept."""
  try:
    previous = json.loads(path.read_text())
    old = float(previous["validation"]["auc"])
  except (OSError, ValueError, KeyError, TypeError):
    return  # none, or unreadable: nothing to keep
  if previous.get("best_step") == results["best_step"] and math.isfinite(old) and (
      results["validation"]["auc"] < old - RESULT_TOLERANCE):
    raise ResultError(
        f"evaluating step {results['best_step']} again gives validation AUC "
        f"{results['validation']['auc']:.4f}, but {path} records {old:.4f} for the same step: "
        f"the checkpoint or the dataset changed since; {path} was kept as it is")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, test: bool = True
                       ) -> dict:
  """Trains (resuming from `workdir` if it holds this run's checkpoints), writes results.json.

  test=False (hyperparameter tuning): the test split is left out of the dataset, never read,
  and results.json has no "test" entry.

  Raises `runs.RunMismatchError` (nothing written) when `workdir` holds a run of another
  config or dataset, and `locking.LockedError` when another live run holds the workdir.
  """
  workdir = epath.Path(workdir).expanduser()
  is_main = jax.process_index() == 0
  config = config_lib.with_model_values(config)  # a study config's values for this model
  created = not workdir.exists()
  # first of all: a busy workdir stops the run at once
  lock = runs.lock_workdir(workdir, config, is_main=is_main, log=log_to_stderr)
  try:
    exp = build_experiment(config, test=test)
    runs.check_identity(workdir, config, exp.dataset)
    return _train(exp, config, workdir, is_main)
  finally:
    if lock is not None:
      lock.release()
      if created and not any(workdir.iterdir()):
        workdir.rmdir()  # a run refused before it wrote anything leaves no trace


def _checkpoints(exp: Experiment, workdir: epath.Path, is_main: bool) -> CheckpointManager:
  return CheckpointManager(
      workdir / "checkpoints", every_steps=exp.config.checkpoint_every_steps,
      keep=exp.config.keep_checkpoints, repair=is_main,
      log=log_to_stderr if is_main else (lambda m: None),
      catalog_fingerprint=exp.catalog_fingerprint)


def _train(exp: Experiment, config: ml_collections.ConfigDict, workdir: epath.Path,
           is_main: bool) -> dict:
  log = log_to_stderr if is_main else (lambda m: None)
  train_ds = exp.train_dataset()  # parsed once, however many iterators the restore makes
  new_iterator = lambda: exp.train_iterator(train_ds)
  abstract = exp.partitioner.abstract_state(exp.shardings, exp.state)
  # Every check before the workdir is claimed (run.json, config.json written): a refused run
  # changes nothing. The latest checkpoint must fit the model, a warm start's source too.
  fresh = config.get("overwrite", False) and runs.holds_run(workdir)  # the old run moves away
  resume = not fresh and (workdir / "checkpoints").exists()
  if jax.process_count() > 1:  # every process decides on the workdir before anyone moves it
    multihost_utils.sync_global_devices("workdir inspected")
  restored, iterator, ckpt = None, None, None
  if resume:
    ckpt = _checkpoints(exp, workdir, is_main)
    restored, iterator = ckpt.restore_latest(
        abstract, new_iterator, catalog=catalog_of(exp.state),
        parse_bookkeeping=Bookkeeping.from_json, log=log)
  state, book, step = exp.state, Bookkeeping(), 0
  if restored is not None:
    state, book, step = restored.state, restored.bookkeeping, restored.step
    log(f"resumed from step {step} ({ckpt.directory})")
  elif config.get("init_from"):
    state = warm_start(exp, config.init_from, optimizer_state=config.init_from_optimizer, log=log)
  if is_main:
    runs.record_run(workdir, config, exp.dataset, log=log_to_stderr)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("workdir claimed")
  if ckpt is None:
    ckpt, iterator = _checkpoints(exp, workdir, is_main), new_iterator()
  writer = writers.MetricWriter(workdir, enabled=is_main, start_step=step)
  train_steps = {phase: exp.partitioner.train_step(exp.graphdef, exp.tx, exp.shardings, phase)
                 for phase in ("pretrain", "main")}  # each compiles on its first call
  predict = exp.partitioner.predict_step(exp.graphdef, exp.shardings)
  progress = writers.Progress(exp.total_steps, step, config.batch_size,
                              enabled=is_main and config.progress)
  held = memory.per_device_summary(state)
  eval_size = exp.eval_batch_size(predict)  # every process: a sized batch is agreed by all
  if is_main:
    log_to_stderr("per device: " + ", ".join(f"{part} {memory.format_bytes(held[part])}"
                                    for part in (*memory.PARTS, "total") if held[part]))
    if exp.eval_sizing:
      sizing = exp.eval_sizing
      log_to_stderr(f"evaluation batch {eval_size}: the largest whose working set (about "
                    f"{memory.format_bytes(sizing.get('working_set_bytes') or 0)}) fits "
                    f"{sizing['budget_is']} ({memory.format_bytes(sizing['budget'])})")
    if exp.unique_row_shards:
      log_to_stderr(f"training batches carry their distinct items: {exp.unique_row_shards} "
                    f"data shard(s) per process, the catalog's {exp.dataset.schema.num_items} "
                    "rows outnumber a shard's item positions")

  t0, seconds_before, pending = time.time(), book.train_seconds, []
  # Logged throughput: training steps only (the window restarts after evaluations, saves and
  # the first, compiling, step of this process, resumed or not).
  window, first_step = (time.time(), step), step
  while step < exp.total_steps and not book.stopped_early:
    phase = exp.phase(step)
    state, out = train_steps[phase](state, exp.to_model_batch(next(iterator)))
    step += 1
    pending.append(out)
    # No evaluation (so no early stopping) while pre-training: the joined model is not trained.
    evaluate_now = phase == "main" and (
        step % config.eval_every_steps == 0 or step == exp.total_steps)
    save_now = (evaluate_now or step % config.checkpoint_every_steps == 0
                or step == exp.pretrain_steps)
    if save_now or step % config.log_every_steps == 0:
      outs = jax.device_get(pending)
      pending = []
      losses = np.asarray([o["loss"] for o in outs])
      if not np.all(np.isfinite(losses)):
        last = ckpt.steps[-1] if ckpt.steps else None
        raise NonFiniteLossError(
            f"non-finite training loss at step {step} (losses {losses[~np.isfinite(losses)][:3]});"
            f" stopped without saving. Last good checkpoint: "
            + (f"step {last} in {ckpt.directory}" if last is not None else "none"))
      steps_per_s = (step - window[1]) / max(time.time() - window[0], 1e-9)
      extras = {k: float(np.mean([o[k] for o in outs])) for k in outs[-1] if k != "loss"}
      _, wall_examples_per_s = progress.rate(step)
      writer.write(step, "train" if phase == "main" else phase,
                   {"loss": float(losses.mean()), **extras, "steps_per_s": steps_per_s,
                    "examples_per_s": steps_per_s * config.batch_size,
                    "wall_examples_per_s": wall_examples_per_s})
      progress.update(step, float(losses.mean()), steps_per_s * config.batch_size)
    eval_metrics = None
    if evaluate_now:
      val = evaluate_split(exp, predict, state, "validation")
      if val["auc"] > book.best_val_auc:
        book.best_val_auc, book.best_step, book.evals_since_best = val["auc"], step, 0
      else:
        book.evals_since_best += 1
      if config.patience and book.evals_since_best >= config.patience:
        book.stopped_early = True
        announce = print if is_main else (lambda *a, **k: None)
        announce(f"early stop at step {step}: no better validation AUC in "
                         f"{config.patience} evaluations (best {book.best_val_auc:.4f} at step "
                         f"{book.best_step})", file=sys.stderr, flush=True)
      writer.write(step, "eval", {f"val_{k}": v for k, v in val.items()})
      progress.message(f"step {step}: validation AUC {val['auc']:.4f} GAUC {val['gauc']:.4f} "
                       f"logloss {val['logloss']:.4f}")
      eval_metrics = {"val_auc": float(val["auc"])}
    if save_now or book.stopped_early:
      book.train_seconds = seconds_before + time.time() - t0
      ckpt.save(step, state, iterator, book.to_json(), metrics=eval_metrics, force=True)
    if save_now or step == first_step + 1:
      jax.block_until_ready(state.step)
      window = (time.time(), step)

  # -------------------------------------------------------------------------------------------
  # 3. Final report
  # -------------------------------------------------------------------------------------------
  while True:
    best = ckpt.best_step() or (ckpt.steps[-1] if ckpt.steps else None)
    if best is None:
      raise RuntimeError(f"no checkpoint in {ckpt.directory} to evaluate")
    try:
      best_state = ckpt.restore(best, abstract, catalog=catalog_of(state)).state
      break
    except CorruptCheckpointError as e:  # the best is not the latest, which was restored
      log(f"WARNING: {e}; moved it to {ckpt.move_aside(best)}, reporting the next best")
  cold_items = train_item_counts(exp) < COLD_ITEM_MAX_TRAIN_EXAMPLES
  results = {
      "model": config.model,
      "dataset": exp.dataset.full_name,
      "best_step": best,
      "steps": step,
      "stopped_early": book.stopped_early,
      "train_seconds": round(book.train_seconds, 2),
      "params": count_params(best_state),
      "device_bytes": held,  # the largest per-device bytes of each part of the train state
      "validation": evaluate_split(exp, predict, best_state, "validation"),
  }
  if "test" in exp.dataset.sources:
    results["test"] = evaluate_split(exp, predict, best_state, "test", cold_items)
    results["cold_item_definition"] = (f"target items with < {COLD_ITEM_MAX_TRAIN_EXAMPLES} "
                                       "training examples")
  for split in ("validation", "test"):
    if split in results:
      check_finite(results[split], f"the {split} evaluation of step {best} in {workdir}")
  if is_main:
    check_against_recorded(results, workdir / "results.json")
    write_json(workdir / "results.json", results)
    writers.plot_curves(workdir, title=f"{config.model} on {exp.dataset.full_name}")
  writer.close()
  ckpt.close()
  return results


def evaluate_checkpoint(workdir: str, split: str, step: int | None = None) -> dict:
  """Restores the best (or a given) checkpoint of a finished or running `workdir`; its metrics."""
  workdir = epath.Path(workdir).expanduser()
  config = read_run_config(workdir)
  exp = build_experiment(config, dataset=open_run_dataset(workdir, config))
  ckpt = CheckpointManager(workdir / "checkpoints", every_steps=config.checkpoint_every_steps,
                           keep=config.keep_checkpoints,
                           catalog_fingerprint=exp.catalog_fingerprint)
  step = ckpt.best_or_latest(step)
  abstract = exp.partitioner.abstract_state(exp.shardings, exp.state)
  state = ckpt.restore(step, abstract, catalog=catalog_of(exp.state)).state
  predict = exp.partitioner.predict_step(exp.graphdef, exp.shardings)
  result = {"step": step, "split": split, "dataset": exp.dataset.full_name,
            "dataset_fingerprint": exp.dataset.fingerprint,
            **evaluate_split(exp, predict, state, split)}
  ckpt.close()
  check_finite(result, f"the {split} evaluation of step {step} in {workdir}")
  logging.info("evaluated step %d on %s: %s", step, split, result)
  return result
