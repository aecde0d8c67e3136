"""Frozen sharding rules passed into modules.

The mesh has axes ('data', 'model'). Batches are split on 'data'; embedding tables are
row-sharded on 'model' when that axis has more than one device. Modules take a
`ShardingRules` and never read global state: with the default (no rules) they run on one
device or under any replicated setting.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Which mesh axes the batch dimension and embedding-table rows are split over.

  Attributes:
    batch_axis: mesh axis of the leading (batch) dimension of activations, or None.
    table_axis: mesh axis of embedding-table rows, or None for replicated tables.
  """

  batch_axis: str | None = None
  table_axis: str | None = None

  def table_spec(self) -> tuple[str | None, None]:
    """Partition names for a [vocab, dim] table (stored as Param `out_sharding` metadata)."""
    return (self.table_axis, None)

  def lookup_spec(self, ids_ndim: int) -> P | None:
    """Output sharding of a lookup of ids with `ids_ndim` dims, or None for a plain gather."""
    if self.batch_axis is None and self.table_axis is None:
      return None
    return P(self.batch_axis, *([None] * ids_ndim))


NO_SHARDING = ShardingRules()
