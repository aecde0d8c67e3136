r"""Build a dataset into a TFDS data dir (ArrayRecord).

  python -m data.build --dataset=generated_ctr --config=default --data_dir=~/dmf_data
  python -m data.build --dataset=movielens_100k_mm --config=text_image --data_dir=~/dmf_data \
      --manual_dir=../shared/datasets/movielens-100k-mm
  python -m data.build --dataset=byod_ctr --data_dir=~/dmf_data --manual_dir=my_data/
  python -m data.build --dataset=generated_ctr --config=large --data_dir=gs://b/dmf_data \
      --beam_runner=DataflowRunner --beam_options="--project=P --region=R \
      --temp_location=gs://b/tmp --requirements_file=requirements.txt"

--beam_runner / --beam_options build as an Apache Beam pipeline (pip install -e ".[beam]");
the records equal those of the local build (README "Scale").

A build whose sources changed since is refused; `--replace_stale` moves it to
DATA_DIR/.replaced/ and builds again. Errors in the files print one line and exit 2.
"""

from absl import flags

from dmf_jax import data
from dmf_jax import cli

_DATASET = flags.DEFINE_enum("dataset", "generated_ctr", sorted(data.BUILDERS), "Dataset.")
_CONFIG = flags.DEFINE_string("config", None, "Builder config (default: the builder's first).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir.", required=True)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the raw files.")
_REPLACE_STALE = flags.DEFINE_bool(
    "replace_stale", False, "Move a build made from other sources aside and build again.")
_BEAM_RUNNER = flags.DEFINE_string(
    "beam_runner", None, "Build as an Apache Beam pipeline on this runner (DirectRunner, "
    "DataflowRunner, FlinkRunner, SparkRunner).")
_BEAM_OPTIONS = flags.DEFINE_string(
    "beam_options", None, "Beam pipeline arguments, space separated (implies a Beam build).")


def main(argv):
  del argv
  beam = None
  if _BEAM_RUNNER.value or _BEAM_OPTIONS.value:
    beam = data.BeamSettings(_BEAM_RUNNER.value, tuple((_BEAM_OPTIONS.value or "").split()))
  built = data.prepare(_DATASET.value, _CONFIG.value, _DATA_DIR.value, _MANUAL_DIR.value,
                       replace_stale=_REPLACE_STALE.value, beam=beam)
  sizes = ", ".join(f"{k} {len(v)}" for k, v in built.sources.items())
  print(f"{built.full_name} at {built.directory}: {sizes}")
  print(f"schema: {built.schema.num_items} items, modalities "
        f"{[(m.name, m.dim) for m in built.schema.modalities]}, L = {built.schema.seq_len}")


if __name__ == "__main__":
  cli.run(main)
