"""`core.host.reuse_freed_memory`: XLA:CPU executions stop page-faulting on fresh pages."""

import pathlib
import platform
import subprocess
import sys

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


def faults_per_execution(mode):
  out = subprocess.run([sys.executable, "-c", PROGRAM, mode], cwd=REPO, capture_output=True,
                       text=True, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
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
