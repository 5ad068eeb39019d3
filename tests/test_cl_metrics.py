"""Tests for the continual-learning scores of sleep_jax.eval.

Every expected value is worked out by hand in a comment next to it.
"""

from __future__ import annotations

import pytest

from sleep_jax import eval as cl_eval

# acc[i][j] = accuracy on session j after cycle i; None above the diagonal.
_MATRIX = [[0.8, None, None],
           [0.6, 0.9, None],
           [0.5, 0.7, 1.0]]


def test_final_acc_and_bwt_unchanged():
  # ACC = (0.5 + 0.7 + 1.0) / 3 = 2.2 / 3
  assert cl_eval.final_acc(_MATRIX) == pytest.approx(2.2 / 3)
  # BWT = ((0.5 - 0.8) + (0.7 - 0.9)) / 2 = (-0.3 - 0.2) / 2 = -0.25
  assert cl_eval.bwt(_MATRIX) == pytest.approx(-0.25)


def test_forgetting_max_on_the_diagonal():
  # j=0: max(acc[0][0], acc[1][0]) = max(0.8, 0.6) = 0.8; 0.8 - 0.5 = 0.3
  # j=1: max(acc[1][1]) = 0.9; 0.9 - 0.7 = 0.2
  # mean = (0.3 + 0.2) / 2 = 0.25 (= -BWT, since each max is the diagonal)
  assert cl_eval.forgetting(_MATRIX) == pytest.approx(0.25)


def test_forgetting_max_not_on_the_diagonal():
  # Session 0 improves after cycle 1 (0.4 -> 0.9), then drops to 0.5.
  matrix = [[0.4, None, None],
            [0.9, 0.8, None],
            [0.5, 0.6, 0.7]]
  # j=0: max(0.4, 0.9) = 0.9; 0.9 - 0.5 = 0.4
  # j=1: max(0.8) = 0.8;      0.8 - 0.6 = 0.2
  # mean = (0.4 + 0.2) / 2 = 0.3
  assert cl_eval.forgetting(matrix) == pytest.approx(0.3)
  # BWT only sees the diagonal: ((0.5 - 0.4) + (0.6 - 0.8)) / 2 = -0.05,
  # so it hides most of session 0's loss.
  assert cl_eval.bwt(matrix) == pytest.approx(-0.05)


def test_forgetting_excludes_the_last_cycle_from_the_max():
  # Session 0 peaks at the last cycle: max over i in [0, T-2] = [0, 1] only.
  matrix = [[0.5, None, None],
            [0.3, 0.6, None],
            [0.9, 0.6, 0.8]]
  # j=0: max(0.5, 0.3) = 0.5; 0.5 - 0.9 = -0.4
  # j=1: max(0.6) = 0.6;      0.6 - 0.6 = 0.0
  # mean = (-0.4 + 0.0) / 2 = -0.2 (negative: remembered better than ever)
  assert cl_eval.forgetting(matrix) == pytest.approx(-0.2)


def test_forgetting_one_and_two_sessions():
  assert cl_eval.forgetting([[0.7]]) == 0.0
  assert cl_eval.bwt([[0.7]]) == 0.0
  # Two sessions: only j=0, max(acc[0][0]) = 0.9; 0.9 - 0.4 = 0.5
  assert cl_eval.forgetting([[0.9, None], [0.4, 0.8]]) == pytest.approx(0.5)


def test_acc_all_weighted_differs_from_unweighted():
  # Base: 1000 items at 0.9 -> 900 correct.
  # Sessions: 100 items at 0.5 -> 50 correct; 100 items at 0.7 -> 70 correct.
  # ACC all = (900 + 50 + 70) / (1000 + 100 + 100) = 1020 / 1200 = 0.85
  assert cl_eval.acc_all([0.5, 0.7], 0.9, [100, 100], 1000) == (
      pytest.approx(0.85))
  # The unweighted mean of the three would be (0.9 + 0.5 + 0.7) / 3 = 0.7,
  # and final ACC over sessions alone (0.5 + 0.7) / 2 = 0.6.
  assert cl_eval.final_acc([[0.5, None], [0.5, 0.7]]) == pytest.approx(0.6)


def test_acc_all_unequal_sessions():
  # Base: 10 items at 0.2 -> 2 correct.
  # Session 0: 30 items at 1.0 -> 30; session 1: 60 items at 0.5 -> 30.
  # ACC all = (2 + 30 + 30) / (10 + 30 + 60) = 62 / 100 = 0.62
  assert cl_eval.acc_all([1.0, 0.5], 0.2, [30, 60], 10) == pytest.approx(0.62)


def test_acc_all_one_session_and_no_base():
  # One session, 40 items at 0.25 -> 10; base 40 items at 0.75 -> 30.
  # ACC all = (30 + 10) / 80 = 0.5
  assert cl_eval.acc_all([0.25], 0.75, [40], 40) == pytest.approx(0.5)
  # No base items: the item-weighted mean of the sessions,
  # (20 * 0.5 + 80 * 1.0) / 100 = (10 + 80) / 100 = 0.9; base_acc unused.
  assert cl_eval.acc_all([0.5, 1.0], None, [20, 80], 0) == pytest.approx(0.9)


def test_acc_all_rejects_bad_input():
  with pytest.raises(ValueError, match='item counts'):
    cl_eval.acc_all([0.5, 0.6], 0.9, [10], 100)
  with pytest.raises(ValueError, match='not evaluated'):
    cl_eval.acc_all([0.5, None], 0.9, [10, 10], 100)
  with pytest.raises(ValueError, match='no items'):
    cl_eval.acc_all([], 0.9, [], 0)
