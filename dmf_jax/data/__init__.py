"""Data: records, builds and the input pipeline.

  builds      the dataset registry (BUILDERS), `prepare` (build once, then open), BeamSettings
  format      the record format, the parser, a built dataset's schema and catalog
  pipeline    Grain pipelines over a build's records (train and eval batches)
  generated, movielens, byod   the TFDS builders (synthetic, MovieLens-100K-MM, your files)
  synthetic, sequences, ...    what the builders use

The registry's names are available here (`dmf_jax.data.prepare`, ...), loaded on first use:
importing one module of this package (`dmf_jax.data.format`, `dmf_jax.data.synthetic`) does not
import the builders.
"""

from __future__ import annotations

_FROM_BUILDS = ("BUILDERS", "LOCK_DIR", "REPLACED_DIR", "BeamSettings", "check_record_files",
                "check_sources", "config_name", "config_names", "config_problem", "get_builder",
                "needs_manual_dir", "open_recorded", "prepare")

__all__ = list(_FROM_BUILDS)


def __getattr__(name: str):
  if name in _FROM_BUILDS:
    from dmf_jax.data import builds  # pylint: disable=import-outside-toplevel
    return getattr(builds, name)
  raise AttributeError(f"module 'dmf_jax.data' has no attribute {name!r}")
