"""Strict JSON for the files a run writes: no bare `NaN` or `Infinity`, whole or absent.

Python's `json` writes NaN and Infinity as bare words that strict readers (JavaScript, jq,
most JSON libraries) refuse. Here a non-finite float becomes `null` (a metric that does not
exist, such as the AUC of a subset with one class), and `write_json` writes a temporary file
and renames it over the target, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from etils import epath


def strict(value):
  """`value` with every non-finite float (NaN, +-inf) replaced by None, numpy scalars as
  Python numbers; containers are copied."""
  if isinstance(value, dict):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def dumps(value, **kwargs) -> str:
  """`json.dumps` of `strict(value)` (never a bare NaN)."""
  return json.dumps(strict(value), allow_nan=False, **kwargs)


def write_json(path: epath.PathLike, value) -> None:
  """`value` as strict JSON at `path`, atomically (a temporary file renamed over it)."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp"
  tmp.write_text(dumps(value, indent=2))
  os.replace(tmp, path)  # atomic, overwrites
