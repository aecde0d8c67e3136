"""Input validation that names the culprit.

Checks on shapes, ranks and dtypes run at trace time, so they hold under `jax.jit` too.
Checks on values (id ranges, finiteness) need concrete arrays: they run in eager use and are
skipped for tracers, where each caller documents its defined jit-time behaviour instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  """True when `x` holds values (numpy or a committed jax array), not a tracer."""
  return not isinstance(x, jax.core.Tracer)


def check_rank(name: str, x, rank: int) -> None:
  if np.ndim(x) != rank:
    raise ValueError(f"{name}: expected rank {rank}, got shape {tuple(np.shape(x))}")


def check_shape(name: str, x, expected: Sequence[int | None]) -> None:
  """Checks `x.shape` against `expected`, where None matches any size."""
  shape = tuple(np.shape(x))
  if len(shape) != len(expected) or any(
      e is not None and e != s for s, e in zip(shape, expected)
  ):
    want = tuple("?" if e is None else e for e in expected)
    raise ValueError(f"{name}: expected shape {want}, got {shape}")


def check_integer(name: str, x) -> None:
  if not jnp.issubdtype(jnp.asarray(x).dtype if is_concrete(x) else x.dtype, jnp.integer):
    raise TypeError(f"{name}: expected an integer dtype, got {x.dtype}")


def check_floating(name: str, x) -> None:
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name}: expected a floating dtype, got {dtype}")


def check_bool(name: str, x) -> None:
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  if dtype != jnp.bool_:
    raise TypeError(f"{name}: expected a bool mask, got {dtype}")


def check_finite(name: str, x) -> None:
  """Raises if a concrete `x` holds NaN or inf (no-op for tracers)."""
  if not is_concrete(x):
    return
  arr = np.asarray(x)
  bad = ~np.isfinite(arr)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{name}: {int(bad.sum())} non-finite value(s), first at index {first} "
        f"(value {arr[first]})"
    )


def check_ids_in_range(name: str, ids, vocab_size: int, *, allow_padding: bool = False) -> None:
  """Raises if a concrete `ids` has values outside [0, vocab_size) (-1 allowed as padding)."""
  if not is_concrete(ids):
    return
  arr = np.asarray(ids)
  low = -1 if allow_padding else 0
  bad = (arr < low) | (arr >= vocab_size)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    allowed = f"[0, {vocab_size})" + (" or -1 (padding)" if allow_padding else "")
    raise ValueError(
        f"{name}: id {int(arr[first])} at index {first} is out of range; allowed {allowed}"
    )


def check_same_dims(names_and_sizes: Sequence[tuple[str, int]], what: str) -> None:
  """Raises unless all sizes agree, e.g. the sequence length L of several inputs."""
  sizes = {size for _, size in names_and_sizes}
  if len(sizes) > 1:
    listed = ", ".join(f"{n}={s}" for n, s in names_and_sizes)
    raise ValueError(f"mismatched {what}: {listed}")


class Problems(ValueError):
  """Several problems found at once (e.g. by a config's validation): `.problems` lists them."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__("; ".join(self.problems))


def dataclass_from_mapping(cls, values, what: str):
  """`cls(**values)` for a dict or ConfigDict; unknown keys raise an error listing the valid ones."""
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{what}: unknown field(s) {unknown}; valid: {sorted(known)}")
  return cls(**values)


# ---------------------------------------------------------------------------------------------
# Declarative config fields: `field(default, rule)` in a frozen dataclass, `check_fields` in its
# __post_init__ — every problem of every field at once, one message format.
# ---------------------------------------------------------------------------------------------


def _positive_int(v):
  return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else (
      f"must be a positive int, got {v!r}")


def _non_negative_int(v):
  return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else (
      f"must be an int >= 0, got {v!r}")


def _sizes(v):
  ok = isinstance(v, (tuple, list)) and v and all(
      isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)
  return None if ok else f"must be a non-empty list of positive ints, got {tuple(v)!r}"


def _names(v):
  ok = not isinstance(v, str) and all(isinstance(x, str) for x in v)
  return None if ok else f"must be a list of names, got {v!r}"


RULES = {
    "positive_int": _positive_int,
    "non_negative_int": _non_negative_int,
    "sizes": _sizes,
    "names": _names,
    "fraction": lambda v: None if 0.0 <= v < 1.0 else f"must be in [0, 1), got {v}",
    "unit_interval": lambda v: None if 0.0 <= v <= 1.0 else f"must be in [0, 1], got {v}",
    "non_negative": lambda v: None if v >= 0 else f"must be >= 0, got {v}",
    "positive": lambda v: None if v > 0 else f"must be > 0, got {v}",
}


def field(default, rule: str | tuple, **kwargs):
  """A dataclass field checked by `check_fields`: rule is a RULES name or a tuple of choices."""
  if isinstance(default, (list, tuple)):
    return dataclasses.field(default_factory=lambda: tuple(default), metadata={"rule": rule},
                             **kwargs)
  return dataclasses.field(default=default, metadata={"rule": rule}, **kwargs)


def check_fields(obj) -> list[str]:
  """Problems of a dataclass's `field(..., rule)` fields ('name must ...'); lists become tuples."""
  problems = []
  for f in dataclasses.fields(obj):
    rule, value = f.metadata.get("rule"), getattr(obj, f.name)
    if rule in ("sizes", "names") and isinstance(value, list):
      value = tuple(value)
      object.__setattr__(obj, f.name, value)
    if rule is None:
      continue
    if isinstance(rule, tuple):
      if value not in rule:
        problems.append(f"{f.name}={value!r} is not one of {rule}")
      continue
    try:
      problem = RULES[rule](value)
    except TypeError:
      problem = f"has the wrong type ({type(value).__name__})"
    if problem:
      problems.append(f"{f.name} {problem}")
  return problems
