"""Target attention: DIN, multi-head scaled dot-product, early fusion and Decoupled Target Attention.

Shapes: B batch, L behaviours, d ID-embedding width, K modalities, H heads, d_h head width,
nb similarity buckets, d_z bucket-embedding width.

Early fusion (DESIGN.md section 2) gives each behaviour token the candidate-dependent side
information z_tj^k = E_k[b_tj^k]: x_tj = [e_j ; z_tj^1 ; ... ; z_tj^K], then
K_tj = W_K x_tj, V_tj = W_V x_tj, q_t = W_Q e_t and r = sum_j softmax_j(q_t.K_tj / sqrt(d_h)) V_tj.

Decoupled Target Attention splits W_K = [W_K^id ; W_K^1 ; ... ; W_K^K] by input block, so
K_tj = W_K^id e_j + sum_k T_K^k[b_tj^k] with the nb-row table T_K^k = E_k W_K^k (likewise V).
The ID part is target-agnostic (computed once per user); per candidate only the scores
q_t.K_j^id + sum_k (q_t.T_K^k)[b_tj^k] and the bucket masses A_b^k = sum_j a_j [b_tj^k = b] are
needed. Both modules hold the same `FusionAttentionWeights`, so they compute the same function.

Masked positions get no attention; a row whose mask is all False returns zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dmf_jax import checks
from dmf_jax.sharding import segment_sum_rows, take_rows
from dmf_jax.similarity import SimilarityBucketEmbedding

_KERNEL_INIT = jax.nn.initializers.lecun_normal()
DIN_NORMALIZATIONS = ("none", "softmax")


def masked_softmax(scores: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """Softmax over `axis` restricted to mask == True; all-masked slices give zeros (no NaN)."""
  floor = jnp.finfo(scores.dtype).min
  scores = jnp.where(mask, scores, floor)
  peak = jax.lax.stop_gradient(jnp.max(scores, axis=axis, keepdims=True))
  e = jnp.exp(scores - peak) * mask
  total = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(total > 0, total, 1.0)


def _validate_inputs(
    module: str,
    target: jax.Array,
    behaviors: jax.Array,
    mask: jax.Array,
    id_dim: int,
    bucket_ids: jax.Array | None = None,
    num_modalities: int = 0,
    num_buckets: int = 0,
) -> None:
  """Ranks, dims and dtypes of a batched attention call; value checks when eager."""
  checks.check_rank(f"{module}: target_id_emb", target, 2)
  checks.check_rank(f"{module}: behavior_id_emb", behaviors, 3)
  checks.check_rank(f"{module}: mask", mask, 2)
  checks.check_floating(f"{module}: target_id_emb", target)
  checks.check_floating(f"{module}: behavior_id_emb", behaviors)
  checks.check_bool(f"{module}: mask", mask)
  batch, seq_len = behaviors.shape[:2]
  checks.check_shape(f"{module}: target_id_emb", target, (batch, id_dim))
  checks.check_shape(f"{module}: behavior_id_emb", behaviors, (batch, seq_len, id_dim))
  checks.check_same_dims(
      [("behavior_id_emb", behaviors.shape[1]), ("mask", mask.shape[1])], "L (sequence length)"
  )
  checks.check_shape(f"{module}: mask", mask, (batch, seq_len))
  if bucket_ids is not None:
    checks.check_rank(f"{module}: bucket_ids", bucket_ids, 3)
    checks.check_integer(f"{module}: bucket_ids", bucket_ids)
    checks.check_same_dims(
        [("behavior_id_emb", seq_len), ("bucket_ids", bucket_ids.shape[1])], "L (sequence length)"
    )
    checks.check_shape(f"{module}: bucket_ids", bucket_ids, (batch, seq_len, num_modalities))
    checks.check_ids_in_range(f"{module}: bucket_ids", bucket_ids, num_buckets)


def _validate_table(module: str, item_table: jax.Array, rows: jax.Array, mask: jax.Array,
                    id_dim: int) -> None:
  """Checks of a call from an item table: item_table [V, d], rows int [..., L] in [0, V),
  mask bool [..., L]."""
  checks.check_rank(f"{module}: item_table", item_table, 2)
  checks.check_floating(f"{module}: item_table", item_table)
  checks.check_shape(f"{module}: item_table", item_table, (None, id_dim))
  checks.check_integer(f"{module}: rows", rows)
  checks.check_bool(f"{module}: mask", mask)
  checks.check_shape(f"{module}: rows", rows, mask.shape)
  checks.check_ids_in_range(f"{module}: rows", rows, item_table.shape[0])


class DinAttention(nnx.Module):
  """DIN local activation unit: weights from an MLP over [q, k, q - k, q * k].

  target [B, d], behaviors [B, L, d], mask [B, L] -> [B, d] = sum_j w_j k_j. As in the DIN paper
  the weights are not normalized by default ('none'); 'softmax' normalizes over unmasked j.
  """

  def __init__(
      self,
      dim: int,
      *,
      hidden: Sequence[int] = (80, 40),
      normalization: str = "none",
      rngs: nnx.Rngs,
  ):
    if normalization not in DIN_NORMALIZATIONS:
      raise ValueError(f"DIN normalization {normalization!r} is not one of {DIN_NORMALIZATIONS}")
    self.dim = dim
    self.normalization = normalization
    dims = (4 * dim, *hidden)
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
    self.score = nnx.Linear(dims[-1], 1, rngs=rngs)

  def weights(self, target: jax.Array, behaviors: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention weights [B, L] (zero where masked).

    The first layer W [q ; k ; q - k ; q * k] is computed as q (W_q + W_d) once per example
    plus [k ; q * k] [W_k - W_d ; W_p] per position: the same function, half the products.
    """
    first, d = self.hidden[0], self.dim
    w_q, w_k, w_d, w_p = (first.kernel[...][i * d:(i + 1) * d] for i in range(4))
    per_example = target @ (w_q + w_d) + first.bias[...]  # [B, h1]
    per_position = jnp.concatenate([behaviors, target[:, None, :] * behaviors], axis=-1)
    h = jax.nn.sigmoid(per_position @ jnp.concatenate([w_k - w_d, w_p]) + per_example[:, None])
    for layer in self.hidden[1:]:
      h = jax.nn.sigmoid(layer(h))
    scores = self.score(h)[..., 0]
    if self.normalization == "softmax":
      return masked_softmax(scores, mask)
    return scores * mask

  def __call__(self, target: jax.Array, behaviors: jax.Array, mask: jax.Array) -> jax.Array:
    _validate_inputs("DinAttention", target, behaviors, mask, self.dim)
    return jnp.einsum("bl,bld->bd", self.weights(target, behaviors, mask), behaviors)


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

  def __call__(self, target: jax.Array, behaviors: jax.Array, mask: jax.Array) -> jax.Array:
    _validate_inputs("MultiHeadTargetAttention", target, behaviors, mask, self.id_dim)
    return self._attend(target, behaviors @ self.key[...], behaviors @ self.value[...], mask)

  def call_from_table(self, target: jax.Array, item_table: jax.Array, rows: jax.Array,
                      mask: jax.Array) -> jax.Array:
    """`self(target, item_table[rows], mask)` with the key and value projections applied to
    the V table rows once: item_table [V, d], rows int [B, L] in [0, V)."""
    _validate_table("MultiHeadTargetAttention", item_table, rows, mask, self.id_dim)
    checks.check_rank("MultiHeadTargetAttention: rows", rows, 2)
    checks.check_shape("MultiHeadTargetAttention: target_id_emb", target,
                       (rows.shape[0], self.id_dim))
    keys = take_rows(item_table @ self.key[...], rows)
    values = take_rows(item_table @ self.value[...], rows)
    return self._attend(target, keys, values, mask)

  def _attend(self, target, keys, values, mask):
    """target [B, d], keys and values [B, L, H * d_h], mask [B, L] -> [B, H * d_h]."""
    h, dh = self.num_heads, self.head_dim
    q = (target @ self.query[...]).reshape(-1, h, dh)
    k = keys.reshape(*keys.shape[:2], h, dh)
    v = values.reshape(*values.shape[:2], h, dh)
    scores = jnp.sum(q[:, None] * k, axis=-1) / jnp.sqrt(dh)  # [B, L, H]
    a = masked_softmax(scores, mask[..., None], axis=1)
    return jnp.sum(a[..., None] * v, axis=1).reshape(-1, h * dh)

  def encode_user(self, behaviors: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One user's keys and values: [L, d] -> ([L, H, d_h], [L, H, d_h])."""
    shape = (behaviors.shape[0], self.num_heads, self.head_dim)
    return (behaviors @ self.key[...]).reshape(shape), (behaviors @ self.value[...]).reshape(shape)

  def score_candidates(self, user, mask: jax.Array, target: jax.Array) -> jax.Array:
    """N candidates [N, d] against one user's (K, V) and mask [L] -> [N, H * d_h]."""
    keys, values = user
    q = (target @ self.query[...]).reshape(-1, self.num_heads, self.head_dim)
    scores = jnp.einsum("nhd,lhd->nhl", q, keys) / jnp.sqrt(self.head_dim)
    a = masked_softmax(scores, mask[None, None, :])
    return jnp.einsum("nhl,lhd->nhd", a, values).reshape(q.shape[0], -1)


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

  def queries(self, target: jax.Array) -> jax.Array:
    """[..., d] -> [..., H, d_h]."""
    return (target @ self.query[...]).reshape(*target.shape[:-1], self.num_heads, self.head_dim)

  def bucket_tables(self, kernel: jax.Array) -> jax.Array:
    """T^k = E_k W^k for all k: kernel [d + K*d_z, H*d_h] -> [K, nb, H, d_h]."""
    side = kernel[self.id_dim:].reshape(self.num_modalities, self.bucket_dim, -1)
    tables = jnp.einsum("knz,kzo->kno", self.buckets.tables[...], side)
    return tables.reshape(self.num_modalities, self.num_buckets, self.num_heads, self.head_dim)

  def id_projection(self, kernel: jax.Array, behaviors: jax.Array) -> jax.Array:
    """W^id e_j, head-major: [..., L, d] -> [..., H, L, d_h]."""
    out = (behaviors @ kernel[: self.id_dim]).reshape(
        *behaviors.shape[:-1], self.num_heads, self.head_dim)  # one GEMM, then the layout
    return jnp.swapaxes(out, -3, -2)

  def id_projection_rows(self, kernel: jax.Array, item_table: jax.Array, rows: jax.Array
                         ) -> jax.Array:
    """`id_projection(kernel, item_table[rows])`, projecting the V table rows rather than the
    positions: item_table [V, d], rows int [..., L] in [0, V) -> [..., H, L, d_h]."""
    v, h = item_table.shape[0], self.num_heads
    proj = (item_table @ kernel[: self.id_dim]).reshape(v, h, self.head_dim)
    head_major = jnp.swapaxes(proj, 0, 1).reshape(h * v, self.head_dim)  # row h * V + i
    return take_rows(head_major, jnp.arange(h)[:, None] * v + rows[..., None, :])


class EarlyFusionTargetAttention(nnx.Module):
  """Target attention over behaviour tokens carrying the similarity-bucket embeddings.

  __call__: target [B, d], behaviors [B, L, d], bucket_ids int32 [B, L, K], mask bool [B, L]
  -> [B, H * d_h]. Keys and values are recomputed for every (candidate, behaviour) pair.
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
      rngs: nnx.Rngs | None = None,
      weights: FusionAttentionWeights | None = None,
  ):
    if weights is None:
      if rngs is None:
        raise ValueError("EarlyFusionTargetAttention needs `rngs` (or existing `weights`)")
      weights = FusionAttentionWeights(
          id_dim=id_dim, num_buckets=num_buckets, bucket_dim=bucket_dim,
          num_modalities=num_modalities, num_heads=num_heads, head_dim=head_dim, rngs=rngs,
      )
    self.weights = weights

  @property
  def out_dim(self) -> int:
    return self.weights.num_heads * self.weights.head_dim

  def _attend(self, q, behaviors, bucket_ids, mask):
    """q [N, H, d_h], behaviors [N, L, d], bucket_ids [N, L, K], mask [N, L] -> [N, H*d_h].

    Every (candidate, behaviour) token x = [e_j ; E[b]] goes through W_K and W_V.
    """
    w = self.weights
    bucket_ids = jnp.clip(bucket_ids, 0, w.num_buckets - 1)
    tokens = jnp.concatenate([behaviors, w.buckets(bucket_ids)], axis=-1)  # [N, L, d + K*d_z]
    shape = (*tokens.shape[:2], w.num_heads, w.head_dim)
    keys = (tokens @ w.key[...]).reshape(shape)
    values = (tokens @ w.value[...]).reshape(shape)
    scores = jnp.sum(q[:, None] * keys, axis=-1) / jnp.sqrt(w.head_dim)  # [N, L, H]
    a = masked_softmax(scores, mask[..., None], axis=1)
    return jnp.sum(a[..., None] * values, axis=1).reshape(q.shape[0], -1)

  def __call__(self, target_id_emb, behavior_id_emb, bucket_ids, mask):
    w = self.weights
    _validate_inputs(
        "EarlyFusionTargetAttention", target_id_emb, behavior_id_emb, mask, w.id_dim,
        bucket_ids, w.num_modalities, w.num_buckets,
    )
    return self._attend(w.queries(target_id_emb), behavior_id_emb, bucket_ids, mask)

  def call_from_table(self, target_id_emb, item_table, rows, bucket_ids, mask):
    """`self(target_id_emb, item_table[rows], bucket_ids, mask)`. Early fusion's keys and values
    depend on the candidate, so nothing moves to the table rows: it gathers the tokens."""
    _validate_table("EarlyFusionTargetAttention", item_table, rows, mask, self.weights.id_dim)
    return self(target_id_emb, take_rows(item_table, rows), bucket_ids, mask)

  def score_candidates(self, behavior_id_emb, mask, target_id_emb, bucket_ids):
    """Serving reference: one user [L, d], [L] against N candidates [N, d], [N, L, K] -> [N, H*d_h].

    The behaviour embeddings are shared, but the tokens (and so K and V) are per candidate.
    """
    n = target_id_emb.shape[0]
    behaviors = jnp.broadcast_to(behavior_id_emb, (n, *behavior_id_emb.shape))
    return self._attend(self.weights.queries(target_id_emb), behaviors, bucket_ids,
                        jnp.broadcast_to(mask, (n, mask.shape[-1])))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DTAUserState:
  """The target-agnostic part of DTA for one user (or a batch of users, with a leading dim).

  key_id, value_id: [..., H, L, d_h] = W^id e_j (head-major); mask: bool [..., L].
  """

  key_id: jax.Array
  value_id: jax.Array
  mask: jax.Array


class DecoupledTargetAttention(nnx.Module):
  """Early fusion's function, with the per-user part separated from the per-candidate part.

  __call__ has the signature and result of `EarlyFusionTargetAttention.__call__`. For serving,
  `encode_user` runs once per request and `score_candidates` scores N candidates against it.
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
      rngs: nnx.Rngs | None = None,
      weights: FusionAttentionWeights | None = None,
  ):
    if weights is None:
      if rngs is None:
        raise ValueError("DecoupledTargetAttention needs `rngs` (or existing `weights`)")
      weights = FusionAttentionWeights(
          id_dim=id_dim, num_buckets=num_buckets, bucket_dim=bucket_dim,
          num_modalities=num_modalities, num_heads=num_heads, head_dim=head_dim, rngs=rngs,
      )
    self.weights = weights

  @classmethod
  def from_early_fusion(cls, ef: EarlyFusionTargetAttention) -> "DecoupledTargetAttention":
    """A DTA sharing `ef`'s weights (the same Params: training one trains the other)."""
    return cls(**ef.weights.config(), weights=ef.weights)

  @property
  def out_dim(self) -> int:
    return self.weights.num_heads * self.weights.head_dim

  def encode_user(self, behavior_id_emb: jax.Array, mask: jax.Array) -> DTAUserState:
    """Target-agnostic part: behaviours [..., L, d], mask [..., L] -> DTAUserState."""
    w = self.weights
    checks.check_floating("behavior_id_emb", behavior_id_emb)
    checks.check_bool("mask", mask)
    if behavior_id_emb.shape[-1] != w.id_dim or behavior_id_emb.shape[:-1] != mask.shape:
      raise ValueError(
          f"encode_user: behavior_id_emb {tuple(behavior_id_emb.shape)} and mask "
          f"{tuple(mask.shape)} must be [..., L, {w.id_dim}] and [..., L]"
      )
    return DTAUserState(
        key_id=w.id_projection(w.key[...], behavior_id_emb),
        value_id=w.id_projection(w.value[...], behavior_id_emb),
        mask=mask,
    )

  def encode_user_from_table(self, item_table: jax.Array, rows: jax.Array, mask: jax.Array
                             ) -> DTAUserState:
    """`encode_user(item_table[rows], mask)` with W^id applied to the V table rows once:
    item_table [V, d], rows int [..., L] in [0, V), mask [..., L]. For catalogs smaller than
    the batch's B * L behaviour positions (training on a small catalog)."""
    w = self.weights
    _validate_table("DecoupledTargetAttention", item_table, rows, mask, w.id_dim)
    return DTAUserState(
        key_id=w.id_projection_rows(w.key[...], item_table, rows),
        value_id=w.id_projection_rows(w.value[...], item_table, rows),
        mask=mask,
    )

  def _side(self, q: jax.Array, bucket_ids: jax.Array):
    """Per-candidate bucket side of the scores.

    q [N, H, d_h], bucket_ids [N, L, K] -> (sum_k (q . T_K^k)[b_k] as [N, H, L], the clipped
    bucket ids [N, L, K]). q . T_K^k is computed for all nb buckets (a GEMM), then gathered.
    """
    w = self.weights
    buckets = jnp.clip(bucket_ids, 0, w.num_buckets - 1)
    q_side = jnp.einsum("nhd,kmhd->nkhm", q, w.bucket_tables(w.key[...]))  # [N, K, H, nb]
    index = jnp.transpose(buckets, (0, 2, 1))[:, :, None, :]  # [N, K, 1, L]
    return jnp.take_along_axis(q_side, index, axis=3).sum(axis=1), buckets

  def _finish(self, scores, mask, buckets, id_values):
    """Softmax over L and the values: scores [N, H, L], mask [N or 1, L] -> [N, H * d_h].

    `id_values(a)` returns sum_j a_j V_j^id [N, H, d_h] for attention weights a [N, H, L]; the
    bucket part is sum_b A_b T_V[b], with A_b the attention mass falling in bucket b: a
    segment sum of the weights over (candidate, modality, bucket) ids.
    """
    w = self.weights
    a = masked_softmax(scores / jnp.sqrt(w.head_dim), mask[:, None, :])
    n, seq_len, k = buckets.shape
    rows = jnp.broadcast_to(jnp.transpose(a, (0, 2, 1))[:, :, None, :], (n, seq_len, k, w.num_heads))
    segment = (jnp.arange(n)[:, None, None] * k + jnp.arange(k)[None, None, :]) * w.num_buckets
    mass = segment_sum_rows(
        rows.reshape(-1, w.num_heads), (segment + buckets).reshape(-1), n * k * w.num_buckets
    ).reshape(n, k, w.num_buckets, w.num_heads)  # [N, K, nb, H]
    out = id_values(a) + jnp.einsum("nkmh,kmhd->nhd", mass, w.bucket_tables(w.value[...]))
    return out.reshape(n, -1)

  def score_candidates(
      self, user: DTAUserState, target_id_emb: jax.Array, bucket_ids: jax.Array
  ) -> jax.Array:
    """One user's state ([L, H, d_h]) against N candidates: [N, d], [N, L, K] -> [N, H*d_h]."""
    w = self.weights
    checks.check_rank("target_id_emb", target_id_emb, 2)
    checks.check_rank("bucket_ids", bucket_ids, 3)
    checks.check_integer("bucket_ids", bucket_ids)
    checks.check_shape(
        "bucket_ids", bucket_ids, (target_id_emb.shape[0], user.mask.shape[-1], w.num_modalities)
    )
    checks.check_ids_in_range("bucket_ids", bucket_ids, w.num_buckets)
    q = w.queries(target_id_emb)
    side, buckets = self._side(q, bucket_ids)
    # One plain 2-D GEMM per head against the shared user part (faster on CPU than a batched
    # einsum over the head axis).
    heads = range(w.num_heads)
    scores = jnp.stack([q[:, h] @ user.key_id[h].T for h in heads], axis=1) + side
    return self._finish(scores, user.mask[None], buckets,
                        lambda a: jnp.stack([a[:, h] @ user.value_id[h] for h in heads], axis=1))

  def attend(self, user: DTAUserState, target_id_emb: jax.Array, bucket_ids: jax.Array
             ) -> jax.Array:
    """Each example's own user state ([B, H, L, d_h]) against its candidate: target [B, d],
    bucket_ids [B, L, K] -> [B, H * d_h]."""
    w = self.weights
    batch, _, seq_len, _ = user.key_id.shape
    checks.check_shape("target_id_emb", target_id_emb, (batch, w.id_dim))
    checks.check_integer("bucket_ids", bucket_ids)
    checks.check_shape("bucket_ids", bucket_ids, (batch, seq_len, w.num_modalities))
    checks.check_ids_in_range("bucket_ids", bucket_ids, w.num_buckets)
    q = w.queries(target_id_emb)
    side, buckets = self._side(q, bucket_ids)
    # Per-example products, head-major (the layout XLA's CPU backend runs fastest).
    scores = jnp.einsum("bhd,bhld->bhl", q, user.key_id) + side
    return self._finish(scores, user.mask, buckets,
                        lambda a: jnp.einsum("bhl,bhld->bhd", a, user.value_id))

  def __call__(self, target_id_emb, behavior_id_emb, bucket_ids, mask):
    w = self.weights
    _validate_inputs(
        "DecoupledTargetAttention", target_id_emb, behavior_id_emb, mask, w.id_dim,
        bucket_ids, w.num_modalities, w.num_buckets,
    )
    return self.attend(self.encode_user(behavior_id_emb, mask), target_id_emb, bucket_ids)

  def call_from_table(self, target_id_emb, item_table, rows, bucket_ids, mask):
    """`self(target_id_emb, item_table[rows], bucket_ids, mask)`, with W^id applied to the V
    table rows once (`encode_user_from_table`)."""
    return self.attend(self.encode_user_from_table(item_table, rows, mask), target_id_emb,
                       bucket_ids)
