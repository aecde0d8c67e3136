"""The serving tests' shared fixture: one exported tiny DMF."""

import pytest

from dmf_jax.serve import server as serving
from dmf_jax.serve.export import export
from helpers import serving_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(path of an exported tiny DMF, its Server)."""
  server = serving.Server(serving_model("dmf", seed=5), candidate_sizes=(8,))
  path = tmp_path_factory.mktemp("export") / "model.dmfx"
  export(server, str(path))
  return path, server
