"""Small generated problems shared by tests."""

import functools

import numpy as np

from dmf_jax.data import synthetic

TINY = synthetic.SyntheticConfig(
    num_users=120, num_items=90, num_topics=4, latent_dim=8, events_per_user=24, seq_len=12,
    modalities=(("text", 8, 0.3), ("image", 12, 0.6)), num_categories=5, num_tags=6, seed=3,
)


@functools.lru_cache(maxsize=None)
def tiny_problem():
  """(schema, catalog, splits) of a tiny synthetic problem (cached per test session)."""
  return synthetic.make_examples(TINY)


def jitted(model, method="__call__"):
  """`getattr(model, method)(*args)` under jit: whole models run eagerly op by op are slow.

  (test_serving checks that a split and merged model is the same function as the eager one.)
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)
  call = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
  return lambda *args: call(state, *args)


def take(examples, index):
  return {k: v[index] for k, v in examples.items()}


def batches(examples, batch_size, seed=0):
  """Endless shuffled full batches of a split."""
  rng = np.random.default_rng(seed)
  n = len(examples["label"])
  while True:
    perm = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      yield take(examples, perm[i:i + batch_size])


def shared_dir():
  """The shared folder beside the checkout (CI puts it there); DMF_SHARED_DIR overrides."""
  import os
  import pathlib

  root = os.environ.get("DMF_SHARED_DIR")
  path = pathlib.Path(root) if root else pathlib.Path(__file__).resolve().parents[2] / "shared"
  ml = path / "datasets" / "movielens-100k-mm"
  if not (ml / "ml-100k" / "u.data").exists():
    raise FileNotFoundError(
        f"the real MovieLens-100K multimodal dataset is missing at {ml}: integration tests need "
        f"it (set DMF_SHARED_DIR to the folder holding datasets/movielens-100k-mm)"
    )
  return ml


def tiny_train_config(data_dir, **overrides):
  """experiments/configs/tiny.py with a data dir and no progress output: seconds per run."""
  from experiments.configs import tiny

  config = tiny.get_config()
  config.data_dir = str(data_dir)
  config.progress = False
  for key, value in overrides.items():
    config[key] = value
  return config


def tiny_run(tmp_path_factory, dataset_config, **overrides):
  """(data_dir, workdir) of a finished tiny training run on generated_ctr/<dataset_config>."""
  from dmf_jax.train import loop  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path_factory.mktemp("tfds")
  workdir = tmp_path_factory.mktemp(f"{dataset_config}_run")
  config = tiny_train_config(data_dir, dataset_config=dataset_config, **overrides)
  loop.train_and_evaluate(config, str(workdir))
  return data_dir, workdir


def check_sequence_model_reads_the_valid_history_in_order(model, batch, num_items):
  """A sequence model's logits ignore the ids at padded history positions, change with the
  valid ones, and change when a full history is reversed (the model sees the order)."""
  call = jitted(model)
  base = np.asarray(call(batch))
  rng = np.random.default_rng(0)
  mask, ids = batch["hist_mask"], batch["hist_item_id"]
  noise = rng.integers(0, num_items, ids.shape)
  padded = dict(batch, hist_item_id=np.where(mask, ids, noise).astype(np.int32))
  np.testing.assert_allclose(np.asarray(call(padded)), base, rtol=1e-5, atol=1e-6)
  valid = dict(batch, hist_item_id=np.where(mask, noise, ids).astype(np.int32))
  assert np.abs(np.asarray(call(valid)) - base).max() > 1e-4
  full = np.flatnonzero(mask.all(1))
  assert len(full)
  reversed_ = dict(batch, hist_item_id=ids.copy())
  reversed_["hist_item_id"][full] = ids[full, ::-1]
  assert np.abs(np.asarray(call(reversed_))[full] - base[full]).max() > 1e-5


def train_steps(model, steps: int, learning_rate: float = 3e-3, batch_size: int = 64):
  """(graphdef, final state, [step outputs]) of `steps` Adam steps of `model` on the tiny
  problem's shuffled training batches (one jitted, donated train step)."""
  import optax  # pylint: disable=g-import-not-at-top
  from dmf_jax.train import steps as training  # pylint: disable=g-import-not-at-top

  _, _, splits = tiny_problem()
  tx = optax.adam(learning_rate)
  graphdef, state = training.create_train_state(model, tx)
  step = training.make_train_step(graphdef, tx)
  stream = batches(splits["train"], batch_size)
  outputs = []
  for _ in range(steps):
    state, out = step(state, next(stream))
    outputs.append(out)
  return graphdef, state, outputs


def one_device_and_mesh_runs(make_tx, steps: int = 8, batch_size: int = 64):
  """DMF trained `steps` steps from the same init on 1 device and on a 4x2 ('data', 'model')
  mesh: {'1 device' | '4x2 mesh': (partitioner, final state, losses)}; make_tx() -> the tx."""
  from dmf_jax.models import registry  # pylint: disable=g-import-not-at-top
  from dmf_jax.train import partitioner as pt  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  schema, catalog, splits = synthetic.make_examples(TINY)
  factory = lambda rules, rngs: registry.build_model(
      {"name": "dmf", "num_heads": 2, "head_dim": 8}, schema, rngs=rngs, sharding=rules)
  runs = {}
  for name, partitioner in [("1 device", pt.Partitioner(devices=jax.devices()[:1])),
                            ("4x2 mesh", pt.Partitioner(pt.MeshConfig(model=2)))]:
    tx = make_tx()
    graphdef, state, shardings = partitioner.init(factory, tx, seed=0, schema=schema,
                                                  catalog=catalog)
    step = partitioner.train_step(graphdef, tx, shardings)
    losses = []
    for i in range(steps):
      batch = partitioner.shard_batch({k: v[i * batch_size:(i + 1) * batch_size]
                                       for k, v in splits["train"].items()})
      state, out = step(state, batch)
      losses.append(float(out["loss"]))
    runs[name] = (partitioner, state, losses)
  return runs


def flip_array_bytes(workdir, step):
  """Flips bits inside the array data of a step (sizes unchanged); returns the file."""
  files = sorted(p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*")
                 if p.is_file() and p.parent.name == "d" and "ocdbt" in str(p))
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  for i in range(len(data) // 3, len(data) // 3 + 64, 8):
    data[i] ^= 0x10
  target.write_bytes(bytes(data))
  return target


def copy_run(finished, tmp_path, name="copy"):
  """A copy of a finished run's workdir (`finished`: (workdir, results)) under tmp_path."""
  import shutil  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / name
  shutil.copytree(finished[0], workdir)
  return workdir


def snapshot(directory):
  """{relative path: bytes} of every file below `directory`."""
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_same_loss_and_gradients(model, batch, other, objective=None):
  """The jitted loss of `model` (`objective(model, batch)`, default the BCE of its logits) and
  its gradient w.r.t. every parameter are the same on two forms of one batch (e.g. with and
  without what the input pipeline adds); returns (loss function of (params, batch), params,
  the loss)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dmf_jax.nn.losses import bce_with_logits  # pylint: disable=g-import-not-at-top
  from dmf_jax.train import steps as training  # pylint: disable=g-import-not-at-top

  graphdef, params, rest = training.split_model(model)
  if objective is None:
    objective = lambda m, b: bce_with_logits(m(b), b["label"])

  def loss(p, b):
    return objective(nnx.merge(graphdef, p, rest), b)

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  (want, g_want), (got, g_got) = value_and_grad(params, batch), value_and_grad(params, other)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  for (path, a), (_, b) in zip(nnx.to_flat_state(g_want), nnx.to_flat_state(g_got)):
    np.testing.assert_allclose(np.asarray(b[...]), np.asarray(a[...]), rtol=1e-4, atol=1e-7,
                               err_msg=str(path))
  return loss, params, want


def assert_model_equals_its_formula(model, batch, formula):
  """`model(batch)` and `formula(model, batch)` (the paper's plain computation, from the
  model's own modules) give the same logits and the same gradient of a random weighting of
  them w.r.t. every parameter."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  size = len(batch["label"])
  weights = jnp.asarray(np.random.default_rng(0).normal(size=size), jnp.float32)

  def loss(forward, params):
    logits = forward(nnx.merge(graphdef, params, rest), batch)
    return jnp.sum(logits * weights), logits

  (_, got), got_grads = jax.value_and_grad(
      lambda p: loss(lambda m, b: m(b), p), has_aux=True)(params)
  (_, want), want_grads = jax.value_and_grad(lambda p: loss(formula, p), has_aux=True)(params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(want)).max() > 1e-2


# Small models of the tiny problem; serving: one user's request, the model's logits for it.

SMALL_WIDTHS = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
                    mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8)


def small_model(name, seed=0, **overrides):
  """The registered model `name` for the tiny problem, `SMALL_WIDTHS` with `overrides`."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from dmf_jax.models import registry  # pylint: disable=g-import-not-at-top

  schema, catalog, _ = tiny_problem()
  return registry.build_model({"name": name, **SMALL_WIDTHS, **overrides}, schema,
                              rngs=nnx.Rngs(seed), catalog=catalog)


def serving_model(name, seed=0, **overrides):
  """`small_model` with non-trivial similarity-bucket tables, so that a wrong bucket would
  change the logits."""
  from dmf_jax.nn.attention import (  # pylint: disable=g-import-not-at-top
      DecoupledTargetAttention, EarlyFusionTargetAttention)

  model = small_model(name, seed, **overrides)
  if isinstance(model.attention, (DecoupledTargetAttention, EarlyFusionTargetAttention)):
    tables = model.attention.weights.buckets.tables
    tables[...] = tables[...] * 30
  return model


def serving_request(split, row, num_candidates, rng):
  """(row's user request: user fields and valid history, `num_candidates` random item ids)."""
  user = {k: split[k][row] for k in split if k.startswith("user/")}
  user["hist_item_id"] = split["hist_item_id"][row][split["hist_mask"][row]]
  return user, rng.integers(0, 90, num_candidates)


def serving_logits(model, split, row, ids, call=None):
  """(the model's logits of row's user against ids, the batch it scored)."""
  batch = {k: np.repeat(np.asarray(v[row])[None], len(ids), 0) for k, v in split.items()}
  batch["item_id"] = ids.astype(np.int32)
  return np.asarray((call or jitted(model))(batch)), batch


def small_qformer(dims, **kw):
  """A 2-layer Fusion-Q-Former of width 16 over modalities of `dims`, output 12."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from dmf_jax.nn.qformer import FusionQFormer  # pylint: disable=g-import-not-at-top

  return FusionQFormer(dims, width=16, num_queries=3, num_layers=2, num_heads=2, out_dim=12,
                       rngs=nnx.Rngs(1), **kw)


def plain_gru(gru, x, mask, attention=None):
  """`nn.recurrent.GRU`'s formula as a plain batch-major `lax.scan` (JAX autodiff, no custom
  backward pass) over x [..., L, D_in], mask bool [..., L], attention [..., L] or None."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  xs = x @ gru.inputs.kernel[...] + gru.inputs.bias[...]
  u_kernel = gru.recurrent.kernel[...]
  gate = jnp.ones(mask.shape, xs.dtype) if attention is None else attention

  def step(h, inputs):
    xt, mt, at = inputs
    hr, hu, hc = jnp.split(h @ u_kernel, 3, axis=-1)
    xr, xu, xc = jnp.split(xt, 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    u = jax.nn.sigmoid(xu + hu) * at[..., None]
    c = jnp.tanh(xc + r * hc)
    new = jnp.where(mt[..., None], (1 - u) * h + u * c, h)
    return new, new

  time_major = lambda a: jnp.moveaxis(a, mask.ndim - 1, 0)
  h0 = jnp.zeros((*mask.shape[:-1], gru.hidden), xs.dtype)
  _, hs = jax.lax.scan(step, h0, (time_major(xs), time_major(mask), time_major(gate)))
  return jnp.moveaxis(hs, 0, mask.ndim - 1)
