"""GRU and DIEN's attention-update GRU (AUGRU) over masked sequences: a `lax.scan` with a
hand-written backward scan (`jax.custom_vjp`), time-major inside."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core.sharding import contract_leading
from dmf_jax.nn.layers import Linear

Gates = tuple[jax.Array, jax.Array, jax.Array]


class GRU(nnx.Module):
  """A GRU over x [..., L, D_in] with mask bool [..., L] -> hidden states [..., L, H]:

    r_t = sigmoid(W_r x_t + U_r h_{t-1} + b_r),  u_t = sigmoid(W_u x_t + U_u h_{t-1} + b_u)
    c_t = tanh(W_c x_t + r_t * (U_c h_{t-1}) + b_c)
    h_t = (1 - u_t') * h_{t-1} + u_t' * c_t,  u_t' = a_t * u_t (AUGRU, attention a [..., L]);
                                               u_t' = u_t (GRU)

  from h_0 = 0; where mask is False the state is carried unchanged (h_t = h_{t-1}), so with
  right-padded sequences the last state is that of the last valid step.

  The input side (W x_t + b) of every step is computed before the recurrence (`project`,
  `project_gates`: once per item row, or once for all candidates); the recurrence itself
  (`recur_time_major`) runs time-major [L, ..., H] with one array per gate.
  """

  def __init__(self, in_dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.hidden = hidden
    self.inputs = Linear(in_dim, 3 * hidden, rngs=rngs)  # [W_r, W_u, W_c] and biases
    self.recurrent = Linear(hidden, 3 * hidden, use_bias=False, rngs=rngs)  # [U_r, U_u, U_c]

  def __call__(self, x: jax.Array, mask: jax.Array, attention: jax.Array | None = None
               ) -> jax.Array:
    return self.recur(self.project(x), mask, attention)

  def project(self, x: jax.Array) -> jax.Array:
    """The input side of every step at once: x [..., D_in] -> [W_r x ; W_u x ; W_c x] + b
    [..., 3H] (row-wise: shared by every candidate when x is)."""
    return self.inputs(x)

  def project_gates(self, x: jax.Array) -> Gates:
    """`project` split by gate: x [..., D_in] -> 3 x [..., H] (W_r x + b_r, W_u x + b_u,
    W_c x + b_c)."""
    return tuple(jnp.split(self.project(x), 3, axis=-1))

  def recur(self, xs: jax.Array, mask: jax.Array, attention: jax.Array | None = None
            ) -> jax.Array:
    """The recurrence over projected inputs xs [..., L, 3H] -> hidden states [..., L, H]
    (batch-major: `recur_time_major` between two transposes)."""
    time_axis = mask.ndim - 1
    time_major = lambda a: jnp.moveaxis(a, time_axis, 0)
    hs = self.recur_time_major(
        tuple(time_major(g) for g in jnp.split(xs, 3, axis=-1)), time_major(mask),
        None if attention is None else time_major(attention))
    return jnp.moveaxis(hs, 0, time_axis)

  def recur_time_major(self, gates: Gates, mask: jax.Array,
                       attention: jax.Array | None = None) -> jax.Array:
    """The recurrence over time-major inputs: gates 3 x [L, ..., H] (the input sides of r, u,
    c), mask bool [L, ...], attention [L, ...] or None -> hidden states [L, ..., H]."""
    return _recurrence(self.recurrent.kernel[...], tuple(gates), mask, attention)


# ---------------------------------------------------------------------------------------------
# The recurrence, forward and backward
#
# Autodiff of the scan is correct but slow on XLA:CPU: per step it stacks many residuals and
# runs several small fusions, and a gate's columns sliced out of a [..., 3H] input row inside
# the loop stop the elementwise fusion from vectorising (~8x slower). Here each gate's input
# side is its own array; a step's recurrent products are one [..., H] @ [H, 3H] product
# (U = [U_r, U_u, U_c]: on XLA:CPU one product of three times the width costs about half of
# three, 83 against 3 x 58 us for 512 rows, H = 56), saved as one [L, ..., 3H] stack beside the
# states; the backward step is one elementwise pass and one [..., 3H] @ [3H, H] product back
# through U, and the gradient of U is one [3H]-wide product over all steps after the loop.
# Tests compare both passes with a float64 reference.
# ---------------------------------------------------------------------------------------------


def _gates(xr, xu, xc, hr, hu, hc, a):
  """A step's gates from its input sides x_g and its recurrent products h_g = U_g h_{t-1}
  (the three thirds of h_{t-1} U): r, the update gate before the attention z, u' = a z (z for
  a GRU), and c."""
  r = jax.nn.sigmoid(xr + hr)
  z = jax.nn.sigmoid(xu + hu)
  u = z if a is None else z * a[..., None]
  return r, z, u, jnp.tanh(xc + r * hc)


def _scan_forward(kernel, gates, mask, attention):
  """hs [L, ..., H] and the stacked recurrent products [L, ..., 3H]."""
  h0 = jnp.zeros_like(gates[0][0], dtype=jnp.result_type(gates[0], kernel))  # [..., H]

  def step(h, inputs):
    xr, xu, xc, m, a = inputs
    products = h @ kernel  # [..., 3H]
    _, _, u, c = _gates(xr, xu, xc, *jnp.split(products, 3, axis=-1), a)
    new = jnp.where(m[..., None], (1 - u) * h + u * c, h)
    return new, (new, products)

  _, (hs, products) = jax.lax.scan(step, h0, (*gates, mask, attention))
  return hs, products


@jax.custom_vjp
def _recurrence(kernel, gates, mask, attention):
  return _scan_forward(kernel, gates, mask, attention)[0]


def _recurrence_fwd(kernel, gates, mask, attention):
  hs, products = _scan_forward(kernel, gates, mask, attention)
  return hs, (kernel, gates, mask, attention, hs, products)


def _recurrence_bwd(residuals, d_hs):
  """Reverse-time accumulation of dL/dh_{t-1}; per step, with n_t = (1 - u') h + u' c:

    dn = m dh,  du' = dn (c - h),  dc~ = dn u' (1 - c^2)     (c~ = c's pre-activation = dx_c)
    dr~ = dc~ (U_c h) r (1 - r) = dx_r,  du~ = du' a u (1 - u) = dx_u,  da = sum du' u
    dh_{t-1} = dh (1 - m u') + [dr~ ; du~ ; dc~ r] U^T
  and dU = sum_t h_{t-1}^T [dr~ ; du~ ; dc~ r] after the loop."""
  kernel, gates, mask, attention, hs, products = residuals
  # h_{t-1} for every t: the states shifted by one step, zero first
  prev = jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]], axis=0)

  def step(dh, inputs):
    xr, xu, xc, m, a, h, p, dy = inputs
    dh = dh + dy
    hr, hu, hc = jnp.split(p, 3, axis=-1)
    r, z, u, c = _gates(xr, xu, xc, hr, hu, hc, a)
    dn = jnp.where(m[..., None], dh, 0)
    du = dn * (c - h)
    dxc = dn * u * (1 - c * c)
    dxr = dxc * hc * r * (1 - r)
    dz = du if a is None else du * a[..., None]
    dxu = dz * z * (1 - z)
    da = None if a is None else jnp.sum(du * z, axis=-1)
    d_products = jnp.concatenate([dxr, dxu, dxc * r], axis=-1)  # d(U h_{t-1}) [..., 3H]
    return dh - dn * u + d_products @ kernel.T, (d_products, dxc, da)

  _, (d_products, dxc, da) = jax.lax.scan(
      step, jnp.zeros_like(hs[0]), (*gates, mask, attention, prev, products, d_hs),
      reverse=True)
  # dU = sum over steps and positions of h_{t-1} (outer) d(h_{t-1} U): one product
  d_kernel = contract_leading(prev, d_products).astype(kernel.dtype)
  dxr, dxu, _ = jnp.split(d_products, 3, axis=-1)
  d_gates = tuple(d.astype(g.dtype) for d, g in zip((dxr, dxu, dxc), gates))
  d_attention = None if attention is None else da.astype(attention.dtype)
  return d_kernel, d_gates, None, d_attention


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
