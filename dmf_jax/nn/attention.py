"""Target attention: DIN, multi-head scaled dot-product, early fusion and Decoupled Target Attention.

Shapes: B users, N candidates per user, L behaviours, d token width, K modalities, H heads,
d_h head width, nb similarity buckets, d_z bucket-embedding width.

One interface for all four (`TargetAttention`):

  state = attention.encode_user(behaviours, mask)    # behaviours: Rows of [R, d], mask [B, L]
  out = attention.attend(state, query, side)         # query [B, N, d], side [B, N, L, ...]
                                                     # -> [B, N, out_dim]

`encode_user` holds everything target-agnostic (projections run on the R distinct item rows,
then gather); `attend` scores N candidates per user. Training calls both with N = 1 (each
example its own user), serving with B = 1 (one user, N candidates): the same two calls. The
batched convenience `attention(target [B, d], behaviours [B, L, d], [side,] mask)` is
`attend(encode_user(...), target[:, None], side[:, None])[:, 0]`.

The multi-head attentions' keys and values W^T x_j are projected once per row when the rows
are a shared table's (a small catalog: R < B L). When there is about one row per position
(large catalogs: rows per position or per data shard) projecting every row costs L d H d_h per
user, so `encode_user` keeps the tokens and `attend` either folds the kernels into its queries,
q_h . (W_h^T x_j) = (W_h q_h) . x_j and sum_j a_j W_h^T x_j = W_h^T sum_j a_j x_j, or projects
the L tokens, whichever takes fewer multiply-adds for its N (`fold_into_queries`: a training
step folds, serving thousands of candidates projects). Both are the same function.

Early fusion (the DMF paper's target attention with similarity side information) gives each
behaviour token the candidate-dependent side information z_tj^k = E_k[b_tj^k]:
x_tj = [e_j ; z_tj^1 ; ... ; z_tj^K], then
K_tj = W_K x_tj, V_tj = W_V x_tj, q_t = W_Q e_t and r = sum_j softmax_j(q_t.K_tj / sqrt(d_h)) V_tj.

Decoupled Target Attention splits W_K = [W_K^id ; W_K^1 ; ... ; W_K^K] by input block, so
K_tj = W_K^id e_j + sum_k T_K^k[b_tj^k] with the nb-row table T_K^k = E_k W_K^k (likewise V).
The ID part is target-agnostic (`encode_user`); per candidate only the scores
q_t.K_j^id + sum_k (q_t.T_K^k)[b_tj^k] and the bucket masses A_b^k = sum_j a_j [b_tj^k = b] are
needed (`attend`). Both modules hold the same `FusionAttentionWeights`, so they compute the
same function.

Masked positions get no attention; a row whose mask is all False returns zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax.core import checks
from dmf_jax.core.rows import Rows
from dmf_jax.core.sharding import merge_leading, segment_sum_rows, split_leading, take_rows
from dmf_jax.nn.layers import Linear, dense
from dmf_jax.nn.similarity import SimilarityBucketEmbedding, resolve_lookup_mode

_KERNEL_INIT = jax.nn.initializers.lecun_normal()
DIN_NORMALIZATIONS = ("none", "softmax")


class TargetAttention(Protocol):
  """What every target attention offers (see the module docstring)."""

  out_dim: int

  def encode_user(self, behaviors: Rows | jax.Array, mask: jax.Array) -> Any: ...

  def attend(self, state: Any, query: jax.Array, side: jax.Array | None = None
             ) -> jax.Array: ...


def masked_softmax(scores: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """Softmax over `axis` restricted to mask == True; all-masked slices give zeros (no NaN).
  Normalised in float32 (bfloat16 scores too); returned in the scores' dtype."""
  dtype = scores.dtype
  scores = scores.astype(jnp.promote_types(dtype, jnp.float32))
  floor = jnp.finfo(scores.dtype).min
  scores = jnp.where(mask, scores, floor)
  peak = jax.lax.stop_gradient(jnp.max(scores, axis=axis, keepdims=True))
  e = jnp.exp(scores - peak) * mask
  total = jnp.sum(e, axis=axis, keepdims=True)
  return (e / jnp.where(total > 0, total, 1.0)).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Input checks and the shared products
# ---------------------------------------------------------------------------------------------


def _behaviour_rows(module: str, behaviors: Rows | jax.Array, mask: jax.Array, dim: int
                    ) -> Rows:
  """`behaviors` as Rows, checked against mask bool [B, L] and the token width `dim`."""
  rows = behaviors if isinstance(behaviors, Rows) else Rows(behaviors)
  checks.check_rank(f"{module}: mask", mask, 2)
  checks.check_bool(f"{module}: mask", mask)
  checks.check_floating(f"{module}: behavior_id_emb", rows.values)
  if rows.index is None:
    checks.check_rank(f"{module}: behavior_id_emb", rows.values, 3)
    checks.check_shape(f"{module}: behavior_id_emb", rows.values, (mask.shape[0], None, dim))
    checks.check_same_dims(
        [("behavior_id_emb", rows.values.shape[1]), ("mask", mask.shape[1])],
        "L (sequence length)")
  else:  # [R, d], or [S, U, d] rows per data shard
    checks.check_rank(f"{module}: item rows", rows.values, 3 if rows.shards else 2)
    checks.check_shape(f"{module}: item rows", rows.values, (None,) * (rows.values.ndim - 1)
                       + (dim,))
    checks.check_integer(f"{module}: rows", rows.index)
    checks.check_shape(f"{module}: rows", rows.index, mask.shape)
    checks.check_ids_in_range(f"{module}: rows", rows.index, rows.index_bound())
  return rows


def _check_query(module: str, query: jax.Array, batch: int, dim: int) -> None:
  checks.check_rank(f"{module}: query", query, 3)
  checks.check_floating(f"{module}: query", query)
  checks.check_shape(f"{module}: query", query, (batch, None, dim))


def _check_buckets(module: str, bucket_ids: jax.Array, query: jax.Array, seq_len: int,
                   num_modalities: int, num_buckets: int) -> None:
  checks.check_rank(f"{module}: bucket_ids", bucket_ids, 4)
  checks.check_integer(f"{module}: bucket_ids", bucket_ids)
  checks.check_same_dims([("behavior_id_emb", seq_len), ("bucket_ids", bucket_ids.shape[2])],
                         "L (sequence length)")
  checks.check_shape(f"{module}: bucket_ids", bucket_ids, (*query.shape[:2], seq_len,
                                                           num_modalities))
  checks.check_ids_in_range(f"{module}: bucket_ids", bucket_ids, num_buckets)


def _check_batched(module: str, target: jax.Array, behaviors: jax.Array, mask: jax.Array,
                   dim: int) -> None:
  """The batched convenience call's shapes: target [B, d], behaviours [B, L, d], mask [B, L]."""
  checks.check_rank(f"{module}: target_id_emb", target, 2)
  checks.check_rank(f"{module}: behavior_id_emb", behaviors, 3)
  checks.check_floating(f"{module}: target_id_emb", target)
  checks.check_shape(f"{module}: target_id_emb", target, (behaviors.shape[0], dim))
  checks.check_shape(f"{module}: behavior_id_emb", behaviors, (None, None, dim))
  checks.check_rank(f"{module}: mask", mask, 2)
  checks.check_same_dims([("behavior_id_emb", behaviors.shape[1]), ("mask", mask.shape[1])],
                         "L (sequence length)")
  checks.check_shape(f"{module}: mask", mask, behaviors.shape[:2])


def head_major(rows: Rows, kernel: jax.Array, num_heads: int, head_dim: int) -> jax.Array:
  """The projection W e_j of every position, head-major: Rows of [R, d] -> [B, H, L, d_h].

  With an index the R rows are projected once and gathered straight into the head-major layout
  (row h * R + i of the head-major table), the layout XLA's CPU backend runs fastest.
  """
  if rows.index is None or rows.shards:  # per position, or rows per data shard
    projected = rows.map(lambda v: dense(v, kernel)).take()  # [B, L, H * d_h]
    out = projected.reshape(*projected.shape[:-1], num_heads, head_dim)
    return jnp.swapaxes(out, -3, -2)
  r = rows.values.shape[0]
  proj = (rows.values @ kernel).reshape(r, num_heads, head_dim)
  table = jnp.swapaxes(proj, 0, 1).reshape(num_heads * r, head_dim)
  return take_rows(table, jnp.arange(num_heads)[:, None] * r + rows.index[..., None, :])


def head_scores(q: jax.Array, keys: jax.Array) -> jax.Array:
  """q [B, N, H, d_h] . keys [B, H, L, d_h] -> [B, N, H, L].

  Training (N = 1): per-example products, head-major (the layout XLA's CPU backend runs
  fastest). One user (B = 1, serving): one plain 2-D GEMM per head against the shared keys
  (faster on CPU than a batched einsum over the head axis)."""
  if q.shape[1] == 1:
    return jnp.einsum("bhd,bhld->bhl", q[:, 0], keys)[:, None]
  if q.shape[0] == 1:
    heads = range(q.shape[2])
    return jnp.stack([q[0, :, h] @ keys[0, h].T for h in heads], axis=1)[None]
  return jnp.einsum("bnhd,bhld->bnhl", q, keys)


def head_mix(a: jax.Array, values: jax.Array) -> jax.Array:
  """Attention weights a [B, N, H, L] over values [B, H, L, d_h] -> [B, N, H, d_h]."""
  if a.shape[1] == 1:
    return jnp.einsum("bhl,bhld->bhd", a[:, 0], values)[:, None]
  if a.shape[0] == 1:
    heads = range(a.shape[2])
    return jnp.stack([a[0, :, h] @ values[0, h] for h in heads], axis=1)[None]
  return jnp.einsum("bnhl,bhld->bnhd", a, values)


# ---------------------------------------------------------------------------------------------
# Per-head keys and values of the behaviours: projected, or folded into the queries
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HeadsUserState:
  """Per-head keys and values [B, H, L, d_h] (head-major) and mask [B, L]; for DTA the ID
  parts W^id e_j only."""

  key_id: jax.Array
  value_id: jax.Array
  mask: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokensUserState:
  """The behaviour tokens [B, L, d] and mask [B, L]: early fusion's user part, and the keys'
  and values' user part when they are not projected per row (`encode_heads`)."""

  behaviors: jax.Array
  mask: jax.Array


def encode_heads(rows: Rows, key_kernel: jax.Array, value_kernel: jax.Array, num_heads: int,
                 head_dim: int, mask: jax.Array) -> HeadsUserState | TokensUserState:
  """The user part of keys K_j = W_K^T x_j and values V_j = W_V^T x_j (kernels [d, H*d_h]).

  Rows of a shared table (the catalog: fewer rows than positions) are projected once per row
  and gathered head-major (`HeadsUserState`). Rows per position or per data shard (large
  catalogs: about one row per position) keep the tokens x_j [B, L, d] (`TokensUserState`):
  `attend` then folds the kernels into its N queries per user or projects the L tokens,
  whichever costs less (`fold_into_queries`); a training step (N = 1) folds, and no
  per-row projection, its gradients or its head-major copies are made at all.
  """
  if rows.index is not None and not rows.shards:
    return _projected(rows, key_kernel, value_kernel, num_heads, head_dim, mask)
  return TokensUserState(rows.take(), mask)


def _projected(rows: Rows, key_kernel: jax.Array, value_kernel: jax.Array, num_heads: int,
               head_dim: int, mask: jax.Array) -> HeadsUserState:
  """Keys and values of `rows`, projected (`head_major`)."""
  return HeadsUserState(head_major(rows, key_kernel, num_heads, head_dim),
                        head_major(rows, value_kernel, num_heads, head_dim), mask)


def fold_into_queries(n: int, seq_len: int, dim: int, head_dim: int) -> bool:
  """Whether scoring N candidates per user over L tokens of width d folds the kernels into the
  queries, N (d d_h + L d) multiply-adds per head and user, rather than projects the tokens,
  L d d_h + N L d_h (keys and values alike)."""
  return n * (dim * head_dim + seq_len * dim) < seq_len * dim * head_dim + n * seq_len * head_dim


def heads_for(state: HeadsUserState | TokensUserState, n: int, key_kernel: jax.Array,
              value_kernel: jax.Array, num_heads: int, head_dim: int
              ) -> HeadsUserState | TokensUserState:
  """The user part `attend` works from for N candidates per user: tokens stay tokens when
  `fold_into_queries`, else they are projected (L rows per user) into `HeadsUserState`."""
  if isinstance(state, HeadsUserState):
    return state
  _, seq_len, dim = state.behaviors.shape
  if fold_into_queries(n, seq_len, dim, head_dim):
    return state
  return _projected(Rows(state.behaviors), key_kernel, value_kernel, num_heads, head_dim,
                    state.mask)


def id_scores(state: HeadsUserState | TokensUserState, q: jax.Array, key_kernel: jax.Array
              ) -> jax.Array:
  """q [B, N, H, d_h] . K_j -> [B, N, H, L]; over tokens q_h . (W_h^T x_j) = (W_h q_h) . x_j,
  the kernel [d, H*d_h] folded into the queries."""
  if isinstance(state, HeadsUserState):
    return head_scores(q, state.key_id)
  _, n, h, dh = q.shape
  folded = jnp.einsum("bnhc,dhc->bnhd", q, key_kernel.reshape(-1, h, dh))  # [B, N, H, d]
  if n == 1:
    return jnp.einsum("bhd,bld->bhl", folded[:, 0], state.behaviors)[:, None]
  return jnp.einsum("bnhd,bld->bnhl", folded, state.behaviors)


def id_mix(state: HeadsUserState | TokensUserState, a: jax.Array, value_kernel: jax.Array
           ) -> jax.Array:
  """Attention weights a [B, N, H, L] over V_j -> [B, N, H, d_h]; over tokens
  sum_j a_j W_h^T x_j = W_h^T (sum_j a_j x_j), the tokens pooled first."""
  if isinstance(state, HeadsUserState):
    return head_mix(a, state.value_id)
  _, n, h, _ = a.shape
  if n == 1:
    pooled = jnp.einsum("bhl,bld->bhd", a[:, 0], state.behaviors)[:, None]
  else:
    pooled = jnp.einsum("bnhl,bld->bnhd", a, state.behaviors)  # [B, N, H, d]
  return jnp.einsum("bnhd,dhc->bnhc", pooled, value_kernel.reshape(pooled.shape[-1], h, -1))


# ---------------------------------------------------------------------------------------------
# DIN
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DinUserState:
  """keys [B, L, d - side_dim] (the behaviour tokens), key_part [B, L, h1] (their term of the
  activation unit's first layer, e_j (W_k - W_d)) and mask [B, L]."""

  keys: jax.Array
  key_part: jax.Array
  mask: jax.Array


class DinAttention(nnx.Module):
  """DIN local activation unit: weights from an MLP over [q, k, q - k, q * k].

  target [B, d], behaviors [B, L, d], mask [B, L] -> [B, d] = sum_j w_j k_j. As in the DIN paper
  the weights are not normalized by default ('none'); 'softmax' normalizes over unmasked j.

  With `side_dim` > 0 the last side_dim entries of each key are candidate-dependent side
  features s_tj (`attend`'s side [B, N, L, side_dim]): k_tj = [e_j ; s_tj], and the output
  is sum_j w_tj k_tj = [sum_j w_tj e_j ; sum_j w_tj s_tj].

  Decoupled like DTA: the first layer over [q ; k ; q - k ; q * k] with W = [W_q ; W_k ; W_d ;
  W_p] is

    q (W_q + W_d)   +   k (W_k - W_d)   +   (q * k) W_p   + b
    per candidate       per item row        per (candidate, behaviour) pair

  so `encode_user` computes the key part once per item row (per distinct item, then gathered;
  the side entries of a key, being per pair, join the pair part) and `attend` adds the query
  part once per candidate: the same function with the same parameters, a third of the
  first layer's products per pair.
  """

  def __init__(
      self,
      dim: int,
      *,
      hidden: Sequence[int] = (80, 40),
      normalization: str = "none",
      side_dim: int = 0,
      rngs: nnx.Rngs,
  ):
    if normalization not in DIN_NORMALIZATIONS:
      raise ValueError(f"DIN normalization {normalization!r} is not one of {DIN_NORMALIZATIONS}")
    self.dim, self.side_dim = dim, side_dim
    self.normalization = normalization
    dims = (4 * dim, *hidden)
    self.hidden = nnx.List([Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.score = Linear(dims[-1], 1, rngs=rngs)

  @property
  def out_dim(self) -> int:
    return self.dim

  def _first_layer(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(W_q + W_d [d, h1], W_k - W_d [d, h1], W_p [d, h1]) of the first layer's kernel."""
    w_q, w_k, w_d, w_p = (self.hidden[0].kernel[...][i * self.dim:(i + 1) * self.dim]
                          for i in range(4))
    return w_q + w_d, w_k - w_d, w_p

  def encode_user(self, behaviors: Rows | jax.Array, mask: jax.Array) -> DinUserState:
    """Behaviour tokens (Rows of [R, d - side_dim]), mask [B, L] -> DinUserState: the keys
    and, per item row, their part of the first layer."""
    rows = _behaviour_rows("DinAttention", behaviors, mask, self.dim - self.side_dim)
    w_key = self._first_layer()[1][:self.dim - self.side_dim]
    key_part = rows.map(lambda e: dense(e, w_key.astype(e.dtype))).take()
    return DinUserState(keys=rows.take(), key_part=key_part, mask=mask)

  def weights(self, keys: jax.Array, query: jax.Array, mask: jax.Array, key_part: jax.Array
              ) -> jax.Array:
    """Attention weights [..., L] of queries [..., d] over their keys [..., L, d] (0 where
    masked; leading dims broadcast). key_part [..., L, h1]: the behaviour tokens' first-layer
    term e_j (W_k - W_d) from `encode_user`; the keys' last side_dim entries (per pair) add
    theirs here."""
    w_query, w_key, w_pair = self._first_layer()
    per_candidate = dense(query, w_query) + self.hidden[0].bias[...]  # [..., h1]
    if self.side_dim:
      key_part = key_part + dense(keys[..., self.dim - self.side_dim:],
                                  w_key[self.dim - self.side_dim:])
    h = jax.nn.sigmoid(dense(query[..., None, :] * keys, w_pair) + key_part
                       + per_candidate[..., None, :])
    for layer in self.hidden[1:]:
      h = jax.nn.sigmoid(layer(h))
    scores = self.score(h)[..., 0]
    if self.normalization == "softmax":
      return masked_softmax(scores, mask)
    return scores * mask

  def attend(self, state: DinUserState, query: jax.Array, side: jax.Array | None = None
             ) -> jax.Array:
    """query [B, N, d] (side [B, N, L, side_dim] when side_dim) -> [B, N, d]: each candidate's
    keys k_tj = [e_j ; s_tj] weighted and summed."""
    _check_query("DinAttention", query, state.keys.shape[0], self.dim)
    if bool(self.side_dim) != (side is not None):
      raise ValueError(f"DinAttention: side features are required exactly when side_dim > 0 "
                       f"(side_dim={self.side_dim})")
    if query.shape[1] == 1:  # training: one candidate per user, as [B, L, d] products (XLA's
      keys = state.keys       # CPU backend runs these ~2x faster than with an N = 1 axis)
      if side is not None:
        keys = jnp.concatenate([keys, side[:, 0]], axis=-1)
      w = self.weights(keys, query[:, 0], state.mask, state.key_part)  # [B, L]
      return jnp.einsum("bl,bld->bd", w, keys)[:, None]
    keys = state.keys[:, None]  # [B, 1, L, d]: shared by the N candidates
    if side is not None:
      keys = jnp.concatenate([jnp.broadcast_to(keys, (*side.shape[:3], keys.shape[-1])), side],
                             axis=-1)
    w = self.weights(keys, query, state.mask[:, None], state.key_part[:, None])  # [B, N, L]
    if keys.shape[1] == 1:
      return jnp.einsum("bnl,bld->bnd", w, keys[:, 0])
    return jnp.einsum("bnl,bnld->bnd", w, keys)

  def __call__(self, target: jax.Array, behaviors: jax.Array, mask: jax.Array) -> jax.Array:
    _check_batched("DinAttention", target, behaviors, mask, self.dim)
    return self.attend(self.encode_user(behaviors, mask), target[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------
# Multi-head (ID only)
# ---------------------------------------------------------------------------------------------


class MultiHeadTargetAttention(nnx.Module):
  """ID-only multi-head scaled dot-product target attention.

  target [B, d] (query), behaviors [B, L, d] (keys and values), mask [B, L] -> [B, H * d_h].
  """

  def __init__(self, *, id_dim: int, num_heads: int, head_dim: int, rngs: nnx.Rngs):
    self.id_dim, self.num_heads, self.head_dim = id_dim, num_heads, head_dim
    width = num_heads * head_dim
    self.query = nnx.Param(_KERNEL_INIT(rngs.params(), (id_dim, width)))
    self.key = nnx.Param(_KERNEL_INIT(rngs.params(), (id_dim, width)))
    self.value = nnx.Param(_KERNEL_INIT(rngs.params(), (id_dim, width)))

  @property
  def out_dim(self) -> int:
    return self.num_heads * self.head_dim

  def encode_user(self, behaviors: Rows | jax.Array, mask: jax.Array
                  ) -> HeadsUserState | TokensUserState:
    """Behaviour tokens (Rows of [R, d]), mask [B, L] -> keys and values [B, H, L, d_h], or
    the tokens [B, L, d] themselves (`encode_heads`)."""
    rows = _behaviour_rows("MultiHeadTargetAttention", behaviors, mask, self.id_dim)
    return encode_heads(rows, self.key[...], self.value[...], self.num_heads, self.head_dim,
                        mask)

  def attend(self, state: HeadsUserState | TokensUserState, query: jax.Array,
             side: jax.Array | None = None) -> jax.Array:
    """query [B, N, d] -> [B, N, H * d_h] (no side information)."""
    del side
    _check_query("MultiHeadTargetAttention", query, state.mask.shape[0], self.id_dim)
    h, dh = self.num_heads, self.head_dim
    state = heads_for(state, query.shape[1], self.key[...], self.value[...], h, dh)
    q = split_leading((merge_leading(query) @ self.query[...]).reshape(-1, h, dh),
                      *query.shape[:2])
    a = masked_softmax(id_scores(state, q, self.key[...]) / jnp.sqrt(dh),
                       state.mask[:, None, None])
    out = merge_leading(id_mix(state, a, self.value[...]))  # [B * N, H, d_h]
    return split_leading(out.reshape(out.shape[0], h * dh), *query.shape[:2])

  def __call__(self, target: jax.Array, behaviors: jax.Array, mask: jax.Array) -> jax.Array:
    _check_batched("MultiHeadTargetAttention", target, behaviors, mask, self.id_dim)
    return self.attend(self.encode_user(behaviors, mask), target[:, None])[:, 0]


# ---------------------------------------------------------------------------------------------
# Early fusion and DTA: one set of weights, two ways to compute the same function
# ---------------------------------------------------------------------------------------------


class FusionAttentionWeights(nnx.Module):
  """The weights shared by early fusion and DTA.

  query [d, H*d_h]; key, value [d + K*d_z, H*d_h] whose first d rows act on the ID embedding and
  the next K blocks of d_z rows on each modality's bucket embedding; bucket tables [K, nb, d_z].
  """

  def __init__(
      self,
      *,
      id_dim: int,
      num_buckets: int,
      bucket_dim: int,
      num_modalities: int,
      num_heads: int,
      head_dim: int,
      rngs: nnx.Rngs,
  ):
    for name, value in dict(
        id_dim=id_dim, num_buckets=num_buckets, bucket_dim=bucket_dim,
        num_modalities=num_modalities, num_heads=num_heads, head_dim=head_dim,
    ).items():
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"fusion attention: {name} must be a positive int, got {value!r}")
    self.id_dim, self.num_buckets, self.bucket_dim = id_dim, num_buckets, bucket_dim
    self.num_modalities, self.num_heads, self.head_dim = num_modalities, num_heads, head_dim
    width = num_heads * head_dim
    token_dim = id_dim + num_modalities * bucket_dim
    self.buckets = SimilarityBucketEmbedding(num_modalities, num_buckets, bucket_dim, rngs=rngs)
    self.query = nnx.Param(_KERNEL_INIT(rngs.params(), (id_dim, width)))
    self.key = nnx.Param(_KERNEL_INIT(rngs.params(), (token_dim, width)))
    self.value = nnx.Param(_KERNEL_INIT(rngs.params(), (token_dim, width)))

  def config(self) -> dict[str, int]:
    return dict(
        id_dim=self.id_dim, num_buckets=self.num_buckets, bucket_dim=self.bucket_dim,
        num_modalities=self.num_modalities, num_heads=self.num_heads, head_dim=self.head_dim,
    )

  @property
  def out_dim(self) -> int:
    return self.num_heads * self.head_dim

  def queries(self, target: jax.Array) -> jax.Array:
    """[..., d] -> [..., H, d_h]."""
    q = dense(target, self.query[...])
    return q.reshape(*target.shape[:-1], self.num_heads, self.head_dim)

  def bucket_tables(self, kernel: jax.Array) -> jax.Array:
    """T^k = E_k W^k for all k: kernel [d + K*d_z, H*d_h] -> [K, nb, H, d_h]."""
    side = kernel[self.id_dim:].reshape(self.num_modalities, self.bucket_dim, -1)
    tables = jnp.einsum("knz,kzo->kno", self.buckets.tables[...], side)
    return tables.reshape(self.num_modalities, self.num_buckets, self.num_heads, self.head_dim)


class _FusionAttention(nnx.Module):
  """Early fusion and DTA: the shared weights, constructor and batched call."""

  def __init__(self, *, id_dim: int, num_buckets: int, bucket_dim: int, num_modalities: int,
               num_heads: int, head_dim: int, rngs: nnx.Rngs | None = None,
               weights: FusionAttentionWeights | None = None, lookup_mode: str = "gather"):
    """lookup_mode: how DTA reads its per-bucket scores and sums its attention mass per
    bucket (`nn.similarity.LOOKUP_MODES`; early fusion embeds each position's bucket)."""
    self.lookup_mode = resolve_lookup_mode(lookup_mode)
    if weights is None:
      if rngs is None:
        raise ValueError(f"{type(self).__name__} needs `rngs` (or existing `weights`)")
      weights = FusionAttentionWeights(
          id_dim=id_dim, num_buckets=num_buckets, bucket_dim=bucket_dim,
          num_modalities=num_modalities, num_heads=num_heads, head_dim=head_dim, rngs=rngs,
      )
    self.weights = weights

  @property
  def out_dim(self) -> int:
    return self.weights.out_dim

  def _check_attend(self, query, bucket_ids, batch, seq_len):
    w = self.weights
    _check_query(type(self).__name__, query, batch, w.id_dim)
    _check_buckets(type(self).__name__, bucket_ids, query, seq_len, w.num_modalities,
                   w.num_buckets)

  def __call__(self, target_id_emb, behavior_id_emb, bucket_ids, mask):
    """target [B, d], behaviours [B, L, d], bucket_ids int [B, L, K], mask [B, L] -> [B, H*d_h]."""
    w = self.weights
    _check_batched(type(self).__name__, target_id_emb, behavior_id_emb, mask, w.id_dim)
    checks.check_rank(f"{type(self).__name__}: bucket_ids", bucket_ids, 3)
    state = self.encode_user(behavior_id_emb, mask)
    return self.attend(state, target_id_emb[:, None], bucket_ids[:, None])[:, 0]


class EarlyFusionTargetAttention(_FusionAttention):
  """Target attention over behaviour tokens carrying the similarity-bucket embeddings.

  Keys and values are recomputed for every (candidate, behaviour) pair: the reference DTA is
  tested against, and the `dmf_early_fusion` model.
  """

  def encode_user(self, behaviors: Rows | jax.Array, mask: jax.Array) -> TokensUserState:
    """Nothing is target-agnostic beyond the tokens: [B, L, d] and mask [B, L]."""
    rows = _behaviour_rows(type(self).__name__, behaviors, mask, self.weights.id_dim)
    return TokensUserState(rows.take(), mask)

  def attend(self, state: TokensUserState, query: jax.Array, side: jax.Array | None = None
             ) -> jax.Array:
    """query [B, N, d], side = bucket_ids int [B, N, L, K] -> [B, N, H*d_h].

    Every (candidate, behaviour) token x = [e_j ; E[b]] goes through W_K and W_V.
    """
    w = self.weights
    batch, seq_len = state.mask.shape
    self._check_attend(query, side, batch, seq_len)
    n = query.shape[1]
    buckets = jnp.clip(side, 0, w.num_buckets - 1)
    behaviors = jnp.broadcast_to(state.behaviors[:, None], (batch, n, *state.behaviors.shape[1:]))
    tokens = jnp.concatenate([behaviors, w.buckets(buckets)], axis=-1)  # [B, N, L, d + K*d_z]
    shape = (*tokens.shape[:3], w.num_heads, w.head_dim)
    keys = dense(tokens, w.key[...]).reshape(shape)
    values = dense(tokens, w.value[...]).reshape(shape)
    scores = jnp.einsum("bnhd,bnlhd->bnhl", w.queries(query), keys) / jnp.sqrt(w.head_dim)
    a = masked_softmax(scores, state.mask[:, None, None])
    return jnp.einsum("bnhl,bnlhd->bnhd", a, values).reshape(batch, n, -1)


class DecoupledTargetAttention(_FusionAttention):
  """Early fusion's function, with the per-user part separated from the per-candidate part."""

  @classmethod
  def from_early_fusion(cls, ef: EarlyFusionTargetAttention, lookup_mode: str = "gather"
                        ) -> "DecoupledTargetAttention":
    """A DTA sharing `ef`'s weights (the same Params: training one trains the other)."""
    return cls(**ef.weights.config(), weights=ef.weights, lookup_mode=lookup_mode)

  def encode_user(self, behaviors: Rows | jax.Array, mask: jax.Array
                  ) -> HeadsUserState | TokensUserState:
    """Target-agnostic part: W^id e_j for keys and values, [B, H, L, d_h] (on the R rows), or
    the tokens e_j [B, L, d] themselves when the rows are per position or per data shard
    (`encode_heads`)."""
    w = self.weights
    rows = _behaviour_rows(type(self).__name__, behaviors, mask, w.id_dim)
    return encode_heads(rows, *self._id_kernels(), w.num_heads, w.head_dim, mask)

  def _id_kernels(self) -> tuple[jax.Array, jax.Array]:
    """W_K^id and W_V^id [d, H*d_h]: the key's and value's rows acting on the ID token."""
    w = self.weights
    return w.key[...][: w.id_dim], w.value[...][: w.id_dim]

  def attend(self, state: HeadsUserState | TokensUserState, query: jax.Array,
             side: jax.Array | None = None) -> jax.Array:
    """query [B, N, d], side = bucket_ids int [B, N, L, K] -> [B, N, H*d_h].

    scores = q . K^id_j + sum_k (q . T_K^k)[b_k]   (q . T_K^k for all nb buckets: a GEMM)
    out    = sum_j a_j V^id_j + sum_k sum_b A_b^k T_V^k[b]
    with A_b^k the attention mass whose bucket for modality k is b (a segment sum). Over
    tokens (`TokensUserState`) q . K^id_j = (W_K^id q) . e_j and sum_j a_j V^id_j =
    W_V^id^T sum_j a_j e_j (`id_scores`, `id_mix`).
    """
    w = self.weights
    batch, seq_len = state.mask.shape
    self._check_attend(query, side, batch, seq_len)
    n, k, nb, h, dh = query.shape[1], w.num_modalities, w.num_buckets, w.num_heads, w.head_dim
    key_id, value_id = self._id_kernels()
    state = heads_for(state, n, key_id, value_id, h, dh)
    e = batch * n  # (user, candidate) pairs, flattened: the per-pair work below is 3-D
    q = w.queries(merge_leading(query))  # [E, H, d_h]
    buckets = merge_leading(jnp.clip(side, 0, nb - 1))  # [E, L, K]
    q_side = jnp.einsum("ehd,kmhd->ekhm", q, w.bucket_tables(w.key[...]))  # [E, K, H, nb]
    if self.lookup_mode == "one_hot":  # the gathers and the segment sum as matmuls
      onehot = jax.nn.one_hot(buckets, nb, dtype=q_side.dtype)  # [E, L, K, nb]
      side_scores = jnp.einsum("elkm,ekhm->ehl", onehot, q_side)  # [E, H, L]
    else:
      index = jnp.transpose(buckets, (0, 2, 1))[:, :, None, :]  # [E, K, 1, L]
      side_scores = jnp.take_along_axis(q_side, index, axis=3).sum(axis=1)  # [E, H, L]
    scores = (merge_leading(id_scores(state, split_leading(q, batch, n), key_id))
              + side_scores) / jnp.sqrt(dh)
    mask = merge_leading(jnp.broadcast_to(state.mask[:, None], (batch, n, seq_len)))
    a = masked_softmax(scores, mask[:, None, :])  # [E, H, L]
    if self.lookup_mode == "one_hot":
      mass = jnp.einsum("ehl,elkm->ekmh", a, onehot.astype(a.dtype))  # [E, K, nb, H]
    else:
      per_token = jnp.broadcast_to(jnp.transpose(a, (0, 2, 1))[:, :, None, :],
                                   (e, seq_len, k, h))
      segment = (jnp.arange(e)[:, None, None] * k + jnp.arange(k)[None, None, :]) * nb + buckets
      mass = segment_sum_rows(per_token.reshape(-1, h), segment.reshape(-1), e * k * nb)
      mass = mass.reshape(e, k, nb, h)  # [E, K, nb, H]
    id_part = merge_leading(id_mix(state, split_leading(a, batch, n), value_id))
    out = id_part + jnp.einsum("ekmh,kmhd->ehd", mass, w.bucket_tables(w.value[...]))
    return split_leading(out.reshape(e, h * dh), batch, n)
