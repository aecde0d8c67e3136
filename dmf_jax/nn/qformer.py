"""Fusion-Q-Former (EM3): any number of modality vectors -> one fixed-size item content embedding.

Each modality's vector is projected to `width` and tagged with a learned modality embedding;
`num_queries` trainable query tokens are put in front and the tokens go through pre-LayerNorm
transformer layers (self-attention over queries and present modalities, then an MLP); the query
outputs are flattened and projected to `out_dim`. Missing modalities (an all-zero vector, e.g.
no poster) and, in training, modality dropout are masked out as keys, so the output ignores them
and does not depend on where padding sits. All dense layers are `AdaptableLinear`, so LoRA
adapters can be attached (`dmf_jax.nn.lora`); `adapted=True` runs the frozen-base adapted path.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.nn import lora
from dmf_jax.nn.lora import AdaptableLinear


class SelfAttentionLayer(nnx.Module):
  """Pre-LN transformer layer: tokens [..., T, w], key mask [..., T] -> [..., T, w]."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int, dropout: float,
               *, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"Q-Former width {width} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.query = AdaptableLinear(width, width, rngs=rngs)
    self.key = AdaptableLinear(width, width, rngs=rngs)
    self.value = AdaptableLinear(width, width, rngs=rngs)
    self.out = AdaptableLinear(width, width, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = AdaptableLinear(width, mlp_ratio * width, rngs=rngs)
    self.fc2 = AdaptableLinear(mlp_ratio * width, width, rngs=rngs)
    self.dropout = nnx.Dropout(dropout) if dropout > 0 else None

  def _drop(self, x, train, rngs):
    if self.dropout is None or not train:
      return x
    return self.dropout(x, deterministic=False, rngs=rngs)

  def __call__(self, x, mask, *, adapted=False, train=False, rngs=None):
    *batch, t, w = x.shape
    h = self.norm1(x)
    split = lambda y: y.reshape(*batch, t, self.num_heads, w // self.num_heads)
    q = split(self.query(h, adapted=adapted))
    k = split(self.key(h, adapted=adapted))
    v = split(self.value(h, adapted=adapted))
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(w // self.num_heads)
    scores = jnp.where(mask[..., None, None, :], scores, -1e30)
    attended = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(scores, -1), v)
    x = x + self._drop(self.out(attended.reshape(*batch, t, w), adapted=adapted), train, rngs)
    h = jax.nn.gelu(self.fc1(self.norm2(x), adapted=adapted))
    return x + self._drop(self.fc2(h, adapted=adapted), train, rngs)


class FusionQFormer(nnx.Module):
  """K modality vectors [..., D_k] (+ present mask [..., K]) -> content embedding [..., out_dim]."""

  def __init__(
      self,
      modality_dims: Sequence[int],
      *,
      width: int = 32,
      num_queries: int = 2,
      num_layers: int = 1,
      num_heads: int = 2,
      mlp_ratio: int = 2,
      dropout: float = 0.0,
      modality_dropout: float = 0.0,
      out_dim: int = 32,
      rngs: nnx.Rngs,
  ):
    if not modality_dims:
      raise ValueError("FusionQFormer needs at least one modality")
    for name, value in dict(width=width, num_queries=num_queries, num_layers=num_layers,
                            num_heads=num_heads, mlp_ratio=mlp_ratio, out_dim=out_dim).items():
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"FusionQFormer: {name} must be a positive int, got {value!r}")
    if not 0.0 <= modality_dropout < 1.0 or not 0.0 <= dropout < 1.0:
      raise ValueError("FusionQFormer: dropout and modality_dropout must be in [0, 1)")
    self.modality_dims = tuple(modality_dims)
    self.modality_dropout = modality_dropout
    self.projections = nnx.List([AdaptableLinear(d, width, rngs=rngs) for d in modality_dims])
    init = nnx.initializers.normal(0.02)
    self.modality_embedding = nnx.Param(init(rngs.params(), (len(modality_dims), width)))
    self.queries = nnx.Param(init(rngs.params(), (num_queries, width)))
    self.layers = nnx.List([SelfAttentionLayer(width, num_heads, mlp_ratio, dropout, rngs=rngs)
                            for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.output = AdaptableLinear(num_queries * width, out_dim, rngs=rngs)
    self.out_dim = out_dim

  def modality_tokens(self, vectors: Sequence[jax.Array], *, adapted: bool = False) -> jax.Array:
    """K x [..., D_k] -> tokens [..., K, width] (projection + modality embedding)."""
    if len(vectors) != len(self.modality_dims):
      raise ValueError(f"FusionQFormer: got {len(vectors)} modality arrays, built for "
                       f"{len(self.modality_dims)}")
    for k, (v, d) in enumerate(zip(vectors, self.modality_dims)):
      checks.check_shape(f"FusionQFormer vectors[{k}]", v, (*v.shape[:-1], d))
    tokens = [p(v, adapted=adapted) for p, v in zip(self.projections, vectors)]
    return jnp.stack(tokens, axis=-2) + self.modality_embedding[...]

  def fuse_tokens(self, tokens: jax.Array, mask: jax.Array, *, adapted: bool = False,
                  train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """tokens [..., T, width], key mask [..., T] -> [..., out_dim]; masked tokens are ignored.

    (adapted=True here adds the adapters; `__call__` also freezes the other parameters.)
    """
    batch, num_queries = tokens.shape[:-2], self.queries.shape[0]
    # Built from the inputs so they carry the batch's sharding (explicit mesh axes).
    queries = self.queries[...] + jnp.zeros_like(tokens[..., :1, :])  # [..., Q, width]
    x = jnp.concatenate([queries, tokens], axis=-2)
    keys = jnp.concatenate([jnp.repeat(jnp.ones_like(mask[..., :1]), num_queries, -1), mask], -1)
    for layer in self.layers:
      x = layer(x, keys, adapted=adapted, train=train, rngs=rngs)
    out = self.norm(x[..., :num_queries, :]).reshape(*batch, -1)
    return self.output(out, adapted=adapted)

  def __call__(self, vectors: Sequence[jax.Array], present: jax.Array | None = None, *,
               adapted: bool = False, train: bool = False, rngs: nnx.Rngs | None = None
               ) -> jax.Array:
    """present [..., K] bool (default: a vector that is not all zero).

    adapted=True: every base parameter frozen (`lora.frozen_base`), adapters added.
    """
    if adapted:
      return lora.frozen_base(self)._fuse(vectors, present, adapted=True, train=train, rngs=rngs)
    return self._fuse(vectors, present, adapted=False, train=train, rngs=rngs)

  def _fuse(self, vectors, present, *, adapted, train, rngs):
    if present is None:
      present = jnp.stack([jnp.any(v != 0, axis=-1) for v in vectors], axis=-1)
    if train and self.modality_dropout > 0:
      if rngs is None:
        raise ValueError("FusionQFormer: modality dropout in training needs `rngs`")
      keep = jax.random.bernoulli(rngs.dropout(), 1 - self.modality_dropout, present.shape)
      present = present & keep
    tokens = self.modality_tokens(vectors, adapted=adapted)
    return self.fuse_tokens(tokens, present, adapted=adapted, train=train, rngs=rngs)
