"""GRU and DIEN's attention-update GRU (AUGRU) over masked sequences, via `lax.scan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.nn.layers import Linear


class GRU(nnx.Module):
  """A GRU over x [..., L, D_in] with mask bool [..., L] -> hidden states [..., L, H]:

    r_t = sigmoid(W_r x_t + U_r h_{t-1} + b_r),  u_t = sigmoid(W_u x_t + U_u h_{t-1} + b_u)
    c_t = tanh(W_c x_t + r_t * (U_c h_{t-1}) + b_c)
    h_t = (1 - u_t') * h_{t-1} + u_t' * c_t,  u_t' = a_t * u_t (AUGRU, attention a [..., L]);
                                               u_t' = u_t (GRU)

  from h_0 = 0; where mask is False the state is carried unchanged (h_t = h_{t-1}), so with
  right-padded sequences the last state is that of the last valid step.
  """

  def __init__(self, in_dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.hidden = hidden
    self.inputs = Linear(in_dim, 3 * hidden, rngs=rngs)  # [W_r, W_u, W_c] and biases
    self.recurrent = Linear(hidden, 3 * hidden, use_bias=False, rngs=rngs)  # [U_r, U_u, U_c]

  def __call__(self, x: jax.Array, mask: jax.Array, attention: jax.Array | None = None
               ) -> jax.Array:
    return self.recur(self.project(x), mask, attention)

  def project(self, x: jax.Array) -> jax.Array:
    """The input side of every step at once: x [..., L, D_in] -> [W_r x ; W_u x ; W_c x] + b
    [..., L, 3H] (shared by every candidate when x is)."""
    return self.inputs(x)

  def recur(self, xs: jax.Array, mask: jax.Array, attention: jax.Array | None = None
            ) -> jax.Array:
    """The recurrence over projected inputs xs [..., L, 3H] -> hidden states [..., L, H]."""
    u_kernel = self.recurrent.kernel[...]
    gate = jnp.ones_like(mask, dtype=xs.dtype) if attention is None else attention
    h0 = jnp.zeros_like(xs[..., 0, : self.hidden])

    def step(h, inputs):
      xt, mt, at = inputs
      hr, hu, hc = jnp.split(h @ u_kernel, 3, axis=-1)
      xr, xu, xc = jnp.split(xt, 3, axis=-1)
      r = jax.nn.sigmoid(xr + hr)
      u = jax.nn.sigmoid(xu + hu) * at[..., None]
      c = jnp.tanh(xc + r * hc)
      new = (1 - u) * h + u * c
      new = jnp.where(mt[..., None], new, h)
      return new, new

    time_major = lambda a: jnp.moveaxis(a, mask.ndim - 1, 0)
    _, hs = jax.lax.scan(step, h0, (time_major(xs), time_major(mask), time_major(gate)))
    return jnp.moveaxis(hs, 0, mask.ndim - 1)
