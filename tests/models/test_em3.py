"""EM3 (`models.em3`): it trains and both losses fall, LoRA on the behaviour side, serving,
config errors, the content table (its Q-Former, LoRA and loss: tests/nn)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import jitted, take, tiny_problem, train_steps
from dmf_jax.nn import lora
from dmf_jax.nn.losses import bce_with_logits
from dmf_jax.core import rows as core_rows
from dmf_jax.core.rows import Rows
from dmf_jax.models import base as model_base
from dmf_jax.models import registry
from dmf_jax.train import steps as training

RNG = np.random.default_rng(0)


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


@pytest.mark.parametrize("head", ["din", "dmf"])
def test_em3s_ranker_starts_from_its_plain_rankers_draws(head):
  """Common random numbers: built from the same seed, each ranker parameter of EM3 with the
  plain ranker's shape starts equal to it (the content tower draws from a stream of its own);
  only the layers that read the wider [e ; c] tokens differ."""
  schema, catalog, _ = tiny_problem()

  def params(name, **fields):
    model = registry.build_model({"name": name, **EM3_SMALL, **fields}, schema,
                                 rngs=nnx.Rngs(7), catalog=catalog)
    return {"/".join(map(str, p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

  plain, em3 = params(head), params("em3", em3_head=head)
  assert set(plain) < set(em3) and all(k.startswith("content/") for k in set(em3) - set(plain))
  same = [k for k in plain if plain[k].shape == em3[k].shape]
  wider = sorted(set(plain) - set(same))
  assert len(same) > 10 and all(np.array_equal(plain[k], em3[k]) for k in same), head
  assert wider and all(plain[k].shape[0] < em3[k].shape[0]  # more input rows: [e ; c]
                       and plain[k].shape[1:] == em3[k].shape[1:] for k in wider), wider
  # A tower that draws more (two layers) leaves every ranker draw as it was.
  deeper = params("em3", em3_head=head, qformer_layers=2)
  assert all(np.array_equal(deeper[k], em3[k]) for k in em3 if not k.startswith("content/"))


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


@pytest.mark.parametrize("sequence", [True, False])
def test_the_whole_catalogs_content_reads_the_tables_as_the_gathered_rows_do(sequence):
  """Over the whole catalog the content tower reads the stored vector tables (no gather of
  V + 1 rows) and repeats the last item's output for the out-of-range row: the same tokens,
  and the same gradients, as the tower over the gathered rows (float64)."""
  schema, _, _ = tiny_problem()
  model = build_em3()
  for layer in lora.adaptable_layers(model.content.fusion).values():
    if layer.adapter is not None:
      layer.adapter.b[...] = jnp.full(layer.adapter.b.shape, 0.05)
  v = schema.num_items
  ids = jnp.asarray(RNG.integers(0, v, (6, 9)), jnp.int32).at[0, 0].set(v).at[1, 2].set(-1)
  whole = core_rows.item_rows(ids, v, positions=2 * v)  # the catalog; out of range: row V
  gathered = dataclasses.replace(whole, catalog=False)
  assert whole.catalog and whole.values.shape == (v + 1,)
  weights = jnp.asarray(RNG.normal(size=(6, 9, model.token_dim)))
  graphdef, params, rest = training.split_model(model)

  def loss(p, rows):
    m = nnx.merge(graphdef, p, rest)
    tokens = m.item_tokens(rows, sequence=sequence).take()
    return jnp.sum(tokens * weights), tokens

  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    (a, ta), ga = jax.jit(jax.value_and_grad(loss, has_aux=True))(p64, whole)
    (b, tb), gb = jax.jit(jax.value_and_grad(loss, has_aux=True))(p64, gathered)
  assert ta.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(ta), np.asarray(tb), rtol=1e-12, atol=1e-13)
  np.testing.assert_array_equal(np.asarray(ta)[0, 0], np.asarray(ta)[1, 2])  # both out of range
  flat = lambda g: {"/".join(map(str, k)): np.asarray(x[...]) for k, x in nnx.to_flat_state(g)}
  ga, gb = flat(ga), flat(gb)
  assert set(ga) == set(gb) and any(np.any(g != 0) for g in ga.values())
  for key in ga:
    np.testing.assert_allclose(ga[key], gb[key], rtol=1e-10, atol=1e-13, err_msg=key)


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_candidates_read_the_historys_catalog_rows_only_without_lora(lora_rank):
  """With LoRA the behaviour side is another function, so the candidates take rows of their
  own (per position while they are fewer than the catalog's); without it they read the rows
  the history computed (the catalog: every item position of the batch counted)."""
  schema, _, splits = tiny_problem()
  batch = take(splits["train"], np.arange(8))
  model = build_em3(lora_rank=lora_rank)
  assert model.content.sides_differ == (lora_rank > 0)
  candidates = jnp.asarray(batch["item_id"])[:, None]
  assert candidates.size < schema.num_items + 1 < candidates.size + batch["hist_mask"].size
  rows = model.candidate_rows(model.encode_user(batch), candidates)
  if lora_rank:
    assert rows.index is None and rows.values.shape == candidates.shape
  else:
    assert rows.values.shape == (schema.num_items + 1,) and rows.index.shape == candidates.shape


@pytest.mark.parametrize("head,negatives", [("din", "in_batch"), ("dmf", "sampled")])
def test_contrastive_term_reads_the_forwards_target_content(head, negatives):
  """training_loss's Content-ID term takes the targets' content from the ranker's forward: the
  same loss and gradients as running the tower on the targets again (float64)."""
  _, _, splits = tiny_problem()
  batch = take(splits["train"], np.arange(24))
  model = build_em3(em3_head=head, contrastive_negatives=negatives, contrastive_weight=0.5)
  for layer in lora.adaptable_layers(model.content.fusion).values():
    if layer.adapter is not None:  # non-zero adapters: the two sides differ
      layer.adapter.b[...] = jnp.full(layer.adapter.b.shape, 0.05)
  graphdef, params, rest = training.split_model(model)

  def reused(p):  # the model's own training loss
    return nnx.merge(graphdef, p, rest).training_loss(batch, rngs=nnx.Rngs(sample=1))[0]

  def recomputed(p):  # the contrastive term with the tower run on the targets again
    m = nnx.merge(graphdef, p, rest)
    ctr = bce_with_logits(m(batch, train=True), batch["label"], batch.get("weight"))
    contrastive = m.content.contrastive_loss(m, batch["item_id"], train=True,
                                             rngs=nnx.Rngs(sample=1))
    return ctr + 0.5 * contrastive

  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(p64) for f in (reused, recomputed))
    flat = lambda g: {"/".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(g)}
    assert a.dtype == jnp.float64 and abs(float(a) - float(b)) < 1e-12 * max(1.0, abs(float(b)))
    ga, gb = flat(ga), flat(gb)
  assert set(ga) == set(gb) and any(np.any(g != 0) for g in ga.values())
  for key in ga:
    np.testing.assert_allclose(ga[key], gb[key], rtol=1e-9, atol=1e-12, err_msg=key)
