"""Request checks (`serve.request`): the Server and the ExportedScorer refuse the same bad
requests with the same message naming the field; candidates padded to the compiled sizes."""

import numpy as np
import pytest

from dmf_jax.serve.request import check_candidate_sizes, chunks, score_distinct


BAD_REQUESTS = [
    ({"user/user_id": 500}, r"user/user_id: value out of range \[0, 120\)"),
    ({"user/group": 99}, r"user/group: value out of range \[0, 8\)"),
    ({"user/group": -1}, r"user/group: value out of range \[0, 8\)"),
    ({"user/user_id": 3.5}, r"user/user_id: ids must be integers, got 3.5"),
    ({"user/user_id": [3]}, r"user/user_id: expected a scalar, got shape \(1,\)"),
    ({"user/user_id": "3"}, r"user/user_id: expected integer ids"),
    ({"hist_item_id": [1, 2.5]}, r"hist_item_id: ids must be integers, got 2.5"),
    ({"hist_item_id": [[1, 2]]}, r"hist_item_id: expected rank 1, got shape \(1, 2\)"),
    ({"hist_item_id": [1, 90]}, r"hist_item_id: item id 90 is out of range \[0, 90\)"),
]


@pytest.mark.parametrize("change,message", BAD_REQUESTS)
def test_server_and_exported_scorer_check_requests_alike(exported, change, message):
  from dmf_jax.serve.exported import ExportedScorer  # pylint: disable=g-import-not-at-top

  path, server = exported
  scorer = ExportedScorer(str(path))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3, 50, 17]} | change
  for impl in (server, scorer):
    with pytest.raises(ValueError, match=message):
      impl.encode_user(user)


def test_unknown_user_fields_and_a_missing_state_are_refused_alike(exported):
  from dmf_jax.serve.exported import ExportedScorer  # pylint: disable=g-import-not-at-top

  path, server = exported
  scorer = ExportedScorer(str(path))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3], "user/grup": 1}
  for impl in (server, scorer):
    with pytest.raises(ValueError, match=r"unknown user features \['user/grup'\]: this model "
                                         r"reads \['user/user_id', 'user/group'\]"):
      impl.encode_user(user)
    with pytest.raises(ValueError, match="user_state is None; pass what encode_user"):
      impl.score(None, [1, 2])


def test_candidate_ids_are_checked_alike(exported):
  from dmf_jax.serve.exported import ExportedScorer  # pylint: disable=g-import-not-at-top

  path, server = exported
  scorer = ExportedScorer(str(path))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3.0, 50, 17]}  # 3.0 is an id
  states = [impl.encode_user(user) for impl in (server, scorer)]
  np.testing.assert_allclose(scorer.score(states[1], [1.0, 2, 3]),
                             server.score(states[0], [1, 2, 3]), rtol=1e-5, atol=1e-5)
  for impl, state in zip((server, scorer), states):
    for ids, message in [([1, 90], r"item_ids: item id 90 is out of range"),
                         ([1.5], "item_ids: ids must be integers, got 1.5"),
                         ([[1, 2]], r"item_ids: expected rank 1, got shape \(1, 2\)"),
                         ([np.nan], "item_ids: ids must be integers, got nan"),
                         ([True], "item_ids: expected integer ids, got bool")]:
      with pytest.raises(ValueError, match=message):
        impl.score(state, ids)


def test_candidates_are_padded_to_the_smallest_size_and_chunked_past_the_largest():
  sizes = check_candidate_sizes([64, 8])
  assert sizes == (8, 64)
  got = list(chunks(np.arange(1, 71), sizes))  # 70 ids: one chunk of 64, then 6 padded to 8
  assert [(len(padded), n) for padded, n in got] == [(64, 64), (8, 6)]
  np.testing.assert_array_equal(np.concatenate([p[:n] for p, n in got]), np.arange(1, 71))
  assert got[1][0].dtype == np.int32 and not got[1][0][6:].any()  # padding is item 0
  assert list(chunks(np.zeros(0, np.int64), sizes)) == []
  for bad in ([], [0, 8], [2.5]):
    with pytest.raises(ValueError, match="candidate sizes must be positive integers"):
      check_candidate_sizes(bad)


def test_repeated_candidates_are_scored_once_and_given_back_in_order():
  scored = []

  def score_padded(padded):
    scored.append(padded.copy())
    return padded * 10.0 + 1.0

  ids = np.array([5, 3, 5, 9, 3, 3, 7])
  got = score_distinct(ids, score_padded, (4, 8))
  np.testing.assert_array_equal(got, ids * 10.0 + 1.0)
  assert [list(p) for p in scored] == [[3, 5, 7, 9]]  # the 4 distinct ids, one size-4 chunk
  scored.clear()
  ids = np.array([4, 1, 2])  # no repeats: scored as given, in order
  np.testing.assert_array_equal(score_distinct(ids, score_padded, (4, 8)), ids * 10.0 + 1.0)
  assert [list(p) for p in scored] == [[4, 1, 2, 0]]
  assert score_distinct(np.zeros(0, np.int64), score_padded, (4,)).shape == (0,)


def test_server_and_exported_scorer_score_a_repeated_candidate_as_its_single_request(exported):
  from dmf_jax.serve.exported import ExportedScorer  # pylint: disable=g-import-not-at-top

  path, server = exported
  scorer = ExportedScorer(str(path))
  user = {"user/user_id": 7, "user/group": 2, "hist_item_id": [3, 50, 17]}
  ids = [11, 4, 11, 30, 4, 11]
  for impl in (server, scorer):
    state = impl.encode_user(user)
    single = np.concatenate([impl.score(state, [i]) for i in ids])
    got = impl.score(state, ids)
    assert got.shape == (6,) and got[0] == got[2] == got[5] and got[1] == got[4]
    np.testing.assert_allclose(got, single, rtol=1e-5, atol=1e-6)
