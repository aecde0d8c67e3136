"""One forward per model: every registered model's training forward (`model(batch)`, each
example its own user and target) equals its serving forward (encode the user once, score N
candidates) through `Server`, with padding in the history and N padded up to a bucket."""

import numpy as np
import pytest
from flax import nnx

from dmf_jax.models import registry
from dmf_jax.serve.server import Server
from helpers import jitted, take, tiny_problem

SMALL = dict(num_heads=2, head_dim=8, num_buckets=8, bucket_dim=4, simtier_hidden=(16,),
             mlp_hidden=(32, 16), din_hidden=(16,), num_tiers=8, qformer_width=16,
             content_dim=8, contrastive_dim=8)


@pytest.mark.parametrize("name", registry.model_names())
def test_training_and_serving_forwards_agree(name):
  schema, catalog, splits = tiny_problem()
  model = registry.build_model({"name": name, **SMALL}, schema, rngs=nnx.Rngs(0), catalog=catalog)
  server = Server(model, candidate_sizes=(16,))
  call = jitted(model)
  split = splits["validation"]
  lengths = split["hist_mask"].sum(1)
  padded, full = np.flatnonzero((lengths > 0) & (lengths < schema.seq_len))[0], lengths.argmax()
  for row in (padded, full):
    example = take(split, np.array([row]))
    user = {k: v[0] for k, v in example.items() if k.startswith("user/")}
    user["hist_item_id"] = example["hist_item_id"][0][example["hist_mask"][0]]
    ids = np.random.default_rng(row).integers(0, schema.num_items, 11)  # padded to 16
    served = server.score(server.encode_user(user), ids)
    batch = {k: np.repeat(v, len(ids), 0) for k, v in example.items()}
    batch["item_id"] = ids.astype(np.int32)
    np.testing.assert_allclose(served, np.asarray(call(batch)), rtol=1e-5, atol=1e-5,
                               err_msg=name)
    assert np.std(served) > 0  # the candidates are told apart
