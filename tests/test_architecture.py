"""The package's import graph: layered, acyclic, self-contained (an AST walk, function-level
imports included).

  core < nn < models, data < train < serve

A module imports only its own subpackage and lower layers (models and data are peers that
never import each other); nothing imports the repository's top-level data/, experiments/ or
tests/; the exported scorer needs only jax, numpy, the standard library and serve/request.
"""

import ast
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "nn": 1, "models": 2, "data": 2, "train": 3, "serve": 4}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted((REPO / "dmf_jax").rglob("*.py"))}


def imports(path: pathlib.Path, known: set[str]) -> list[tuple[int, str]]:
  """(line, imported name) of every import in the file; `from a import b` counts as a.b when
  a.b is a module of the package, else as a."""
  out = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert not node.level, f"{path}:{node.lineno}: relative import"
      for a in node.names:
        full = f"{node.module}.{a.name}"
        out.append((node.lineno, full if full in known else node.module))
  return out


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {m: {name for _, name in imports(p, set(mods)) if name in mods and name != m}
          for m, p in mods.items()}


def layer(module: str) -> tuple[str, int] | None:
  parts = module.split(".")
  return (parts[1], LAYERS[parts[1]]) if len(parts) > 2 and parts[1] in LAYERS else None


def test_no_import_cycles():
  edges, cycles = graph(), []
  state = {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(edges[node]):
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for node in sorted(edges):
    if node not in state:
      visit(node, [node])
  assert not cycles, cycles


def test_no_module_imports_a_higher_layer_or_a_peer():
  bad = []
  for module, targets in graph().items():
    mine = layer(module)
    for target in targets:
      theirs = layer(target)
      if mine is None or theirs is None or mine[0] == theirs[0]:
        continue
      if theirs[1] >= mine[1]:
        bad.append(f"{module} ({mine[0]}) imports {target} ({theirs[0]})")
  assert not bad, bad


def test_subpackages_have_no_import_side_effects():
  """Subpackage __init__ files only document (importing dmf_jax.models.din does not build the
  registry); dmf_jax.data's is the data API (prepare), which imports its builders."""
  for sub in ("core", "nn", "models", "train", "serve"):
    tree = ast.parse((REPO / "dmf_jax" / sub / "__init__.py").read_text())
    assert all(isinstance(n, ast.Expr) for n in tree.body), sub


def test_the_package_never_imports_the_repository_folders():
  """No module of dmf_jax imports the top-level data/, experiments/ or tests/: they are not
  installed."""
  mods = modules()
  offenders = [f"{p.relative_to(REPO)}:{line}: {name}" for m, p in mods.items()
               for line, name in imports(p, set(mods))
               if name.split(".")[0] in ("data", "experiments", "tests")]
  assert not offenders, offenders


def test_the_exported_scorer_needs_only_jax_numpy_and_the_request_module():
  """exported.py, and what it imports from the package (transitively): jax, numpy, the
  standard library, serve/request and core/hashing only."""
  package = {"dmf_jax.serve.request", "dmf_jax.core.hashing"}
  allowed = {"jax", "numpy", "__future__"} | package | set(sys.stdlib_module_names)
  todo, seen = [REPO / "dmf_jax" / "serve" / "exported.py"], set()
  while todo:
    path = todo.pop()
    names = {name for _, name in imports(path, set(modules()))}
    extra = sorted(n for n in names if n not in allowed and n.split(".")[0] not in allowed)
    assert not extra, (path.name, extra)
    for name in sorted(names & package - seen):
      seen.add(name)
      todo.append(REPO / (name.replace(".", "/") + ".py"))
  assert seen == package


def test_the_walk_sees_function_level_imports(tmp_path):
  """The checker is not vacuous: an import inside a function is found."""
  path = tmp_path / "m.py"
  path.write_text("def f():\n  from dmf_jax.train import loop\n")
  assert imports(path, {"dmf_jax.train.loop"}) == [(2, "dmf_jax.train.loop")]


def closure(start: str) -> set[str]:
  """The package modules `start` imports, transitively (itself included)."""
  edges, seen, todo = graph(), {start}, [start]
  while todo:
    for nxt in edges[todo.pop()] - seen:
      seen.add(nxt)
      todo.append(nxt)
  return seen


def test_serving_needs_neither_the_training_loop_nor_the_input_pipeline():
  """serve reads a run back through train.restore: no train.loop, no Grain, transitively."""
  mods = modules()
  for name in [m for m in mods if m.startswith("dmf_jax.serve")]:
    reached = closure(name)
    assert "dmf_jax.train.loop" not in reached and "dmf_jax.data.pipeline" not in reached, name
    grain = [m for m in reached for _, n in imports(mods[m], set(mods)) if n.split(".")[0] == "grain"]
    assert not grain, (name, grain)
  assert "dmf_jax.train.restore" in closure("dmf_jax.serve.server")
  assert "dmf_jax.train.loop" in closure("dmf_jax.train.ablation")  # the check is not vacuous


def test_a_data_module_imports_without_the_builders():
  """`import dmf_jax.data.synthetic` (or format) loads no dataset builder and not TFDS; the
  registry's names on `dmf_jax.data` load them on first use."""
  import subprocess
  code = ("import sys, dmf_jax.data.synthetic, dmf_jax.data.format\n"
          "builders = ('dmf_jax.data.builds', 'dmf_jax.data.movielens', 'dmf_jax.data.byod',"
          " 'dmf_jax.data.generated')\n"
          "assert not [m for m in builders if m in sys.modules], sys.modules.keys()\n"
          "assert not [m for m in sys.modules if m.startswith('tensorflow_datasets')]\n"
          "from dmf_jax import data\n"
          "assert 'generated_ctr' in data.BUILDERS and callable(data.prepare)\n"
          "assert all(m in sys.modules for m in builders)\n"
          "try:\n  data.no_such_name\nexcept AttributeError as e:\n  print(e)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert out.returncode == 0, out.stderr
  assert "module 'dmf_jax.data' has no attribute 'no_such_name'" in out.stdout


# Tests mirror the package: dmf_jax/<sub>/<module>.py is tested in tests/<sub>/test_<module>.py.
# These are tested in a file of another name: the name is taken (pytest needs distinct test
# file names), or the module is exercised as part of a larger path.
TESTED_UNDER_ANOTHER_NAME = {
    "dmf_jax.cli": "tests/experiments/test_cli.py",  # the binaries' error wrapper, via each binary
    "dmf_jax.core.locking": "tests/train/test_runs.py",  # one run per workdir
    "dmf_jax.core.sharding": "tests/nn/test_embedding.py",  # sharded tables and gathers
    "dmf_jax.data.builds": "tests/data/test_data_builds.py",  # test_builds: too generic a name
    "dmf_jax.data.columnar": "tests/data/test_streamed_builds.py",
    "dmf_jax.data.common": "tests/data/test_streamed_builds.py",  # local and Beam builds alike
    "dmf_jax.data.format": "tests/data/test_pipeline.py",  # records written, parsed, batched
    "dmf_jax.data.generated": "tests/data/test_data_builds.py",
    "dmf_jax.data.movielens_raw": "tests/data/test_movielens.py",
    "dmf_jax.data.numeric": "tests/data/test_numeric_data.py",  # test_numeric: nn.numeric's
    "dmf_jax.data.partitions": "tests/data/test_streamed_builds.py",
    "dmf_jax.data.synthetic": "tests/data/test_sequences.py",
    "dmf_jax.models.din": "tests/models/test_registry.py",
    "dmf_jax.nn.precision": "tests/models/test_precision.py",  # bfloat16 models end to end
    "dmf_jax.serve.exported": "tests/serve/test_export.py",
    "dmf_jax.train.restore": "tests/train/test_runs.py",
    "dmf_jax.train.writers": "tests/train/test_loop.py",
}
WITHOUT_LOGIC = {"dmf_jax", "dmf_jax.core.errors"}  # re-exports; exception classes


def test_every_module_has_its_tests():
  """A module with logic has tests/<sub>/test_<module>.py, or is listed above with the file
  that tests it (which names it)."""
  missing = []
  for name in modules():
    parts = name.split(".")
    if name in WITHOUT_LOGIC or (REPO / "/".join(parts) / "__init__.py").exists():
      continue
    own = REPO / "tests" / "/".join(parts[1:-1]) / f"test_{parts[-1]}.py"
    other = TESTED_UNDER_ANOTHER_NAME.get(name)
    if own.exists():
      assert other is None, f"{name} has {own.relative_to(REPO)}: drop it from the list"
      continue
    path = REPO / other if other else None
    if path is None or not path.exists() or not (
        parts[-1] in path.name or parts[-1] in path.read_text()):
      missing.append(f"{name}: no {own.relative_to(REPO)}"
                     + (f" and {other} does not name it" if other else ""))
  assert not missing, "\n".join(missing)
