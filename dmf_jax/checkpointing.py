"""Orbax (v1) checkpoints of the train state and the Grain iterator, saved together.

Each checkpoint step holds three checkpointables: 'state' (the TrainState: params, optimizer
state, step, rng, other variables), 'dataset' (the Grain iterator's position) and, as custom
metadata, the loop's bookkeeping (evaluation history for early stopping). Orbax writes each step
into a temporary directory and renames it when complete, so a crash mid-save leaves no
half-written step. The latest `keep` steps are kept, plus the best one by validation AUC.

`restore_latest` walks back from the newest step: a step that cannot be read (corrupt files) is
reported and the previous one is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from absl import logging
from etils import epath
from orbax.checkpoint import v1 as ocp

BEST_METRIC = "val_auc"


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  state: object
  bookkeeping: dict


class CheckpointManager:
  """Saves every `every_steps` steps (and when forced); keeps the latest `keep` and the best."""

  def __init__(self, directory: epath.PathLike, *, every_steps: int, keep: int = 2):
    if every_steps < 1 or keep < 1:
      raise ValueError(f"checkpoint every_steps ({every_steps}) and keep ({keep}) must be >= 1")
    self.directory = epath.Path(directory)
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
    saved = self._checkpointer.save_checkpointables(
        step, {"state": state, "dataset": iterator},
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

  def restore(self, step: int, abstract_state, iterator=None) -> Restored:
    wanted = {"state": abstract_state}
    if iterator is not None:
      wanted["dataset"] = iterator
    loaded = self._checkpointer.load_checkpointables(step, wanted)
    metadata = self._checkpointer.metadata(step)
    return Restored(step, loaded["state"], dict(metadata.custom_metadata or {}))

  def restore_latest(self, abstract_state, iterator_factory: Callable[[], object]):
    """(Restored, iterator) from the newest readable step, or (None, fresh iterator)."""
    for step in reversed(self.steps):
      iterator = iterator_factory()
      try:
        return self.restore(step, abstract_state, iterator), iterator
      except Exception as e:  # pylint: disable=broad-except
        message = (f"checkpoint at step {step} in {self.directory} is unreadable "
                   f"({type(e).__name__}: {str(e)[:300]}); falling back to the previous one")
        logging.warning(message)
        print(f"WARNING: {message}", flush=True)
    return None, iterator_factory()

  def close(self) -> None:
    self._checkpointer.close()
