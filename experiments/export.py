r"""Export a trained workdir's serving functions with jax.export (weights in the same file).

  python -m experiments.export --workdir=/tmp/dmf_run --output=/tmp/dmf.dmfx

Reload anywhere with jax installed, without this model code:
  from dmf_jax.serve.exported import ExportedScorer
  scorer = ExportedScorer("/tmp/dmf.dmfx")
  logits = scorer.score(scorer.encode_user({...user features..., "hist_item_id": [...]}), ids)
"""

from __future__ import annotations

from absl import flags
from dmf_jax import cli
from dmf_jax.core import compat
from dmf_jax.serve.request import DEFAULT_CANDIDATE_SIZES

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output file.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: best by validation AUC).")
_CANDIDATE_SIZES = flags.DEFINE_list(
    "candidate_sizes", [str(n) for n in DEFAULT_CANDIDATE_SIZES],
    "The padded candidate counts to compile a score function for.")
for _old, _new in compat.RENAMED_FLAGS["export"].items():  # older command lines
  flags.DEFINE_alias(_old, _new)
_FORCE = flags.DEFINE_bool("force", False, "Replace an existing --output file.")


def main(argv):
  del argv
  from dmf_jax.serve import server as serving  # pylint: disable=g-import-not-at-top
  from dmf_jax.serve.export import check_output, export  # pylint: disable=g-import-not-at-top
  from dmf_jax.core.errors import UserError  # pylint: disable=g-import-not-at-top

  output = check_output(_OUTPUT.value, force=_FORCE.value)  # before the run is loaded
  try:
    sizes = [int(n) for n in _CANDIDATE_SIZES.value]
  except ValueError:
    raise UserError(f"--candidate_sizes: expected integers, got {_CANDIDATE_SIZES.value}"
                    ) from None
  server = serving.Server.from_workdir(_WORKDIR.value, _STEP.value, candidate_sizes=sizes)
  export(server, output, force=_FORCE.value)
  print(f"exported step {server.step} of {_WORKDIR.value} to {output}")


if __name__ == "__main__":
  cli.run(main)
