"""experiments/colab_tpu.ipynb runs top to bottom as shipped, in a Jupyter kernel (nbclient),
on CPU with a tiny config (its settings read from the environment); dmf_jax is installed, so
its install cell has nothing to do."""

import json
import os
import pathlib

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_the_notebook_runs_as_shipped(tmp_path, monkeypatch):
  settings = {"DMF_COLAB_DATASET": "tiny", "DMF_COLAB_STEPS": "8",
              "DMF_COLAB_BATCH_PER_DEVICE": "4", "DMF_COLAB_WORKDIR": str(tmp_path / "run"),
              "DMF_COLAB_DATA_DIR": str(tmp_path / "data"),
              "DMF_SOURCE": str(tmp_path / "not_needed"),  # installed: never read
              "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  for key, value in settings.items():
    monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
  notebook = nbformat.read(REPO / "experiments" / "colab_tpu.ipynb", as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  text = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.outputs)
  assert "8 devices: cpu, 1 process(es)" in text
  assert "dmf tiny global batch 32" in text  # 4 per device x 8 fake CPU devices
  assert "validation  AUC" in text and "test        AUC" in text
  images = [out for out in notebook.cells[-1].outputs if "image/png" in out.get("data", {})]
  assert len(images) == 1  # the curves
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["steps"] == 8 and 0.0 <= results["test"]["auc"] <= 1.0
  assert os.path.exists(tmp_path / "run" / "curves.png")
