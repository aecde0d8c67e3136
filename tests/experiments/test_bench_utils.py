"""The benchmarks' FLOP count (`experiments.bench_utils.matmul_flops`): a matrix product's
2 x output x contracted size, a scan's body times its length, a cond's larger branch, inside
jit and through the gradient."""

import jax
import jax.numpy as jnp

from experiments import bench_utils


def test_matmul_flops_counts_products_through_scans_conds_and_gradients():
  h, w = jnp.ones((8, 4)), jnp.ones((4, 4))
  step = 2 * 8 * 4 * 4  # one [8, 4] @ [4, 4]

  def scan(h, w):
    return jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), h, None, length=5)[0].sum()

  assert bench_utils.matmul_flops(scan, h, w) == (5 * step, False)
  assert bench_utils.matmul_flops(jax.jit(scan), h, w)[0] == 5 * step
  # reverse mode adds dh and dw per step: three products a step
  assert bench_utils.matmul_flops(jax.grad(scan, argnums=(0, 1)), h, w)[0] == 15 * step

  def cond(h, w):
    return jax.lax.cond(h.sum() > 0, lambda: (h @ w @ w).sum(), lambda: (h @ w).sum())

  assert bench_utils.matmul_flops(cond, h, w)[0] == 2 * step
  loop = lambda h, w: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1),
                                         (h, 0))[0]
  assert bench_utils.matmul_flops(loop, h, w) == (step, True)  # a while loop: once, flagged
