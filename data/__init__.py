"""Raw-data preparation steps and thin entry points; the dataset builders live in the package.

  python -m data.build ...                          builds a dataset (dmf_jax.data.prepare)
  python -m data.movielens_100k_mm.encode_items ... encodes MovieLens item text and posters
                                                     (needs the `encoders` extra: torch)

`import data` keeps working for scripts written against the old layout: it re-exports
`BUILDERS`, `get_builder` and `prepare` from `dmf_jax.data`.
"""

from dmf_jax.data import BUILDERS, get_builder, prepare  # noqa: F401
