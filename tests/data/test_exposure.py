"""Item exposure of the generated data: 'uniform' (the records of every existing build, unchanged)
or 'zipf:A' (exposure ~ 1 / rank^A over a seeded permutation of the items)."""

import dataclasses
import hashlib

import numpy as np
import pytest

from dmf_jax.data import generated
from dmf_jax.data import synthetic


def digest(arrays: dict) -> str:
  h = hashlib.sha256()
  for k in sorted(arrays):
    h.update(k.encode())
    h.update(np.ascontiguousarray(arrays[k]).tobytes())
  return h.hexdigest()[:16]


def test_uniform_exposure_keeps_the_records_of_existing_builds():
  """Digests taken with the code before the option existed (commit f93fcdb)."""
  _, _, events = synthetic.generate(generated.TINY)
  assert digest(events) == "6b5bee495b21bcc4"
  assert digest(synthetic.StreamedProblem(generated.TINY_HASHED, 40).chunk(1)) == "1fbdfe8c6a87d9e1"
  builder = generated.GeneratedCtr(config="tiny", data_dir="/nonexistent")
  assert "item_exposure" not in builder.build_parameters()["synthetic"]  # same fingerprint
  assert generated.LARGE.item_exposure == "zipf:1.0"


@pytest.mark.parametrize("bad", ["zipf", "zipf:0", "zipf:-1", "zipf:x", "pareto:1", ""])
def test_a_bad_exposure_is_named(bad):
  with pytest.raises(ValueError, match=f"item exposure {bad!r} is not 'uniform' or 'zipf:A'"):
    synthetic.SyntheticConfig(item_exposure=bad)


def test_fit_recovers_a_known_exponent():
  rank = np.arange(1, 5001)
  counts = np.random.default_rng(0).permutation(np.round(1e5 * rank ** -0.8))
  assert synthetic.fit_zipf_exponent(counts) == pytest.approx(0.8, abs=0.02)


@pytest.mark.parametrize("exponent", [0.7, 1.0])
def test_zipf_exposure_in_both_generators(exponent):
  config = synthetic.SyntheticConfig(num_users=300, num_items=2000,
                                     item_exposure=f"zipf:{exponent}")
  catalog, _, events = synthetic.generate(config)
  counts = np.bincount(events["item"], minlength=config.num_items)
  assert synthetic.fit_zipf_exponent(counts) == pytest.approx(exponent, abs=0.15)
  # the most exposed items are the permutation's first ranks
  weights = synthetic.exposure_weights(config.item_exposure, config.num_items, config.seed)
  top = np.argsort(-weights)[:20]
  assert counts[top].mean() > 10 * counts.mean()

  streamed = synthetic.StreamedProblem(dataclasses.replace(config, num_users=3000), 3000)
  rows = streamed.chunk(0)
  counts = np.bincount(rows["item_id"], minlength=config.num_items)
  assert synthetic.fit_zipf_exponent(counts) == pytest.approx(exponent, abs=0.15)
  train = rows["split"] == 0
  assert not streamed.cold[rows["item_id"][train]].any()  # cold items stay out of training
  assert streamed.cold[rows["item_id"][~train]].any()
  uniform = synthetic.StreamedProblem(dataclasses.replace(config, num_users=3000,
                                                          item_exposure="uniform"), 3000)
  flat = np.bincount(uniform.chunk(0)["item_id"], minlength=config.num_items)
  assert synthetic.fit_zipf_exponent(flat) < 0.4


def test_benchmark_batches_draw_with_the_same_exposure():
  from experiments import bench_utils  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  ids = bench_utils.item_ids(20_000, (512, 50), rng, "zipf:1.0")
  assert ids.shape == (512, 50) and ids.min() >= 0 and ids.max() < 20_000
  counts = np.bincount(ids.ravel(), minlength=20_000)
  assert synthetic.fit_zipf_exponent(counts, top=0.05) == pytest.approx(1.0, abs=0.15)
  # about 12,000 distinct of 26,112 at zipf 1.0 over 1M items (the figure); here fewer
  assert len(np.unique(ids)) < 0.5 * ids.size
  uniform = bench_utils.item_ids(20_000, (512, 50), np.random.default_rng(0))
  assert len(np.unique(uniform)) > len(np.unique(ids))
