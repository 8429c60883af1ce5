import numpy as np
import pytest

from moco.errors import MocoError
from moco.stats import clopper_pearson_lower, clopper_pearson_upper, min_samples_for


def test_zero_errors_upper_bound_is_the_rule_of_three():
    # 0 events in n trials: upper bound is 1 - alpha**(1/n), about 3/n at 95%
    assert clopper_pearson_upper(0, 1000, 0.95) == pytest.approx(1 - 0.05 ** (1 / 1000))
    assert clopper_pearson_upper(0, 1000, 0.95) == pytest.approx(3 / 1000, rel=0.01)


def test_bounds_bracket_the_rate_and_cover_it_at_the_stated_confidence():
    rng = np.random.default_rng(0)
    p, n = 0.02, 500
    k = rng.binomial(n, p, size=4000)
    ub = clopper_pearson_upper(k, np.full_like(k, n), 0.9)
    lb = clopper_pearson_lower(k, np.full_like(k, n), 0.9)
    assert np.all(lb <= k / n) and np.all(k / n <= ub)
    assert np.mean(ub >= p) >= 0.9 and np.mean(lb <= p) >= 0.9  # exact bounds are conservative


def test_edge_cases_and_min_samples():
    assert clopper_pearson_upper(5, 5) == 1.0 and clopper_pearson_upper(0, 0) == 1.0
    assert clopper_pearson_lower(0, 10) == 0.0
    n = min_samples_for(0.001, 0.95)
    assert clopper_pearson_upper(0, n, 0.95) <= 0.001 < clopper_pearson_upper(0, n - 1, 0.95)
    with pytest.raises(MocoError, match="0 <= k <= n"):
        clopper_pearson_upper(3, 2)
    with pytest.raises(MocoError, match="confidence"):
        min_samples_for(0.01, 1.5)
