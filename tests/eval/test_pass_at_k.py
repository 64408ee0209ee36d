"""The unbiased pass@k estimator against values worked out by hand from binomial coefficients."""

from __future__ import annotations

import pytest

from blueprint.eval.pass_at_k import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (5, 2, 1, 2 / 5),  # pass@1 is the share that passed
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (20, 1, 10, 1 - 92378 / 184756),  # 1 - C(19,10)/C(20,10) = 1/2
        (4, 0, 2, 0.0),  # nothing passed: no draw passes
        (4, 3, 2, 1.0),  # n - c < k: every draw of 2 holds a pass
    ],
)
def test_pass_at_k_matches_the_binomial_formula_by_hand(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_the_mean_is_over_tasks_and_bad_counts_are_refused():
    assert mean_pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)
    assert mean_pass_at_k([[True, False, False], [True, True, False]], 2) == pytest.approx((2 / 3 + 1) / 2)
    assert mean_pass_at_k([], 1) == 0.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
