"""Mixed precision: parameters and optimizer state stay float32; the forward runs in the
model's `compute_dtype`.

With compute_dtype='bfloat16' the train step merges the model from `cast_params(params)`,
and evaluation and serving cast a merged working copy with `to_compute_dtype(model)`: the
float32 `nnx.Param`s become bfloat16 inside the jitted function (the cast is differentiated, so
gradients reach the float32 parameters as float32). Embedding lookups,
matmuls, attention and activations then run in bfloat16; logits (`PredictionHead`), losses,
softmax normalisation (`masked_softmax`), frozen cosines and metrics stay float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cast_floats(tree, dtype):
  """float32 leaves of `tree` -> `dtype` (other leaves unchanged)."""
  return jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, tree)


def cast_params(params, compute_dtype: str):
  """A State of Params in `compute_dtype` (before a merge: the train step's differentiated
  parameters, cast inside the differentiated function)."""
  dtype = COMPUTE_DTYPES[compute_dtype]
  return params if dtype == jnp.float32 else cast_floats(params, dtype)


def to_compute_dtype(model: nnx.Module, compute_dtype: str) -> nnx.Module:
  """Casts `model`'s float32 Params to `compute_dtype` in place and returns it.

  For a model merged inside a jitted function (a working copy, at the function's own trace
  level): never call it on a model you keep training, its parameters would stay cast."""
  dtype = COMPUTE_DTYPES[compute_dtype]
  if dtype != jnp.float32:
    nnx.update(model, cast_floats(nnx.state(model, nnx.Param), dtype))
  return model
