"""EM3: Fusion-Q-Former, LoRA, the Content-ID contrastive loss, and the em3 model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import jitted, take, tiny_problem, train_steps
from dmf_jax.nn import losses
from dmf_jax.nn import lora
from dmf_jax.core.rows import Rows
from dmf_jax.models import base as model_base
from dmf_jax.models import registry
from dmf_jax.train import steps as training
from dmf_jax.nn.qformer import FusionQFormer

RNG = np.random.default_rng(0)


def qformer(dims, **kw):
  return FusionQFormer(dims, width=16, num_queries=3, num_layers=2, num_heads=2, out_dim=12,
                       rngs=nnx.Rngs(1), **kw)


@pytest.mark.parametrize("dims", [(7,), (7, 5), (7, 5, 9)])
def test_qformer_output_size_is_fixed_whatever_the_modalities(dims):
  vectors = [jnp.asarray(RNG.normal(size=(4, 6, d)), jnp.float32) for d in dims]
  out = qformer(dims)(vectors)
  assert out.shape == (4, 6, 12) and np.all(np.isfinite(np.asarray(out)))


def test_qformer_ignores_padding_and_its_position():
  module = qformer((7, 5, 9))
  tokens = jnp.asarray(RNG.normal(size=(8, 5, 16)), jnp.float32)
  mask = jnp.asarray(RNG.random((8, 5)) < 0.6).at[:, 0].set(True)
  out = module.fuse_tokens(tokens, mask)
  # Other values in the padded slots: same output.
  noise = jnp.asarray(RNG.normal(size=tokens.shape) * 100, jnp.float32)
  np.testing.assert_allclose(module.fuse_tokens(jnp.where(mask[..., None], tokens, noise), mask),
                             out, rtol=1e-5, atol=1e-5)
  # Padding moved elsewhere (tokens permuted per row): same output.
  perm = np.stack([RNG.permutation(5) for _ in range(8)])
  rows = np.arange(8)[:, None]
  np.testing.assert_allclose(module.fuse_tokens(tokens[rows, perm], mask[rows, perm]), out,
                             rtol=1e-5, atol=1e-5)
  # A missing modality (all-zero vector) is masked: changing its projection input is a no-op.
  vectors = [jnp.asarray(RNG.normal(size=(8, d)), jnp.float32) for d in (7, 5, 9)]
  vectors[1] = vectors[1].at[:3].set(0.0)
  present = jnp.stack([jnp.any(v != 0, -1) for v in vectors], -1)
  assert not bool(present[:3, 1].any()) and bool(present[3:, 1].all())
  a = module(vectors)
  shifted = [vectors[0], vectors[1].at[:3].set(5.0), vectors[2]]
  np.testing.assert_allclose(module(shifted, present)[:3], a[:3], rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(np.asarray(module(shifted)[:3] - a[:3]))) > 1e-3  # unmasked: it counts


def test_qformer_modality_dropout_only_in_training():
  module = qformer((7, 5), modality_dropout=0.5)
  vectors = [jnp.asarray(RNG.normal(size=(64, d)), jnp.float32) for d in (7, 5)]
  np.testing.assert_array_equal(module(vectors), module(vectors))
  trained = module(vectors, train=True, rngs=nnx.Rngs(dropout=3))
  assert np.max(np.abs(np.asarray(trained - module(vectors)))) > 1e-3
  with pytest.raises(ValueError, match="modality dropout in training needs `rngs`"):
    module(vectors, train=True)
  with pytest.raises(ValueError, match=r"vectors\[1\]"):
    module([vectors[0], vectors[0]])


def adapted_module(include=r"layers/.*|output", rank=3):
  module = qformer((7, 5))
  paths = lora.add_lora(module, rank=rank, alpha=6.0, include=include, rngs=nnx.Rngs(2))
  return module, paths


def test_lora_zero_b_leaves_outputs_unchanged_and_merges_exactly():
  module, paths = adapted_module()
  assert "output" in paths and "layers/1/query" in paths and "projections/0" not in paths
  vectors = [jnp.asarray(RNG.normal(size=(10, d)), jnp.float32) for d in (7, 5)]
  np.testing.assert_allclose(module(vectors, adapted=True), module(vectors), rtol=1e-6, atol=1e-6)
  for layer in lora.adaptable_layers(module).values():  # non-zero B: now the adapters count
    if layer.adapter is not None:
      layer.adapter.b[...] = jnp.asarray(RNG.normal(size=layer.adapter.b.shape) * 0.3,
                                         jnp.float32)
  adapted = module(vectors, adapted=True)
  assert np.max(np.abs(np.asarray(adapted - module(vectors)))) > 1e-3
  merged = lora.merge_lora(module)
  np.testing.assert_allclose(merged(vectors), adapted, rtol=1e-5, atol=1e-5)
  assert all(l.adapter is None for l in lora.adaptable_layers(merged).values())
  with pytest.raises(ValueError, match="pattern 'attn/.\\*' matches no layer"):
    lora.add_lora(qformer((7,)), rank=2, alpha=1.0, include="attn/.*", rngs=nnx.Rngs(0))


def test_lora_trains_only_the_adapters():
  module, _ = adapted_module()
  vectors = [jnp.asarray(RNG.normal(size=(32, d)), jnp.float32) for d in (7, 5)]
  target = jnp.asarray(RNG.normal(size=(32, 12)), jnp.float32)

  def loss(m):
    return jnp.mean((m(vectors, adapted=True) - target) ** 2)

  grads = nnx.jit(nnx.grad(loss))(module)
  flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  base = {k: v for k, v in flat.items() if "/adapter/" not in k}
  adapters = {k: v for k, v in flat.items() if "/adapter/" in k}
  assert all(np.all(v == 0) for v in base.values())  # frozen base: no gradient at all
  assert any(np.any(v != 0) for v in adapters.values())
  params = lambda: {"/".join(map(str, p)): np.asarray(v[...])
                    for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  before = params()
  optimizer = nnx.Optimizer(module, optax.adamw(1e-2, weight_decay=0.5), wrt=lora.LoRAParam)

  @nnx.jit
  def train_step(module, optimizer):
    optimizer.update(module, nnx.grad(loss, argnums=nnx.DiffState(0, lora.LoRAParam))(module))

  for _ in range(3):
    train_step(module, optimizer)
  after = params()
  for key, value in before.items():
    changed = not np.array_equal(value, after[key])
    assert changed == ("/adapter/" in key), key


def numpy_info_nce(a, cand, ids, cand_ids, t):
  a, cand = np.asarray(a, np.float64), np.asarray(cand, np.float64)
  total = 0.0
  for i in range(len(a)):
    logits = a[i] @ cand.T / t
    keep = [j for j in range(len(cand)) if j == i or cand_ids[j] != ids[i]]
    z = logits[keep]
    total += np.log(np.sum(np.exp(z - z.max()))) + z.max() - logits[i]
  return total / len(a)


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contrastive_loss_matches_numpy_and_is_symmetric():
  b, m, d, t = 9, 6, 5, 0.1
  ids = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5])  # duplicates: 1 and 5
  neg_ids = np.array([7, 3, 8, 4, 0, 11])  # sampled negatives 3 and 4 equal batch items
  c, e = unit(RNG.normal(size=(b, d))), unit(RNG.normal(size=(b, d)))
  nc, ne = unit(RNG.normal(size=(m, d))), unit(RNG.normal(size=(m, d)))
  got = losses.symmetric_info_nce(jnp.asarray(c), jnp.asarray(e), jnp.asarray(ids), t,
                                   jnp.asarray(nc), jnp.asarray(ne), jnp.asarray(neg_ids))
  all_ids = np.concatenate([ids, neg_ids])
  want = 0.5 * (numpy_info_nce(c, np.concatenate([e, ne]), ids, all_ids, t)
                + numpy_info_nce(e, np.concatenate([c, nc]), ids, all_ids, t))
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  swapped = losses.symmetric_info_nce(jnp.asarray(e), jnp.asarray(c), jnp.asarray(ids), t,
                                       jnp.asarray(ne), jnp.asarray(nc), jnp.asarray(neg_ids))
  np.testing.assert_allclose(float(swapped), float(got), rtol=1e-6)
  in_batch = losses.symmetric_info_nce(jnp.asarray(c), jnp.asarray(e), jnp.asarray(ids), t)
  want = 0.5 * (numpy_info_nce(c, e, ids, ids, t) + numpy_info_nce(e, c, ids, ids, t))
  np.testing.assert_allclose(float(in_batch), want, rtol=1e-5)
  # Aligned embeddings give a lower loss than random ones.
  assert float(losses.symmetric_info_nce(jnp.asarray(c), jnp.asarray(c), jnp.asarray(ids), t)) \
      < float(in_batch)


EM3_SMALL = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
                 mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8, qformer_width=16,
                 content_dim=8, contrastive_dim=8, contrastive_num_negatives=16)


def build_em3(**overrides):
  schema, catalog, _ = tiny_problem()
  return registry.build_model({"name": "em3", **EM3_SMALL, **overrides}, schema,
                              rngs=nnx.Rngs(0), catalog=catalog)


@pytest.mark.parametrize("head,negatives", [("din", "sampled"), ("dmf", "in_batch")])
def test_em3_trains_and_both_losses_fall(head, negatives):
  model = build_em3(em3_head=head, contrastive_negatives=negatives, modality_dropout=0.1)
  _, _, outputs = train_steps(model, 50)
  outs = [{k: float(v) for k, v in out.items()} for out in outputs]
  first, last = outs[:10], outs[-10:]
  for key in ("loss", "ctr_loss", "contrastive_loss"):
    assert np.mean([o[key] for o in last]) < np.mean([o[key] for o in first]) - 0.02, key


def test_em3_sequence_side_updates_adapters_not_base_weights():
  """Through the behaviour side alone, only the LoRA adapters get gradients; the target side
  trains the base weights; lora_rank=0 fine-tunes the full module on the sequence side."""
  _, _, splits = tiny_problem()
  ids = jnp.asarray(take(splits["train"], np.arange(16))["hist_item_id"])

  def grads(model, sequence):
    graphdef, params, rest = training.split_model(model)

    @jax.jit
    def grad(params):
      return jax.grad(lambda p: jnp.sum(
          content(nnx.merge(graphdef, p, rest), ids, sequence) ** 2))(params)

    return {"/".join(map(str, p)): np.abs(np.asarray(v[...])).sum()
            for p, v in nnx.to_flat_state(grad(params)) if p[:2] == ("content", "fusion")}

  def content(model, ids, sequence):
    return model.content(model.modality_vectors(ids), sequence=sequence)

  model = build_em3()
  for layer in lora.adaptable_layers(model.content.fusion).values():  # B != 0: A gets gradients too
    if layer.adapter is not None:
      layer.adapter.b[...] = jnp.full(layer.adapter.b.shape, 0.1)
  seq = grads(model, sequence=True)
  assert all(v == 0 for k, v in seq.items() if "/adapter/" not in k)
  assert all(v > 0 for k, v in seq.items() if "/adapter/" in k)
  target = grads(model, sequence=False)
  assert all(v == 0 for k, v in target.items() if "/adapter/" in k)
  assert sum(v for k, v in target.items() if "/base/kernel" in k) > 0
  full = grads(build_em3(lora_rank=0), sequence=True)
  assert not any("/adapter/" in k for k in full)
  assert all(v > 0 for k, v in full.items() if k.endswith("/base/kernel"))


@pytest.mark.parametrize("head", ["din", "dmf"])
def test_em3_serves_through_its_heads_forward(head):
  _, _, splits = tiny_problem()
  model = build_em3(em3_head=head)
  batch = take(splits["validation"], np.arange(1))
  user = {k: v for k, v in batch.items() if k.startswith("user/") or k.startswith("hist_")}
  ids = jnp.arange(5)
  state = jitted(model, "encode_user")(user)
  logits = jitted(model, "score")(state, ids[None])[0]
  many = {k: np.repeat(v, 5, 0) for k, v in batch.items()}
  many["item_id"] = np.arange(5, dtype=np.int32)
  np.testing.assert_allclose(logits, jitted(model)(many), rtol=1e-5, atol=1e-5)


def test_em3_config_errors():
  with pytest.raises(ValueError, match="em3_head='transformer' is not one of"):
    registry.model_config({"name": "em3", "em3_head": "transformer"})
  with pytest.raises(ValueError, match="contrastive_negatives='all' is not one of"):
    registry.model_config({"name": "em3", "contrastive_negatives": "all"})
  with pytest.raises(ValueError, match="pattern 'nothing' matches no layer"):
    build_em3(lora_layers="nothing")


def test_content_table_equals_per_position_content_and_gradients(monkeypatch):
  """The per-catalog content table gives the per-position values and gradients."""
  _, _, splits = tiny_problem()
  batch = take(splits["train"], np.arange(24))
  table, direct = build_em3(), build_em3()
  for layer in lora.adaptable_layers(table.content.fusion).values():
    if layer.adapter is not None:
      layer.adapter.b[...] = jnp.full(layer.adapter.b.shape, 0.05)
  nnx.update(direct, nnx.state(table))

  def loss_and_grads(model):
    graphdef, params, rest = training.split_model(model)
    loss = lambda p: nnx.merge(graphdef, p, rest).training_loss(batch)[0]
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), {"/".join(map(str, p)): np.asarray(v[...])
                          for p, v in nnx.to_flat_state(grads)}

  a, ga = loss_and_grads(table)
  monkeypatch.setattr(model_base, "item_rows", lambda ids, n, positions=None: Rows(jnp.asarray(ids, jnp.int32)))
  b, gb = loss_and_grads(direct)  # the Q-Former per behaviour position
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for key in ga:
    np.testing.assert_allclose(ga[key], gb[key], rtol=2e-3, atol=1e-6, err_msg=key)
