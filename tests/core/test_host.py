"""`core.host`: XLA:CPU executions stop page-faulting on fresh pages (malloc reusing freed
memory, or asking for huge pages), and a binary re-executes itself with huge pages."""

import os
import pathlib
import platform
import subprocess
import sys

import pytest

from dmf_jax.core import host

REPO = pathlib.Path(__file__).resolve().parents[2]

# A program whose every execution allocates a large temporary (the sort's copy of 36 MiB):
# the page faults per execution, with or without the allocator setting.
PROGRAM = """
import resource, sys
from dmf_jax.core import host
applied = host.reuse_freed_memory() if sys.argv[1] == "reuse" else None
import jax, jax.numpy as jnp
x = jnp.arange(9 << 20, dtype=jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.sort(-x)[::2]))
jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  jax.block_until_ready(f(x))
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def faults_per_execution(mode, tunables=None):
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=REPO, capture_output=True,
                       text=True, env=env)
  assert out.returncode == 0, out.stderr
  applied, faults = out.stdout.split()
  return applied, float(faults)


def test_reusing_freed_memory_cuts_the_page_faults_of_each_execution():
  """On glibc the setting applies, and an execution that allocates a 36 MiB temporary takes
  a fraction of the page faults it takes with glibc's defaults (its pages are reused)."""
  assert platform.libc_ver()[0] == "glibc"  # this test's premise (Linux CI)
  plain_applied, plain = faults_per_execution("plain")
  reuse_applied, reuse = faults_per_execution("reuse")
  assert (plain_applied, reuse_applied) == ("None", "True")
  assert plain > 9_000  # the 36 MiB temporary alone is 9,216 fresh pages
  assert reuse < plain / 3, (plain, reuse)


def test_huge_pages_cut_the_page_faults_of_each_execution():
  """Where the kernel lends huge pages on request (this test's premise: Linux CI, glibc >=
  2.35, THP in madvise mode), malloc's hugetlb tunable cuts the 36 MiB temporary's faults."""
  assert host._glibc_version() >= (2, 35) and host._thp_mode() == "madvise"
  _, plain = faults_per_execution("plain")
  _, huge = faults_per_execution("plain", tunables=host.HUGE_PAGES_TUNABLE)
  assert plain > 9_000
  assert huge < plain / 10, (plain, huge)


BINARY = ["/venv/bin/python", "-m", "experiments.train", "--config=c.py"]
GOOD = dict(argv0="-m", package="experiments", environ={"HOME": "/h"}, glibc=(2, 36),
            thp_mode="madvise")


def decide(orig_argv=BINARY, **changes):
  return host.huge_pages_environment(orig_argv, **(GOOD | changes))


def test_a_binary_is_restarted_with_the_tunable_and_its_environment_kept():
  assert decide() == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  env = decide(environ={"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
  assert decide(glibc=(3, 0)) is not None
  assert decide(BINARY + ["--huge_pages", "--huge_pages=true", "--x=nohuge_pages"]) is not None


@pytest.mark.parametrize("case", [
    dict(orig_argv=BINARY + ["--nohuge_pages"]),
    dict(orig_argv=BINARY + ["--huge_pages=false"]),
    dict(orig_argv=BINARY + ["-huge_pages=F"]),
    dict(orig_argv=BINARY + ["-nohuge_pages"]),
    dict(environ={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}),  # the user's own choice
    dict(glibc=(2, 31)),  # no hugetlb tunable before 2.35
    dict(glibc=None),  # another C library
    dict(thp_mode="always"),  # the kernel already backs large regions with huge pages
    dict(thp_mode="never"),
    dict(thp_mode=None),
    dict(argv0="/venv/bin/pytest"),  # a module of the package imported later, e.g. by a test
    dict(orig_argv=["python", "-m", "pytest", "tests"]),
    dict(orig_argv=["python", "-m", "experimentsx.train"]),
    dict(orig_argv=["python", "-c", "import experiments.train"], argv0="-c"),
])
def test_no_restart_outside_a_binary_or_where_it_cannot_help(case):
  assert decide(**case) is None


def test_a_binary_started_with_python_m_runs_with_the_tunable(tmp_path):
  """The real re-execution, through a package whose `__init__` calls it as experiments' does;
  the binary sees the tunable, its arguments and the user's other tunables."""
  package = tmp_path / "somebins"
  package.mkdir()
  (package / "__init__.py").write_text(
      "from dmf_jax.core import host\nhost.start_with_huge_pages(__name__)\n")
  (package / "show.py").write_text(
      "import os, sys\nprint(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")

  def run(*args, tunables=None):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"}
    if tunables:
      env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-m", "somebins.show", *args], cwd=tmp_path,
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()

  assert run("--a=1") == "glibc.malloc.hugetlb=1 ['--a=1']"
  assert run("--nohuge_pages") == "None ['--nohuge_pages']"
  assert run(tunables="glibc.malloc.arena_max=4") == (
      "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 []")


def test_usable_cpus_is_the_affinity_set_or_the_machine_count(monkeypatch):
  assert 1 <= host.usable_cpus() <= (os.cpu_count() or 1)
  monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # as on macOS
  assert host.usable_cpus() == (os.cpu_count() or 1)
