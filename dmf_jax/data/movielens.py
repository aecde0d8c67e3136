"""movielens_100k_mm: MovieLens-100K with TMDB text and posters (research use only).

A TFDS manual-download dataset: the raw folder is given as `manual_dir` (it is never copied into
the repository). Protocol (README, "MovieLens-100K multimodal"): label = rating >= 4; behaviour
sequence = the user's items rated >= 4 strictly before the target's timestamp, last 50; per-user
chronological 80/10/10 split.

Configs:
  text_image  (default) text + image modality vectors from the encoding step's cache
              (`python -m data.movielens_100k_mm.encode_items`, see README);
  text        the text vectors only;
  ids         no modality vectors (ID-only models, protocol checks);
  text_image_tmdb, ids_tmdb
              as text_image / ids, plus TMDB numeric item fields (runtime, vote_average,
              vote_count, popularity, budget; `movielens_raw.TMDB_NUMERIC`), normalised on the
              training split. TMDB collected them in 2024, decades after the ratings
              (popularity and vote counts partly reflect later success): report them apart.
  text_image_global_time
              as text_image, split by a global time cut instead (the first 80% of the events
              by time train; `sequences.GLOBAL_TIME_FRACTIONS`): a cold-start report, with
              items and users first seen after the cut.
The encoder cache is `<manual_dir>/../movielens_100k_mm_encoded` unless the environment variable
DMF_ML_ENCODED_DIR (or the config's `encoded_dir`) names another folder.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from dmf_jax.data.common import CtrBuilder
from dmf_jax.data import movielens_raw as raw
from dmf_jax.data import numeric as numeric_lib
from dmf_jax.data import sequences
from dmf_jax.core.catalog import ItemCatalog
from dmf_jax.core.errors import DataError, MissingFileError
from dmf_jax.core.schema import FeatureSchema, FeatureSpec, ModalitySpec, NumericSpec

SEQ_LEN = 50
ID_DIM, FIELD_DIM = 32, 8
USER_FIELDS = (
    FeatureSpec("user_id", 943, ID_DIM),
    FeatureSpec("age", len(raw.AGE_EDGES) + 1, FIELD_DIM),
    FeatureSpec("gender", 2, FIELD_DIM),
    FeatureSpec("occupation", 21, FIELD_DIM),
)
ENCODED_ENV = "DMF_ML_ENCODED_DIR"


@dataclasses.dataclass(kw_only=True)
class MovielensConfig(tfds.core.BuilderConfig):
  modalities: tuple[str, ...] = ("text", "image")
  encoded_dir: str | None = None
  tmdb_numeric: bool = False
  split: str = "per_user"  # or 'global_time' (sequences.examples_from_events)


def read_modality(encoded_dir: epath.Path, name: str, num_items: int) -> np.ndarray:
  """`<name>.npy` [n, D] with `<name>_ids.npy` [n] (MovieLens ids) -> [num_items, D] by index.

  Items absent from the cache (e.g. no poster) get a zero vector (similarity 0 to everything).
  """
  vec_path, ids_path = encoded_dir / f"{name}.npy", encoded_dir / f"{name}_ids.npy"
  for path in (vec_path, ids_path):
    if not path.exists():
      raise MissingFileError(
          f"missing {path}: run `python -m data.movielens_100k_mm.encode_items "
          f"--manual_dir=... --output_dir={encoded_dir}` first (needs the `encoders` extra)"
      )
  with vec_path.open("rb") as f:
    vectors = np.load(f)
  with ids_path.open("rb") as f:
    ids = np.load(f)
  if vectors.ndim != 2 or len(vectors) != len(ids):
    raise DataError(f"{vec_path}: shape {vectors.shape} does not match {len(ids)} ids in {ids_path}")
  if len(np.unique(ids)) != len(ids):
    raise DataError(f"{ids_path}: duplicate item ids")
  if ids.min() < 1 or ids.max() > num_items:
    raise DataError(f"{ids_path}: ids outside 1..{num_items}")
  bad = ~np.isfinite(vectors).all(axis=1)
  if bad.any():
    raise DataError(f"{vec_path}: {int(bad.sum())} rows with NaN/inf (first: id {ids[bad][0]})")
  table = np.zeros((num_items, vectors.shape[1]), np.float32)
  table[ids - 1] = vectors
  return table


class Movielens100kMm(CtrBuilder):
  """MovieLens-100K ratings as CTR impressions with TMDB text and poster modalities."""

  name = "movielens_100k_mm"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the MovieLens-100K multimodal folder as manual_dir (e.g. "
      "../shared/datasets/movielens-100k-mm).\n" + raw.LAYOUT
  )
  BUILDER_CONFIGS = [
      MovielensConfig(name="text_image", description="Text and image vectors."),
      MovielensConfig(name="text", description="Text vectors only.", modalities=("text",)),
      MovielensConfig(name="ids", description="No modality vectors.", modalities=()),
      MovielensConfig(name="text_image_tmdb", description="Text and image vectors, TMDB "
                      "numeric item fields.", tmdb_numeric=True),
      MovielensConfig(name="ids_tmdb", description="No modality vectors, TMDB numeric item "
                      "fields.", modalities=(), tmdb_numeric=True),
      MovielensConfig(name="text_image_global_time", description="Text and image vectors, "
                      "split by a global time cut (cold-start report).", split="global_time"),
  ]

  def encoded_dir(self, manual_dir: epath.Path) -> epath.Path:
    chosen = self.builder_config.encoded_dir or os.environ.get(ENCODED_ENV)
    return epath.Path(chosen) if chosen else manual_dir.parent / "movielens_100k_mm_encoded"

  def source_files(self, manual_dir: epath.Path | None) -> dict[str, epath.Path]:
    """The rating, item and user files, and the encoder cache of the config's modalities
    (a re-encoded cache makes the build stale)."""
    files = {f"ml-100k/{name}": raw.require(manual_dir, f"ml-100k/{name}")
             for name in ("u.data", "u.item", "u.user", "u.occupation")}
    if self.builder_config.tmdb_numeric:
      files |= {name: raw.require(manual_dir, name) for name in raw.tmdb_files()}
    encoded = self.encoded_dir(manual_dir)
    for name in self.builder_config.modalities:
      for suffix in ("", "_ids"):
        path = encoded / f"{name}{suffix}.npy"
        if not path.exists():
          raise MissingFileError(
              f"missing {path}: run `python -m data.movielens_100k_mm.encode_items "
              f"--manual_dir=... --output_dir={encoded}` first (needs the `encoders` extra)")
        files[f"encoded/{name}{suffix}.npy"] = path
    return files

  def _prepare(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir)
    ratings, items, users = raw.read_ratings(root), raw.read_items(root), raw.read_users(root)
    num_items, num_users = len(items.title), len(users.age)
    if ratings.item.min() < 0 or ratings.item.max() >= num_items:
      raise DataError(f"u.data: item ids outside 1..{num_items} of u.item")
    if ratings.user.min() < 0 or ratings.user.max() >= num_users:
      raise DataError(f"u.data: user ids outside 1..{num_users} of u.user")

    years = items.year
    known = years > 0
    year_index = np.where(known, years - years[known].min() + 1, 0).astype(np.int32)
    max_genres = int((items.genres >= 0).sum(1).max())
    schema = FeatureSchema(
        num_items=num_items, item_id_dim=ID_DIM, seq_len=SEQ_LEN,
        item_features=(
            FeatureSpec("genres", raw.NUM_GENRES, FIELD_DIM, max_values=max_genres),
            FeatureSpec("year", int(year_index.max()) + 1, FIELD_DIM),
        ),
        user_features=USER_FIELDS,
    )
    modalities = {}
    encoded = self.encoded_dir(root)
    for name in self.builder_config.modalities:
      modalities[name] = read_modality(encoded, name, num_items)
    schema = schema.replace(
        modalities=tuple(ModalitySpec(k, v.shape[1]) for k, v in modalities.items())
    )
    side = {"genres": items.genres[:, :max_genres], "year": year_index}
    if "image" in modalities:  # items without a poster: zero vector plus this flag
      side["image_missing"] = (~modalities["image"].any(axis=1)).astype(np.int32)
      schema = schema.replace(
          item_features=schema.item_features + (FeatureSpec("image_missing", 2, FIELD_DIM),)
      )
    numeric = {}
    if self.builder_config.tmdb_numeric:  # normalisations fitted on the training examples
      numeric = raw.read_tmdb_numeric(root, num_items)
      _, item_counts = numeric_lib.train_counts(ratings.user, ratings.item, ratings.timestamp,
                                                num_users, num_items, self.builder_config.split)
      schema = schema.replace(item_numeric=tuple(
          numeric_lib.fit(NumericSpec(c, normalization), numeric[c], item_counts)
          for _, c, normalization in raw.TMDB_NUMERIC))
    catalog = ItemCatalog(side=side, modalities=modalities, numeric=numeric)
    user_table = {
        "user_id": np.arange(num_users, dtype=np.int32), "age": raw.age_bucket(users.age),
        "gender": users.gender, "occupation": users.occupation,
    }
    splits = sequences.examples_from_events(
        ratings.user, ratings.item, ratings.timestamp, (ratings.rating >= 4).astype(np.int32),
        user_table, SEQ_LEN, split=self.builder_config.split,
    )
    return schema, catalog, splits
