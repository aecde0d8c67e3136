r"""Export a trained workdir's serving functions with jax.export (weights in the same file).

  python -m experiments.export --workdir=/tmp/dmf_run --output=/tmp/dmf.dmfx

Reload anywhere with jax installed, without this model code:
  from dmf_jax.exported import ExportedScorer
  scorer = ExportedScorer("/tmp/dmf.dmfx")
  logits = scorer.score(scorer.encode_user({...user features..., "hist_item_id": [...]}), ids)
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from etils import epath

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output file.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: best by validation AUC).")
_BUCKETS = flags.DEFINE_list("buckets", ["16", "128", "1024", "4096"], "Candidate bucket sizes.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  import ml_collections  # pylint: disable=g-import-not-at-top

  from dmf_jax import serving, train_lib  # pylint: disable=g-import-not-at-top
  from dmf_jax.checkpointing import CheckpointManager  # pylint: disable=g-import-not-at-top

  workdir = epath.Path(_WORKDIR.value).expanduser()
  path = workdir / "config.json"
  if not path.exists():
    print(f"error: {path} is missing: not a training workdir", file=sys.stderr)
    sys.exit(1)
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  exp = train_lib.build_experiment(config)
  ckpt = CheckpointManager(workdir / "checkpoints", every_steps=config.checkpoint_every_steps)
  step = _STEP.value or ckpt.best_step() or (ckpt.steps[-1] if ckpt.steps else None)
  if step is None or step not in ckpt.steps:
    print(f"error: no checkpoint for step {step} in {ckpt.directory}", file=sys.stderr)
    sys.exit(1)
  state = ckpt.restore(step, exp.partitioner.abstract_state(exp.shardings, exp.state)).state
  server = serving.Server(train_lib.serving_model(exp, state),
                          buckets=[int(b) for b in _BUCKETS.value])
  serving.export(server, _OUTPUT.value)
  ckpt.close()
  print(f"exported step {step} of {workdir} to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
