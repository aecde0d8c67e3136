"""Target attention: numpy references, DTA == early fusion (values and gradients), serving split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import reference
from dmf_jax.core.rows import Rows
from dmf_jax.nn import attention
from dmf_jax.nn.attention import (
    DecoupledTargetAttention,
    DinAttention,
    EarlyFusionTargetAttention,
    HeadsUserState,
    MultiHeadTargetAttention,
    TokensUserState,
    masked_softmax,
)

ID_DIM, NUM_BUCKETS, BUCKET_DIM = 12, 7, 5


def make_inputs(rng, batch, seq_len, num_modalities):
  target = rng.normal(size=(batch, ID_DIM)).astype(np.float32)
  behaviors = rng.normal(size=(batch, seq_len, ID_DIM)).astype(np.float32)
  buckets = rng.integers(0, NUM_BUCKETS, size=(batch, seq_len, num_modalities)).astype(np.int32)
  mask = rng.random((batch, seq_len)) < 0.6
  mask[0] = False  # an all-masked row
  mask[1] = True  # a full row
  return target, behaviors, buckets, mask


def make_ef(num_modalities, num_heads, head_dim=4, seed=0):
  ef = EarlyFusionTargetAttention(
      id_dim=ID_DIM, num_buckets=NUM_BUCKETS, bucket_dim=BUCKET_DIM,
      num_modalities=num_modalities, num_heads=num_heads, head_dim=head_dim,
      rngs=nnx.Rngs(seed),
  )
  # Non-trivial bucket tables (the default init is small): scale them up.
  ef.weights.buckets.tables[...] = ef.weights.buckets.tables[...] * 20.0
  return ef


def test_masked_softmax_matches_numpy_and_zeroes_all_masked_rows():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(4, 3, 9)).astype(np.float32) * 5
  mask = rng.random((4, 3, 9)) < 0.5
  mask[2, 1] = False
  got = np.asarray(masked_softmax(jnp.asarray(scores), jnp.asarray(mask)))
  np.testing.assert_allclose(got, reference.softmax_masked(scores, mask), rtol=1e-5, atol=1e-7)
  assert np.all(got[2, 1] == 0)


@pytest.mark.parametrize("seq_len,num_modalities,num_heads", [(1, 1, 1), (9, 2, 3), (16, 3, 2)])
def test_early_fusion_matches_numpy_reference(seq_len, num_modalities, num_heads):
  rng = np.random.default_rng(seq_len)
  ef = make_ef(num_modalities, num_heads)
  t, e, b, m = make_inputs(rng, 5, seq_len, num_modalities)
  got = np.asarray(ef(jnp.asarray(t), jnp.asarray(e), jnp.asarray(b), jnp.asarray(m)))
  w = ef.weights
  want = reference.early_fusion(
      np.asarray(w.query[...]), np.asarray(w.key[...]), np.asarray(w.value[...]),
      np.asarray(w.buckets.tables[...]), t, e, b, m, num_heads,
  )
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert np.all(got[0] == 0.0)


@pytest.mark.parametrize("lookup_mode", ["gather", "one_hot"])
@pytest.mark.parametrize(
    "seq_len,num_modalities,num_heads,head_dim",
    [(1, 1, 1, 4), (7, 2, 2, 4), (20, 3, 4, 8), (33, 1, 3, 5)],
)
def test_dta_equals_early_fusion_values_and_gradients(seq_len, num_modalities, num_heads, head_dim,
                                                      lookup_mode):
  """Both bucket lookups (scalar gathers and a segment sum; one-hot matmuls, TPU's)."""
  rng = np.random.default_rng(100 + seq_len)
  ef = make_ef(num_modalities, num_heads, head_dim, seed=seq_len)
  dta = DecoupledTargetAttention.from_early_fusion(ef, lookup_mode=lookup_mode)
  t, e, b, m = make_inputs(rng, 6, seq_len, num_modalities)
  cot = jnp.asarray(rng.normal(size=(6, num_heads * head_dim)), jnp.float32)

  def objective(module):
    graphdef, state = nnx.split(module)

    def f(state, target, behaviors):
      out = nnx.merge(graphdef, state)(target, behaviors, jnp.asarray(b), jnp.asarray(m))
      return jnp.sum(out * cot), out

    return jax.grad(f, argnums=(0, 1, 2), has_aux=True)(state, jnp.asarray(t), jnp.asarray(e))

  (g_ef, out_ef) = objective(ef)
  (g_dta, out_dta) = objective(dta)
  np.testing.assert_allclose(out_dta, out_ef, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(out_dta)[0] == 0.0)
  ef_state, dta_state = g_ef[0], g_dta[0]
  paths_ef = {p for p, _ in nnx.to_flat_state(ef_state)}
  paths_dta = {p for p, _ in nnx.to_flat_state(dta_state)}
  assert paths_ef == paths_dta and len(paths_ef) == 4  # query, key, value, bucket tables
  for (path, a), (_, c) in zip(nnx.to_flat_state(ef_state), nnx.to_flat_state(dta_state)):
    a, c = np.asarray(a[...]), np.asarray(c[...])
    if seq_len > 1:  # with one behaviour the softmax is constant: query/key grads are 0
      assert np.abs(a).max() > 0, path  # every weight really receives gradient
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-5, err_msg=str(path))
  for a, c in zip(g_ef[1:], g_dta[1:]):
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(np.asarray(g_dta[2])))
  assert np.all(np.asarray(g_dta[2])[0] == 0.0)  # all-masked row: no gradient to its behaviours


def test_dta_serving_split_equals_batched_call():
  rng = np.random.default_rng(5)
  ef = make_ef(2, 2)
  dta = DecoupledTargetAttention.from_early_fusion(ef)
  seq_len, n = 11, 9
  t, e, b, m = make_inputs(rng, n, seq_len, 2)
  # One user: the same behaviours and mask for all N candidates, each with its own buckets.
  user_e, user_m = e[3], m[3]
  batched = dta(jnp.asarray(t), jnp.broadcast_to(user_e, (n, seq_len, ID_DIM)),
                jnp.asarray(b), jnp.broadcast_to(user_m, (n, seq_len)))
  # The same two calls with one user (B = 1) and N candidates.
  state = dta.encode_user(jnp.asarray(user_e)[None], jnp.asarray(user_m)[None])
  assert isinstance(state, TokensUserState)  # per-position tokens: projected in attend
  assert not attention.fold_into_queries(n, seq_len, ID_DIM, 4)
  served = dta.attend(state, jnp.asarray(t)[None], jnp.asarray(b)[None])[0]
  np.testing.assert_allclose(np.asarray(served), np.asarray(batched), rtol=1e-5, atol=1e-6)
  ef_state = ef.encode_user(jnp.asarray(user_e)[None], jnp.asarray(user_m)[None])
  ef_served = ef.attend(ef_state, jnp.asarray(t)[None], jnp.asarray(b)[None])[0]
  np.testing.assert_allclose(np.asarray(ef_served), np.asarray(batched), rtol=1e-5, atol=1e-5)


def test_dta_from_item_rows_equals_gathered_behaviours():
  """encode_user(Rows(T, rows)) == encode_user(T[rows]); values and gradients through
  attend, with padding and an all-masked row."""
  rng = np.random.default_rng(11)
  dta = DecoupledTargetAttention.from_early_fusion(make_ef(2, 3))
  t, _, b, m = make_inputs(rng, 6, 9, 2)
  table = jnp.asarray(rng.normal(size=(17, ID_DIM)).astype(np.float32))
  rows = jnp.asarray(rng.integers(0, 17, size=(6, 9)).astype(np.int32))
  t, b, m = jnp.asarray(t), jnp.asarray(b), jnp.asarray(m)

  def from_table(table, target):
    return dta.attend(dta.encode_user(Rows(table, rows), m), target[:, None], b[:, None])[:, 0]

  def gathered(table, target):
    return dta(target, table[rows], b, m)

  state = dta.encode_user(Rows(table, rows), m)  # a table's rows: projected, then gathered
  want = attention.heads_for(dta.encode_user(table[rows], m), 100, *dta._id_kernels(), 3, 4)
  assert isinstance(state, HeadsUserState) and isinstance(want, HeadsUserState)
  assert state.key_id.shape == (6, 3, 9, 4)  # head-major [B, H, L, d_h]
  np.testing.assert_allclose(state.key_id, want.key_id, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.value_id, want.value_id, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(from_table(table, t), gathered(table, t), rtol=1e-5, atol=1e-6)
  w = jnp.asarray(rng.normal(size=(6, 3 * 4)).astype(np.float32))
  grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1))(table, t)
  for got, want in zip(grad(from_table), grad(gathered)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="rows: id 17 .* out of range"):
    dta.encode_user(Rows(table, rows.at[2, 3].set(17)), m)
  with pytest.raises(ValueError, match=r"item rows: expected shape \('\?', 12\)"):
    dta.encode_user(Rows(table[:, :5], rows), m)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("fold", [True, False])
def test_tokens_folded_into_queries_or_projected_equal_early_fusion(monkeypatch, fold, n):
  """Behaviour tokens per position (`TokensUserState`): DTA and the ID-only attention with
  the kernels folded into the queries, or the tokens projected, equal early fusion's plain
  projection of every token (float64, values and gradients), for one and several candidates
  per user, with padding and an all-masked user."""
  monkeypatch.setattr(attention, "fold_into_queries", lambda *a: fold)
  rng = np.random.default_rng(31 + n)
  seq_len, k = 9, 2
  ef = make_ef(k, 3, head_dim=5, seed=n)
  dta = DecoupledTargetAttention.from_early_fusion(ef)
  mha = MultiHeadTargetAttention(id_dim=ID_DIM, num_heads=3, head_dim=5, rngs=nnx.Rngs(n))
  _, e, _, m = make_inputs(rng, 4, seq_len, k)
  t = rng.normal(size=(4, n, ID_DIM))
  b = rng.integers(0, NUM_BUCKETS, size=(4, n, seq_len, k)).astype(np.int32)
  cot = rng.normal(size=(4, n, 15))

  def objective(module, split):
    graphdef, params = nnx.split(module)

    def f(params, target, behaviors):
      mod = nnx.merge(graphdef, params)
      if split:
        state = mod.encode_user(behaviors, jnp.asarray(m))
        assert isinstance(state, TokensUserState)
        out = mod.attend(state, target, jnp.asarray(b))
      elif isinstance(mod, MultiHeadTargetAttention):  # the plain form: every token projected
        state = attention.HeadsUserState(*(jnp.swapaxes(
            (behaviors @ w[...]).reshape(4, seq_len, 3, 5), 1, 2) for w in (mod.key, mod.value)),
            jnp.asarray(m))
        out = mod.attend(state, target)
      else:
        out = mod.attend(mod.encode_user(behaviors, jnp.asarray(m)), target, jnp.asarray(b))
      return jnp.sum(out * cot)

    with jax.enable_x64(True):
      params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
      value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(
          params, jnp.asarray(t, jnp.float64), jnp.asarray(e, jnp.float64))
      return value, jax.tree.map(np.asarray, grads)

  for got_module, want_module in ((dta, ef), (mha, mha)):
    got, got_grads = objective(got_module, True)
    want, want_grads = objective(want_module, False)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for a, c in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(a, c, rtol=1e-10, atol=1e-12)
    assert all(np.abs(c).max() > 1e-3 for c in jax.tree.leaves(want_grads))
    assert np.all(got_grads[2][0] == 0.0)  # the all-masked user's behaviours: no gradient


def test_fold_into_queries_for_training_not_for_serving():
  """One candidate per user (training) folds; thousands per user (serving) project."""
  assert attention.fold_into_queries(1, 50, 56, 32)
  assert not attention.fold_into_queries(1000, 50, 56, 32)


def test_dta_under_jit_matches_eager():
  rng = np.random.default_rng(6)
  dta = DecoupledTargetAttention.from_early_fusion(make_ef(2, 2))
  args = [jnp.asarray(a) for a in make_inputs(rng, 4, 6, 2)]
  jitted = nnx.jit(lambda mod, *a: mod(*a))
  np.testing.assert_allclose(np.asarray(jitted(dta, *args)), np.asarray(dta(*args)),
                             rtol=1e-6, atol=1e-6)


def test_multi_head_target_attention_matches_reference():
  rng = np.random.default_rng(7)
  mha = MultiHeadTargetAttention(id_dim=ID_DIM, num_heads=3, head_dim=4, rngs=nnx.Rngs(1))
  t, e, _, m = make_inputs(rng, 5, 8, 1)
  got = np.asarray(mha(jnp.asarray(t), jnp.asarray(e), jnp.asarray(m)))
  # The ID-only attention is early fusion with no side blocks.
  want = reference.early_fusion(
      np.asarray(mha.query[...]), np.asarray(mha.key[...]), np.asarray(mha.value[...]),
      np.zeros((0, NUM_BUCKETS, 0)), t, e, np.zeros((5, 8, 0), np.int64), m, 3,
  )
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # From an item table: the projections run on the table rows, then gather.
  table = jnp.asarray(rng.normal(size=(9, ID_DIM)).astype(np.float32))
  rows = jnp.asarray(rng.integers(0, 9, size=(5, 8)).astype(np.int32))
  from_rows = mha.attend(mha.encode_user(Rows(table, rows), jnp.asarray(m)),
                         jnp.asarray(t)[:, None])[:, 0]
  np.testing.assert_allclose(from_rows, mha(jnp.asarray(t), table[rows], jnp.asarray(m)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_din_attention_matches_reference(normalization):
  rng = np.random.default_rng(8)
  din = DinAttention(ID_DIM, hidden=(6, 4), normalization=normalization, rngs=nnx.Rngs(2))
  t, e, _, m = make_inputs(rng, 4, 5, 1)
  got = np.asarray(din(jnp.asarray(t), jnp.asarray(e), jnp.asarray(m)))
  sig = lambda x: 1 / (1 + np.exp(-x))
  q = np.broadcast_to(t[:, None], e.shape).astype(np.float64)
  h = np.concatenate([q, e, q - e, q * e], -1)
  for layer in din.hidden:
    h = sig(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]))
  scores = (h @ np.asarray(din.score.kernel[...]) + np.asarray(din.score.bias[...]))[..., 0]
  w = reference.softmax_masked(scores, m) if normalization == "softmax" else scores * m
  np.testing.assert_allclose(got, np.einsum("bl,bld->bd", w, e), rtol=2e-5, atol=2e-6)
  assert np.all(got[0] == 0)


def test_din_attention_with_side_features_and_item_rows_matches_reference():
  """Keys [e_j ; s_tj] with candidate-dependent s, from item rows, N candidates per user."""
  rng = np.random.default_rng(18)
  side_dim, n = 3, 4
  din = DinAttention(ID_DIM + side_dim, hidden=(6,), side_dim=side_dim, rngs=nnx.Rngs(4))
  table = rng.normal(size=(10, ID_DIM)).astype(np.float32)
  rows = rng.integers(0, 10, size=(2, 5)).astype(np.int32)
  m = rng.random((2, 5)) < 0.7
  query = rng.normal(size=(2, n, ID_DIM + side_dim)).astype(np.float32)
  side = rng.normal(size=(2, n, 5, side_dim)).astype(np.float32)
  state = din.encode_user(Rows(jnp.asarray(table), jnp.asarray(rows)), jnp.asarray(m))
  got = np.asarray(din.attend(state, jnp.asarray(query), jnp.asarray(side)))
  sig = lambda x: 1 / (1 + np.exp(-x))
  keys = np.concatenate([np.broadcast_to(table[rows][:, None], (2, n, 5, ID_DIM)), side], -1)
  q = np.broadcast_to(query[:, :, None], keys.shape).astype(np.float64)
  h = np.concatenate([q, keys, q - keys, q * keys], -1)
  for layer in din.hidden:
    h = sig(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]))
  scores = (h @ np.asarray(din.score.kernel[...]) + np.asarray(din.score.bias[...]))[..., 0]
  want = np.einsum("bnl,bnld->bnd", scores * m[:, None], keys)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  with pytest.raises(ValueError, match="side features are required"):
    din.attend(state, jnp.asarray(query))


@pytest.mark.parametrize("side_dim,n", [(0, 1), (0, 3), (2, 1), (2, 3)])
def test_decoupled_din_equals_the_plain_unit_in_values_and_gradients(side_dim, n):
  """DIN's first layer split into query, key-row and pair parts (keys from item rows) against
  the plain W [q ; k ; q - k ; q * k] in float64: the output and the gradients of every
  parameter, the item rows, the queries and the side features."""
  rng = np.random.default_rng(19)
  d = ID_DIM + side_dim
  din = DinAttention(d, hidden=(6, 5), side_dim=side_dim, rngs=nnx.Rngs(5))
  table = jnp.asarray(rng.normal(size=(9, ID_DIM)).astype(np.float32))
  rows = jnp.asarray(rng.integers(0, 9, size=(3, 7)).astype(np.int32))
  mask = jnp.asarray(rng.random((3, 7)) < 0.7)
  query = jnp.asarray(rng.normal(size=(3, n, d)).astype(np.float32))
  side = jnp.asarray(rng.normal(size=(3, n, 7, side_dim)).astype(np.float32)) if side_dim else None
  cotangent = rng.normal(size=(3, n, d))
  graphdef, params = nnx.split(din)

  def decoupled(params, table, query, side):
    module = nnx.merge(graphdef, params)
    out = module.attend(module.encode_user(Rows(table, rows), mask), query, side)
    return jnp.sum(out * cotangent.astype(np.float32))

  def plain(params, table, query, side):  # the DIN paper's unit, written out
    keys = jnp.broadcast_to(table[rows][:, None], (3, n, 7, ID_DIM))
    if side is not None:
      keys = jnp.concatenate([keys, side], -1)
    q = jnp.broadcast_to(query[:, :, None], keys.shape)
    h = jnp.concatenate([q, keys, q - keys, q * keys], -1)
    layers = params["hidden"]
    for i in range(len(layers)):
      h = jax.nn.sigmoid(h @ layers[i]["kernel"][...] + layers[i]["bias"][...])
    scores = (h @ params["score"]["kernel"][...] + params["score"]["bias"][...])[..., 0]
    out = jnp.einsum("bnl,bnld->bnd", scores * mask[:, None], keys)
    return jnp.sum(out * cotangent)

  args = (params, table, query, side)
  got, got_grads = jax.value_and_grad(decoupled, argnums=(0, 1, 2, 3))(*args)
  with jax.enable_x64(True):
    as64 = lambda x: jnp.asarray(np.asarray(x), jnp.float64)
    want, want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2, 3))(
        *jax.tree.map(as64, args))
    want_grads = jax.tree.map(np.asarray, want_grads)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
  assert any(np.abs(b).max() > 1e-2 for b in jax.tree.leaves(want_grads))


class TestBadInputs:
  def setup_method(self):
    rng = np.random.default_rng(9)
    self.dta = DecoupledTargetAttention.from_early_fusion(make_ef(2, 2))
    self.args = [jnp.asarray(a) for a in make_inputs(rng, 3, 4, 2)]

  def call(self, **replace):
    names = ["target_id_emb", "behavior_id_emb", "bucket_ids", "mask"]
    args = dict(zip(names, self.args)) | replace
    return self.dta(*[args[n] for n in names])

  def test_wrong_rank_names_argument(self):
    with pytest.raises(ValueError, match="target_id_emb: expected rank 2"):
      self.call(target_id_emb=self.args[0][None])

  def test_mismatched_sequence_length(self):
    with pytest.raises(ValueError, match="mismatched L .*behavior_id_emb=4.*bucket_ids=5"):
      self.call(bucket_ids=jnp.zeros((3, 5, 2), jnp.int32))
    with pytest.raises(ValueError, match="mismatched L .*mask=6"):
      self.call(mask=jnp.ones((3, 6), bool))

  def test_wrong_id_dim_and_modalities(self):
    with pytest.raises(ValueError, match="behavior_id_emb: expected shape"):
      self.call(behavior_id_emb=jnp.zeros((3, 4, ID_DIM + 1)))
    with pytest.raises(ValueError, match="bucket_ids: expected shape"):
      self.call(bucket_ids=jnp.zeros((3, 4, 3), jnp.int32))

  def test_wrong_dtypes(self):
    with pytest.raises(TypeError, match="bucket_ids: expected an integer dtype"):
      self.call(bucket_ids=self.args[2].astype(jnp.float32))
    with pytest.raises(TypeError, match="mask: expected a bool mask"):
      self.call(mask=self.args[3].astype(jnp.int32))
    with pytest.raises(TypeError, match="target_id_emb: expected a floating dtype"):
      self.call(target_id_emb=self.args[0].astype(jnp.int32))

  def test_out_of_range_buckets_rejected_eagerly(self):
    with pytest.raises(ValueError, match=f"bucket_ids: id {NUM_BUCKETS} .* out of range"):
      self.call(bucket_ids=self.args[2].at[1, 2, 0].set(NUM_BUCKETS))

  def test_needs_rngs_or_weights(self):
    with pytest.raises(ValueError, match="needs `rngs`"):
      DecoupledTargetAttention(id_dim=4, num_buckets=2, bucket_dim=2, num_modalities=1,
                               num_heads=1, head_dim=2)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
      EarlyFusionTargetAttention(id_dim=4, num_buckets=2, bucket_dim=2, num_modalities=1,
                                 num_heads=0, head_dim=2, rngs=nnx.Rngs(0))
