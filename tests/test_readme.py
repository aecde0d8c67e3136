"""README's Python snippets run as written (paths under /tmp moved to a test folder)."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]


def snippet(heading: str) -> str:
  """The first ```python block after `heading` in README.md."""
  readme = (REPO / "README.md").read_text()
  after = readme[readme.index(heading):]
  return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_public_api_snippet_runs_as_written(tmp_path):
  code = snippet("## Public API").replace('"/tmp/', f'"{tmp_path}/')
  code = code.replace("config.dataset_config = \"tiny\"",
                      f"config.dataset_config = \"tiny\"\nconfig.data_dir = \"{tmp_path}/data\"\n"
                      "config.num_train_steps = 20; config.eval_every_steps = 10\n"
                      "config.progress = False")
  scope = {}
  exec(compile(code, "README.md (Public API)", "exec"), scope)  # pylint: disable=exec-used
  assert 0.0 <= scope["results"]["test"]["auc"] <= 1.0
  assert scope["metrics"]["step"] == scope["results"]["best_step"]
  assert scope["model"].schema.num_items == scope["built"].schema.num_items
  assert (tmp_path / "tiny.dmfx").exists()
