"""Readers of the raw MovieLens-100K + TMDB files, with errors that name the file and line.

Dense indices: item index = MovieLens movie id - 1 (1,682 items), user index = user id - 1.
"""

from __future__ import annotations

import csv
import dataclasses
import re

import numpy as np
from etils import epath

from dmf_jax.core.errors import DataError, MissingFileError

LAYOUT = """expected layout of the MovieLens-100K multimodal folder:
  ml-100k/u.data        user \\t item \\t rating \\t unix_ts
  ml-100k/u.item        id|title (year)|release date|video date|url|19 genre flags  (latin-1)
  ml-100k/u.user        id|age|gender|occupation|zip
  ml-100k/u.occupation  one occupation per line
  tmdb/items_tmdb.csv   movie_id,title,...,overview,...  (UTF-8; text modality)
  posters_w92/<id>.jpg  poster thumbnails (image modality)"""

NUM_GENRES = 19
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M style age buckets: 7 buckets
GENRE_NAMES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)


def require(root: epath.Path, relative: str) -> epath.Path:
  path = epath.Path(root) / relative
  if not path.exists():
    raise MissingFileError(f"missing file {path}\n{LAYOUT}")
  return path


@dataclasses.dataclass(frozen=True)
class Ratings:
  user: np.ndarray  # int32 [n] dense user index
  item: np.ndarray  # int32 [n] dense item index
  rating: np.ndarray  # int32 [n] 1..5
  timestamp: np.ndarray  # int64 [n]


def read_ratings(root) -> Ratings:
  path = require(root, "ml-100k/u.data")
  users, items, ratings, stamps = [], [], [], []
  for line_no, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split("\t")
    try:
      if len(parts) != 4:
        raise ValueError(f"expected 4 tab-separated fields, got {len(parts)}")
      u, i, r, t = (int(p) for p in parts)
      if not 1 <= r <= 5:
        raise ValueError(f"rating {r} not in 1..5")
    except ValueError as e:
      raise DataError(f"{path}:{line_no}: malformed rating row {line!r}: {e}") from None
    users.append(u - 1); items.append(i - 1); ratings.append(r); stamps.append(t)
  return Ratings(np.asarray(users, np.int32), np.asarray(items, np.int32),
                 np.asarray(ratings, np.int32), np.asarray(stamps, np.int64))


@dataclasses.dataclass(frozen=True)
class Items:
  title: list[str]
  genres: np.ndarray  # int32 [num_items, NUM_GENRES] genre ids padded with -1
  year: np.ndarray  # int32 [num_items], 0 = unknown


def read_items(root) -> Items:
  path = require(root, "ml-100k/u.item")
  text = path.read_bytes().decode("latin-1")
  rows = [line for line in text.splitlines() if line.strip()]
  titles, genres, years = [], [], []
  for line_no, line in enumerate(rows, 1):
    parts = line.split("|")
    if len(parts) != 5 + NUM_GENRES or int(parts[0]) != line_no:
      raise DataError(f"{path}:{line_no}: malformed item row (want {5 + NUM_GENRES} fields, "
                       f"ids 1..n in order): {line[:80]!r}")
    titles.append(parts[1])
    flags = np.asarray([int(f) for f in parts[5:]], bool)
    ids = np.flatnonzero(flags)
    genres.append(np.pad(ids, (0, NUM_GENRES - len(ids)), constant_values=-1))
    match = re.search(r"(\d{4})$", parts[2].strip())
    years.append(int(match.group(1)) if match else 0)
  return Items(titles, np.asarray(genres, np.int32), np.asarray(years, np.int32))


@dataclasses.dataclass(frozen=True)
class Users:
  age: np.ndarray  # int32 [num_users], raw age
  gender: np.ndarray  # int32 [num_users], 0 = F, 1 = M
  occupation: np.ndarray  # int32 [num_users]
  occupations: list[str]


def read_users(root) -> Users:
  occ_path = require(root, "ml-100k/u.occupation")
  occupations = [o.strip() for o in occ_path.read_text().splitlines() if o.strip()]
  path = require(root, "ml-100k/u.user")
  ages, genders, occs = [], [], []
  for line_no, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split("|")
    try:
      if len(parts) != 5 or int(parts[0]) != line_no:
        raise ValueError("want 5 fields and ids 1..n in order")
      if parts[2] not in ("F", "M"):
        raise ValueError(f"gender {parts[2]!r}")
      if parts[3] not in occupations:
        raise ValueError(f"occupation {parts[3]!r} not in u.occupation")
      ages.append(int(parts[1]))
    except ValueError as e:
      raise DataError(f"{path}:{line_no}: malformed user row {line!r}: {e}") from None
    genders.append(int(parts[2] == "M"))
    occs.append(occupations.index(parts[3]))
  return Users(np.asarray(ages, np.int32), np.asarray(genders, np.int32),
               np.asarray(occs, np.int32), occupations)


def age_bucket(age: np.ndarray) -> np.ndarray:
  return np.searchsorted(np.asarray(AGE_EDGES), age, side="right").astype(np.int32)


def read_overviews(root, num_items: int) -> dict[int, dict[str, str]]:
  """item index -> TMDB row (title, overview, ...); duplicated movie ids are dropped."""
  path = require(root, "tmdb/items_tmdb.csv")
  return {index: row for _, index, row in _movie_rows(path, num_items)}


def _movie_rows(path, num_items: int):
  """(line number, item index, row) of a TMDB CSV, the first row of each movie_id; a row
  without an integer movie_id in 1..num_items is an error naming the file and line."""
  seen = set()
  with path.open("r", encoding="utf-8") as f:
    for line_no, row in enumerate(csv.DictReader(f), 2):
      try:
        index = int(row["movie_id"]) - 1
      except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}:{line_no}: malformed row (no integer movie_id)") from None
      if not 0 <= index < num_items:
        raise DataError(f"{path}:{line_no}: movie_id {index + 1} is not in 1..{num_items}")
      if index not in seen:  # duplicated movie ids: the first row (they are identical)
        seen.add(index)
        yield line_no, index, row


# TMDB numeric fields: (file, column, normalisation). 0 means "unknown" in TMDB's records for
# runtime and budget (missing here); vote counts and popularity are heavy-tailed (log1p).
TMDB_NUMERIC = (
    ("tmdb/items_tmdb.csv", "runtime", "standard"),
    ("tmdb/items_tmdb.csv", "vote_average", "standard"),
    ("tmdb/items_tmdb.csv", "vote_count", "log1p"),
    ("tmdb/item_features_tmdb.csv", "popularity", "log1p"),
    ("tmdb/item_features_tmdb.csv", "budget", "log1p"),
)
ZERO_IS_MISSING = ("runtime", "budget")


def tmdb_files() -> tuple[str, ...]:
  return tuple(sorted({f for f, _, _ in TMDB_NUMERIC}))


def read_tmdb_numeric(root, num_items: int) -> dict[str, np.ndarray]:
  """TMDB numeric fields per item index: {column: float32 [num_items]}, NaN where TMDB has
  no value (no row, an empty cell, or 0 for runtime and budget). Values that are not finite
  numbers are errors naming the file and line."""
  out = {}
  for name in tmdb_files():
    path = require(root, name)
    columns = [c for f, c, _ in TMDB_NUMERIC if f == name]
    values = {c: np.full(num_items, np.nan, np.float32) for c in columns}
    for line_no, index, row in _movie_rows(path, num_items):
      for c in columns:
        text = (row.get(c) or "").strip()
        if not text:
          continue
        try:
          value = float(text)
        except ValueError:
          value = float("nan")
        if not np.isfinite(value):
          raise DataError(f"{path}:{line_no}: {c} {text!r} is not a finite number")
        if not (value == 0 and c in ZERO_IS_MISSING):
          values[c][index] = value
    out |= values
  return {c: out[c] for _, c, _ in TMDB_NUMERIC}


def item_text(items: Items, overviews: dict[int, dict[str, str]], index: int) -> str:
  """The text encoded for an item: 'title. genres. overview'."""
  genres = ", ".join(GENRE_NAMES[g] for g in items.genres[index] if g >= 0)
  overview = (overviews.get(index) or {}).get("overview") or ""
  return f"{items.title[index]}. {genres}. {overview}".strip()
