"""experiments/colab_tpu.ipynb: every code cell runs on CPU (shell and magic lines left out)."""

import json
import os
import pathlib
import sys
import types

REPO = pathlib.Path(__file__).resolve().parents[2]


def code_cells():
  notebook = json.loads((REPO / "experiments" / "colab_tpu.ipynb").read_text())
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      lines = [l for l in "".join(cell["source"]).splitlines() if not l.lstrip().startswith(("!", "%"))]
      yield "\n".join(lines)


def test_notebook_code_cells_run_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv("DMF_COLAB_DATASET", "tiny")
  monkeypatch.setenv("DMF_COLAB_STEPS", "8")
  monkeypatch.setenv("DMF_COLAB_BATCH_PER_DEVICE", "4")
  monkeypatch.setenv("DMF_COLAB_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("DMF_COLAB_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.chdir(REPO)
  shown = []
  display = types.ModuleType("IPython.display")
  display.Image = lambda filename: filename
  display.display = shown.append
  namespace = {}
  for source in code_cells():
    if "IPython" in source:  # Colab's display: stubbed only for that cell (not installed here)
      package = types.ModuleType("IPython")
      package.__path__ = []
      monkeypatch.setitem(sys.modules, "IPython", package)
      monkeypatch.setitem(sys.modules, "IPython.display", display)
    exec(compile(source, "colab_tpu.ipynb", "exec"), namespace)  # pylint: disable=exec-used
  results = namespace["results"]
  assert results["steps"] == 8 and 0.0 <= results["test"]["auc"] <= 1.0
  assert namespace["config"].batch_size == 4 * 8  # 8 fake CPU devices on the data axis
  assert shown == [os.path.join(str(tmp_path / "run"), "curves.png")]
  assert (tmp_path / "run" / "curves.png").exists()
