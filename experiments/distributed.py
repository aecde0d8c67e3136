"""Multi-host start-up shared by the binaries: flags and `jax.distributed.initialize`."""

from __future__ import annotations

import os

import jax
from absl import flags

COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                  "host:port of process 0 (multi-host runs).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def initialize() -> None:
  """Starts jax.distributed from the flags (or the standard environment, e.g. on Cloud TPU)."""
  given = [COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value]
  if any(v is not None for v in given) and not all(v is not None for v in given):
    raise flags.ValidationError(
        "--coordinator_address, --num_processes and --process_id must be given together")
  if all(v is not None for v in given):
    if NUM_PROCESSES.value > 1 and os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("TPU_WORKER_HOSTNAMES"):
    jax.distributed.initialize()
