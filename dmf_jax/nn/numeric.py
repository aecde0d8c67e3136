"""Numeric (dense) features: a normalised value and a missing flag, or a bucket embedding.

`NumericFeature(spec)` maps values float [...] (NaN = missing) to [..., spec.width] with the
statistics fitted on the training split and held in the spec (`core.schema.NumericSpec`):
  scalar normalisations  [z ; m], z = clip((t(x) - center) / scale, -CLIP, CLIP) or 0 where
                         missing, m = 1 where missing else 0
  bucketize              table[searchsorted(boundaries, x, 'right')] [dim]; a missing value
                         reads the table's OOV row (its own trained row)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dmf_jax.core.schema import NumericSpec
from dmf_jax.nn.embedding import EmbeddingTable


def transformed(spec: NumericSpec, x: jnp.ndarray) -> jnp.ndarray:
  """t(x): sign(x) log1p(|x|) for 'log1p', else x."""
  if spec.normalization == "log1p":
    return jnp.sign(x) * jnp.log1p(jnp.abs(x))
  return x


class NumericFeature(nnx.Module):
  """One numeric field: float [...] -> float32 [..., spec.width] (see the module docstring)."""

  def __init__(self, spec: NumericSpec, *, rngs: nnx.Rngs):
    self.spec = spec
    if spec.bucketized:
      self.buckets = EmbeddingTable(len(spec.boundaries) + 1, spec.dim, rngs=rngs,
                                    name=f"{spec.name} buckets")

  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    spec = self.spec
    x = jnp.asarray(x, jnp.float32)
    missing = jnp.isnan(x)
    if spec.bucketized:
      bucket = jnp.searchsorted(jnp.asarray(spec.boundaries, jnp.float32), x, side="right")
      return self.buckets.lookup(jnp.where(missing, self.buckets.oov_index, bucket))
    z = (transformed(spec, jnp.where(missing, 0.0, x)) - spec.center) / spec.scale
    z = jnp.where(missing, 0.0, jnp.clip(z, -spec.CLIP, spec.CLIP))
    return jnp.stack([z, missing.astype(jnp.float32)], axis=-1)


class NumericFeatures(nnx.Module):
  """Fields in schema order -> their outputs concatenated: values {name: [...]} ->
  [..., sum of widths] (width 0 without fields)."""

  def __init__(self, specs: tuple[NumericSpec, ...], *, rngs: nnx.Rngs):
    self.names = tuple(s.name for s in specs)  # schema order (an nnx.Dict's is not kept)
    self.fields = nnx.Dict({s.name: NumericFeature(s, rngs=rngs) for s in specs})

  def __call__(self, values) -> list[jnp.ndarray]:
    """The fields' outputs, in schema order (a list, to concatenate with other parts)."""
    return [self.fields[name](values[name]) for name in self.names]
