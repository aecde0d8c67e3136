"""Checks (`core.checks`): declarative config fields report every problem of every field at once
in one format, lists become tuples, unknown keys list the valid ones; array checks name the
array."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from dmf_jax.core import checks


@dataclasses.dataclass(frozen=True)
class Example:
  width: int = checks.field(8, "positive_int")
  hidden: tuple[int, ...] = checks.field((4, 2), "sizes")
  dropout: float = checks.field(0.1, "fraction")
  mode: str = checks.field("a", ("a", "b"))
  free: str = "anything"

  def __post_init__(self):
    problems = checks.check_fields(self)
    if problems:
      raise checks.Problems(problems)


def test_every_problem_of_every_field_at_once():
  with pytest.raises(checks.Problems) as err:
    Example(width=0, hidden=(3, 0), dropout=1.0, mode="c", free="x")
  assert err.value.problems == [
      "width must be a positive int, got 0",
      "hidden must be a non-empty list of positive ints, got (3, 0)",
      "dropout must be in [0, 1), got 1.0",
      "mode='c' is not one of ('a', 'b')"]
  with pytest.raises(checks.Problems, match=r"dropout has the wrong type \(str\)"):
    Example(dropout="0.1")
  with pytest.raises(checks.Problems, match="width must be a positive int, got True"):
    Example(width=True)  # a bool is not an int here


def test_lists_become_tuples_and_unknown_keys_list_the_valid_ones():
  example = checks.dataclass_from_mapping(Example, {"hidden": [5, 3]}, "example")
  assert example.hidden == (5, 3) and hash(example)
  with pytest.raises(ValueError, match=r"example: unknown field\(s\) \['depth'\]; valid: "
                                       r"\['dropout', 'free', 'hidden', 'mode', 'width'\]"):
    checks.dataclass_from_mapping(Example, {"depth": 2}, "example")


def test_array_checks_name_the_array():
  with pytest.raises(ValueError, match=r"ids: expected rank 2"):
    checks.check_rank("ids", np.zeros(3), 2)
  with pytest.raises(ValueError, match=r"ids"):
    checks.check_shape("ids", np.zeros((2, 3)), (2, 4))
  checks.check_shape("ids", np.zeros((2, 3)), (None, 3))
  with pytest.raises(ValueError, match="vectors"):
    checks.check_finite("vectors", jnp.asarray([1.0, np.nan]))
  with pytest.raises(ValueError, match="item_id"):
    checks.check_ids_in_range("item_id", np.asarray([0, 5]), 5)
  checks.check_ids_in_range("hist", np.asarray([-1, 4]), 5, allow_padding=True)
  with pytest.raises(ValueError, match="L"):
    checks.check_same_dims([("a", 3), ("b", 4)], "L")
