"""What each device holds of a train state: embedding tables, dense weights, optimizer state,
the frozen catalog (the report that shows a `mesh.model = S` run holds 1/S of the tables and
catalog per device)."""

from __future__ import annotations

import collections

import jax

PARTS = ("tables", "dense", "optimizer", "catalog", "other")


def _part(names: tuple[str, ...]) -> str:
  """The part of a leaf at `names` (a TrainState key path as attribute names)."""
  root = names[0] if names else ""
  if root == "params":
    return "tables" if "embedding" in names else "dense"
  if root in ("opt_state", "ema"):  # the optimizer's state and the parameters' average
    return "optimizer"
  if root == "rest" and "catalog" in names:
    return "catalog"
  return "other"


def _names(keypath) -> tuple[str, ...]:
  out = []
  for key in keypath:
    name = getattr(key, "name", getattr(key, "key", getattr(key, "idx", None)))
    if name is not None:
      out.append(str(name))
  return tuple(out)


def device_bytes(state) -> dict[str, dict[str, int]]:
  """{device: {part: bytes}} over the addressable shards of every array of `state` (a
  TrainState); parts are `PARTS`."""
  out: dict[str, dict[str, int]] = collections.defaultdict(lambda: dict.fromkeys(PARTS, 0))
  for keypath, leaf in jax.tree_util.tree_leaves_with_path(state):
    if not isinstance(leaf, jax.Array):
      continue
    part = _part(_names(keypath))
    for shard in leaf.addressable_shards:
      out[str(shard.device)][part] += shard.data.nbytes
  return dict(out)


def per_device_summary(state) -> dict[str, int]:
  """The largest per-device bytes of each part, and of the total: {part: bytes, 'total': b}."""
  table = device_bytes(state)
  summary = {part: max((d[part] for d in table.values()), default=0) for part in PARTS}
  summary["total"] = max((sum(d.values()) for d in table.values()), default=0)
  return summary


def format_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return str(n)
