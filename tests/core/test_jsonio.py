"""Strict JSON (`core.jsonio`): no bare NaN, written whole."""

import json
import math

import numpy as np

from dmf_jax.core import jsonio


def test_strict_json_writes_no_bare_nan(tmp_path):
  value = {"auc": float("nan"), "cold": {"auc": np.float32("inf"), "count": np.int64(3)},
           "list": [1.5, -math.inf], "ok": 0.75}
  jsonio.write_json(tmp_path / "r.json", value)
  text = (tmp_path / "r.json").read_text()
  assert "NaN" not in text and "Infinity" not in text
  assert json.loads(text) == {"auc": None, "cold": {"auc": None, "count": 3},
                              "list": [1.5, None], "ok": 0.75}
  assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
