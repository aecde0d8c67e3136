r"""Build a dataset into a TFDS data dir (ArrayRecord).

  python -m data.build --dataset=generated_ctr --config=default --data_dir=~/dmf_data
  python -m data.build --dataset=movielens_100k_mm --config=text_image --data_dir=~/dmf_data \
      --manual_dir=../shared/datasets/movielens-100k-mm
  python -m data.build --dataset=byod_ctr --data_dir=~/dmf_data --manual_dir=my_data/
"""

from absl import app, flags

import data

_DATASET = flags.DEFINE_enum("dataset", "generated_ctr", sorted(data.BUILDERS), "Dataset.")
_CONFIG = flags.DEFINE_string("config", None, "Builder config (default: the builder's first).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir.", required=True)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the raw files.")


def main(argv):
  del argv
  built = data.prepare(_DATASET.value, _CONFIG.value, _DATA_DIR.value, _MANUAL_DIR.value)
  sizes = ", ".join(f"{k} {len(v)}" for k, v in built.sources.items())
  print(f"{built.name} at {built.directory}: {sizes}")
  print(f"schema: {built.schema.num_items} items, modalities "
        f"{[(m.name, m.dim) for m in built.schema.modalities]}, L = {built.schema.seq_len}")


if __name__ == "__main__":
  app.run(main)
