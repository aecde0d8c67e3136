r"""Evaluate a training workdir's best (or a given) checkpoint on a split; writes JSON.

  python -m experiments.evaluate --workdir=/tmp/dmf_run --split=test
  python -m experiments.evaluate --workdir=/tmp/dmf_run --split=validation --step=500
"""

from __future__ import annotations

from absl import flags

from dmf_jax import cli
from experiments import distributed

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: best by validation AUC).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON path (default WORKDIR/eval_SPLIT.json).")


def main(argv):
  del argv
  distributed.initialize()
  import jax  # pylint: disable=g-import-not-at-top

  from dmf_jax.core import jsonio  # pylint: disable=g-import-not-at-top
  from dmf_jax.train import loop  # pylint: disable=g-import-not-at-top

  result = loop.evaluate_checkpoint(_WORKDIR.value, _SPLIT.value, _STEP.value)
  if jax.process_index() == 0:
    path = _OUTPUT.value or f"{_WORKDIR.value}/eval_{_SPLIT.value}.json"
    jsonio.write_json(path, result)
    print(jsonio.dumps(result, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
  cli.run(main)
