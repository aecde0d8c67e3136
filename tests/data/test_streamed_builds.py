"""Streamed builds: the BYOD builder (columnar chunks, user partitions on disk) makes exactly
the records of the in-memory builder it replaced (tests/byod_reference.py), in the same order,
for any chunk and partition size; a Beam pipeline (DirectRunner) makes exactly the local
records; a million-row CSV builds in memory that does not grow with the impressions."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds

import byod_reference
from dmf_jax import data
from dmf_jax.core.errors import ConfigError
from dmf_jax.data import byod
from dmf_jax.data import columnar
from dmf_jax.data import format as data_format
from dmf_jax.data.common import Parts
from test_byod import write_config, write_example


class ByodReference(byod.ByodCtr):
  """The builder with the old in-memory `_prepare` (same records writer, same keys)."""

  def _prepare(self, dl_manager):
    return byod_reference.prepare(dl_manager.manual_dir)


def records(built_or_builder) -> dict[str, list[bytes]]:
  built = (built_or_builder if isinstance(built_or_builder, data_format.BuiltDataset)
           else data_format.load_built_dataset(built_or_builder))
  out = {}
  for split, source in built.sources.items():
    raw = data_format.raw_records(source)
    out[split] = raw.read(range(len(raw)))
  return out


def reference_records(raw, data_dir) -> dict[str, list[bytes]]:
  builder = ByodReference(config=tfds.core.BuilderConfig(name=byod.build_name(raw)),
                          data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return records(builder)


def random_interactions(rng, n_users, n_items, n_rows, shuffled=True):
  """Rows 'user,item,timestamp,rating' with same-second ties and users spread over the file."""
  user = rng.integers(0, n_users, n_rows)
  item = rng.integers(0, n_items, n_rows)
  ts = rng.integers(0, n_rows // 3 + 2, n_rows)  # many equal timestamps per user
  rating = rng.integers(1, 6, n_rows)
  order = rng.permutation(n_rows) if shuffled else np.lexsort((ts, user))
  return ["user,item,timestamp,rating"] + [
      f"u{user[k]},i{item[k] % n_items},{ts[k]},{rating[k]}" for k in order]


def larger_example(root, rng, **config):
  """60 users, 9 items with side fields, rows in random order."""
  items = ["item,category,tags"] + [f"i{i},c{i % 3},{'|'.join(f't{(i + k) % 4}' for k in range(i % 3))}"
                                    for i in range(9)]
  users = ["user,country"] + [f"u{u},{'fr de it'.split()[u % 3]}" for u in range(60)]
  raw = write_example(root, interactions=random_interactions(rng, 60, 9, 900), items=items,
                      users=users, vectors=rng.normal(size=(9, 4)).astype(np.float32),
                      ids=[f"i{i}" for i in range(9)])
  return write_config(raw, **config) if config else raw


@pytest.mark.parametrize("variant", ["documented", "hashed", "global_time", "no_item_table",
                                     "parquet", "declared_multi"])
def test_streamed_byod_records_equal_the_in_memory_builder(tmp_path, monkeypatch, variant):
  """Small chunks (a few rows) and partitions (a few users) so that every path is crossed."""
  rng = np.random.default_rng(7)
  raw = larger_example(tmp_path / "raw", rng)
  if variant == "hashed":
    write_config(raw, hash={"user": 16, "item": 5, "items.category": 2, "num_hashes": 2})
  elif variant == "global_time":
    write_config(raw, split="global_time")
  elif variant == "no_item_table":
    cfg = json.loads((raw / "dataset.json").read_text())
    cfg.pop("items")
    (raw / "dataset.json").write_text(json.dumps(cfg))
  elif variant == "parquet":
    lines = (raw / "interactions.csv").read_text().splitlines()
    cols = list(zip(*[line.split(",") for line in lines[1:]]))
    pq.write_table(pa.table({"user": list(cols[0]), "item": list(cols[1]),
                             "timestamp": np.asarray(cols[2], np.int64),
                             "rating": np.asarray(cols[3], np.float64)}),
                   raw / "interactions.parquet", row_group_size=100)
    write_config(raw, interactions="interactions.parquet")
    monkeypatch.setattr(columnar, "PARQUET_ROWS", 64)
  elif variant == "declared_multi":
    write_config(raw, multi_valued={"items": ["tags"], "users": []})
  elif variant == "documented":
    raw = write_example(tmp_path / "raw2")
  monkeypatch.setattr(columnar, "CHUNK_BYTES", 256)
  monkeypatch.setattr(byod.ByodCtr, "partition_events", 40)
  built = data.prepare("byod_ctr", None, str(tmp_path / "out"), str(raw))
  want = reference_records(raw, tmp_path / "ref")
  got = records(built)
  assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in want.items()}
  assert got == want
  ref_schema, ref_catalog, _ = byod_reference.prepare(raw)
  assert built.schema == ref_schema
  assert ref_catalog.fingerprint() == built.catalog.fingerprint()
  scratch = list((tmp_path / "out").rglob("scratch"))
  assert not scratch, f"scratch left behind: {scratch}"


def test_streamed_byod_uses_several_partitions(tmp_path, monkeypatch):
  """The setting above does split the data: many chunks and partitions, and each part's
  first key is its offset in the split."""
  raw = larger_example(tmp_path / "raw", np.random.default_rng(1))
  monkeypatch.setattr(columnar, "CHUNK_BYTES", 256)
  monkeypatch.setattr(byod.ByodCtr, "partition_events", 40)
  builder = byod.ByodCtr(config=tfds.core.BuilderConfig(name=byod.build_name(raw)),
                         data_dir=str(tmp_path / "out"))
  reader = columnar.TableReader(raw / "interactions.csv", [])
  assert len(list(reader.chunks())) > 10

  class Manager:
    manual_dir = str(raw)

  builder._data_dir = str(tmp_path / "scratch_root")  # pylint: disable=protected-access
  _, _, splits = builder._prepare(Manager())  # pylint: disable=protected-access
  train = splits["train"]
  assert isinstance(train, Parts) and train.count >= 10
  sizes = [len(train.rows(p)["label"]) for p in range(train.count)]
  assert list(train.offsets) == list(np.r_[0, np.cumsum(sizes)[:-1]])


def test_beam_direct_runner_makes_the_local_records(tmp_path):
  """Beam (DirectRunner) builds of a streamed generated config, an in-memory one and a BYOD
  folder equal their local builds record for record."""
  beam = data.BeamSettings(runner="DirectRunner")
  for name, config in (("generated_ctr", "tiny_streamed"), ("generated_ctr", "tiny")):
    local = data.prepare(name, config, str(tmp_path / "local"))
    piped = data.prepare(name, config, str(tmp_path / "beam"), beam=beam)
    assert records(piped) == records(local), config
  raw = larger_example(tmp_path / "raw", np.random.default_rng(2), split="global_time")
  local = data.prepare("byod_ctr", None, str(tmp_path / "local"), str(raw))
  piped = data.prepare("byod_ctr", None, str(tmp_path / "beam"), str(raw), beam=beam)
  assert records(piped) == records(local)
  assert piped.catalog.fingerprint() == local.catalog.fingerprint()


def test_an_unknown_beam_runner_is_refused_before_anything_is_built(tmp_path):
  with pytest.raises(ConfigError, match="beam_runner: Unexpected pipeline runner: NoSuchRunner"):
    data.prepare("generated_ctr", "tiny", str(tmp_path / "d"),
                 beam=data.BeamSettings(runner="NoSuchRunner"))
  assert not (tmp_path / "d" / "generated_ctr" / "tiny" / "1.0.0").exists()


# --- A million rows, bounded memory ------------------------------------------------------

MILLION_SCRIPT = textwrap.dedent("""
    import hashlib, json, resource, sys
    from dmf_jax.data import byod, sequences

    class Manager:
      manual_dir = sys.argv[1]

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    builder = byod.ByodCtr(config=byod.tfds.core.BuilderConfig(name="src-test"),
                           data_dir=sys.argv[2])
    builder._data_dir = sys.argv[2]
    builder.partition_events = 100_000
    schema, catalog, splits = builder._prepare(Manager())
    digests = {}
    for name, parts in splits.items():  # a digest per column of the concatenated parts
      hashes, n = {}, 0
      for p in range(parts.count):
        rows = parts.rows(p)
        for key in rows:
          hashes.setdefault(key, hashlib.sha256()).update(rows[key].tobytes())
        n += len(rows["label"])
      digests[name] = [n, {k: h.hexdigest() for k, h in sorted(hashes.items())}]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"digests": digests, "base_kib": base, "peak_kib": peak,
                      "parts": splits["train"].count}))
""")


def test_a_million_row_csv_streams_in_bounded_memory(tmp_path):
  """1,000,000 interactions (50,000 users, 20,000 items, L = 50) in random order: the streamed
  build's examples equal the in-memory builder's, and its peak memory grows by less than the
  examples' histories alone (191 MiB, which a whole-file build holds at once)."""
  rng = np.random.default_rng(0)
  n, n_users, n_items = 1_000_000, 50_000, 20_000
  raw = tmp_path / "raw"
  raw.mkdir()
  user, item = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
  table = pa.table({"user": pa.array(np.char.add("u", user.astype(str))),
                    "item": pa.array(np.char.add("i", item.astype(str))),
                    "timestamp": rng.integers(0, 200_000, n), "label": rng.integers(0, 2, n)})
  pa.csv.write_csv(table, raw / "interactions.csv")
  (raw / "dataset.json").write_text(json.dumps(
      {"interactions": "interactions.csv", "label": "label", "seq_len": 50}))
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  out = subprocess.run([sys.executable, "-c", MILLION_SCRIPT, str(raw), str(tmp_path / "b")],
                       capture_output=True, text=True, env=env, check=True, timeout=600)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  grown_mib = (result["peak_kib"] - result["base_kib"]) / 1024
  print(f"streamed: {result['parts']} partitions, peak RSS grew {grown_mib:.0f} MiB")
  assert result["parts"] >= 10
  histories_mib = n * 50 * 4 / 2**20  # int32 [n, L]: what a whole-file build holds at least
  assert grown_mib < histories_mib, f"peak RSS grew {grown_mib:.0f} MiB"

  _, _, splits = byod_reference.prepare(raw)
  for name, rows in splits.items():
    want = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
            for k, v in sorted(rows.items())}
    assert result["digests"][name] == [len(rows["label"]), want], name


def test_out_of_core_quantiles_equal_numpy():
  """kth_smallest (histogram passes over parts) and linear_quantiles equal np.sort / np.quantile
  bit for bit, on ties, negative values and values near 2^62."""
  from dmf_jax.data import partitions
  from dmf_jax.data import sequences
  rng = np.random.default_rng(0)
  for trial in range(120):
    n = int(rng.integers(1, 2000))
    scale = (10, 1000, 10**9, 2**62)[trial % 4]
    a = rng.integers(-scale if trial % 3 == 0 else 0, scale, n)
    if trial % 5 == 0:
      a = np.repeat(a[:max(1, n // 50)], 50)[:n]
    n = len(a)
    pieces = np.array_split(a, int(rng.integers(1, 7)))
    q = sequences.cut_quantiles() if trial % 2 else list(rng.random(3))
    got = partitions.linear_quantiles(
        n, q, lambda ks, pieces=pieces: partitions.kth_smallest(lambda: iter(pieces), ks))
    np.testing.assert_array_equal(got, np.quantile(a, q))
    ks = rng.integers(0, n, 3).tolist()
    assert partitions.kth_smallest(lambda pieces=pieces: iter(pieces), ks) == np.sort(a)[ks].tolist()
