r"""Quick start: train and evaluate DIN and DMF on the generated dataset, print the metrics.

  python -m experiments.quickstart --models=din,dmf --epochs=2

Everything stays in memory (no dataset build); the full training system is experiments.train.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from dmf_jax import metrics, models, synthetic, training

_MODELS = flags.DEFINE_list("models", ["din", "dmf"], "Registered model names to train.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Training epochs over the generated train split.")
_BATCH = flags.DEFINE_integer("batch_size", 512, "Training batch size.")
_LR = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data generator and the model.")


def _batches(examples, batch_size, rng):
  n = len(examples["label"])
  perm = rng.permutation(n)
  for i in range(0, n - batch_size + 1, batch_size):
    idx = perm[i:i + batch_size]
    yield {k: v[idx] for k, v in examples.items()}


def evaluate(predict, state, examples, batch_size=1024):
  """Exact metrics over a split; the last batch is padded with weight-0 rows (one shape)."""
  acc = metrics.EvalAccumulator()
  n = len(examples["label"])
  for i in range(0, n, batch_size):
    idx = np.arange(i, i + batch_size) % n
    batch = {k: v[idx] for k, v in examples.items()}
    batch["weight"] = np.where(np.arange(i, i + batch_size) < n, batch["weight"], 0.0)
    logits = np.asarray(predict(state, batch))
    acc.update(batch["user/user_id"], batch["label"], logits, batch["weight"])
  return acc.compute()


def train_one(name, schema, catalog, splits):
  model = models.build_model({"name": name}, schema, rngs=nnx.Rngs(_SEED.value), catalog=catalog)
  tx = optax.adam(_LR.value)
  graphdef, state = training.create_train_state(model, tx)
  step = training.make_train_step(graphdef, tx)
  predict = training.make_predict_step(graphdef)
  rng = np.random.default_rng(_SEED.value)
  start, steps = time.time(), 0
  for epoch in range(_EPOCHS.value):
    for batch in _batches(splits["train"], _BATCH.value, rng):
      state, out = step(state, batch)
      steps += 1
    print(f"  {name}: epoch {epoch + 1} loss {float(out['loss']):.4f}", flush=True)
  seconds = time.time() - start
  return {split: evaluate(predict, state, splits[split]) for split in ("validation", "test")}, seconds, steps


def main(argv):
  del argv
  config = synthetic.SyntheticConfig(seed=_SEED.value)
  schema, catalog, splits = synthetic.make_examples(config)
  print(f"generated data: " + ", ".join(f"{k} {len(v['label'])}" for k, v in splits.items()))
  rows = []
  for name in _MODELS.value:
    results, seconds, steps = train_one(name, schema, catalog, splits)
    rows.append((name, results, seconds, steps))
  print(f"\n{'model':<18}{'val AUC':>9}{'test AUC':>10}{'test GAUC':>11}{'test logloss':>14}{'train s':>9}")
  for name, res, seconds, steps in rows:
    v, t = res["validation"], res["test"]
    print(f"{name:<18}{v['auc']:>9.4f}{t['auc']:>10.4f}{t['gauc']:>11.4f}{t['logloss']:>14.4f}{seconds:>9.1f}")


if __name__ == "__main__":
  app.run(main)
