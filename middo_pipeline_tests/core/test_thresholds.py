import math

import numpy as np
import pytest

from middo_pipeline.core.thresholds import (
    ThresholdSpec,
    flag_above,
    flag_below,
    flag_both_above,
    resolve_m,
)

# mean 3, population std sqrt(2): thresholds are exact
VALUES = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
STD = math.sqrt(2.0)


def test_flag_above_exact_threshold_and_set():
    res = flag_above(VALUES, ThresholdSpec(m=1.0), 1)
    assert res.mean == pytest.approx(3.0)
    assert res.std == pytest.approx(STD)  # ddof = 0
    assert res.threshold == pytest.approx(3.0 + STD)
    assert res.flagged.tolist() == [False, False, False, False, True]
    assert res.n_flagged == 1 and res.fraction == pytest.approx(0.2)
    assert res.direction == "above" and res.m == 1.0 and res.n_missing == 0


def test_flag_below_exact_threshold_and_set():
    res = flag_below(VALUES, ThresholdSpec(m=0.5), 1)
    assert res.threshold == pytest.approx(3.0 - 0.5 * STD)
    assert res.flagged.tolist() == [True, True, False, False, False]
    assert res.direction == "below"


def test_strict_comparison_and_constant_signal():
    # threshold exactly on a value: that value is not flagged
    res = flag_above([0.0, 2.0], ThresholdSpec(m=1.0), 1)  # mean 1, std 1 -> threshold 2
    assert res.threshold == pytest.approx(2.0)
    assert not res.flagged.any()
    res = flag_below(np.full(7, 4.2), ThresholdSpec(m=0.0), 1)
    assert res.std == 0 and res.n_flagged == 0


def test_m_zero_flags_above_mean():
    res = flag_above(VALUES, ThresholdSpec(m=0.0), 1)
    assert res.flagged.tolist() == [False, False, False, True, True]


def test_schedule_last_value_repeats():
    spec = ThresholdSpec(m=[2.0, 1.0, 0.5])
    assert [resolve_m(spec, r) for r in (1, 2, 3, 4, 10)] == [2.0, 1.0, 0.5, 0.5, 0.5]
    assert flag_above(VALUES, spec, 1).n_flagged == 0  # 3 + 2·1.41 = 5.83
    assert flag_above(VALUES, spec, 3).flagged.tolist() == [False, False, False, True, True]  # 3.71


def test_decay():
    spec = ThresholdSpec(m=2.0, decay=0.5)
    assert resolve_m(spec, 1) == 2.0
    assert resolve_m(spec, 2) == 1.0
    assert resolve_m(spec, 3) == 0.5
    spec = ThresholdSpec(m=[1.0, 3.0], decay=0.5)
    assert resolve_m(spec, 2) == pytest.approx(1.5)
    assert resolve_m(spec, 3) == pytest.approx(0.75)
    res = flag_above(VALUES, ThresholdSpec(m=2.0, decay=0.5), 2)
    assert res.m == 1.0 and res.threshold == pytest.approx(3.0 + STD)


def test_target_fraction():
    values = np.arange(100, dtype=float)
    rng = np.random.default_rng(0)
    values = rng.permutation(values)
    spec = ThresholdSpec(target_fraction=0.1)
    assert resolve_m(spec, 1) is None
    hi = flag_above(values, spec, 3)
    assert hi.n_flagged == 10 and set(values[hi.flagged]) == set(range(90, 100))
    assert hi.threshold == pytest.approx(89.5) and hi.m is None
    lo = flag_below(values, spec, 1)
    assert lo.n_flagged == 10 and set(values[lo.flagged]) == set(range(10))
    assert flag_above(values, ThresholdSpec(m=None, target_fraction=0.0), 1).n_flagged == 0
    assert flag_below(values, ThresholdSpec(m=None, target_fraction=1.0), 1).n_flagged == 100
    assert flag_above(values, ThresholdSpec(m=None, target_fraction=1.0), 1).n_flagged == 100
    meta = hi.as_metadata()
    assert meta["selection"] == "target_fraction" and meta["target_fraction"] == 0.1 and "m" not in meta


def test_target_fraction_never_splits_ties():
    values = np.array([1, 2, 3, 3, 3, 4], dtype=float)
    res = flag_above(values, ThresholdSpec(target_fraction=0.5), 1)  # 3 wanted, but 3 ties at the boundary
    assert res.flagged.tolist() == [False, False, False, False, False, True]


def test_nan_never_flagged_and_excluded_from_stats():
    values = np.array([1.0, np.nan, 2.0, 3.0, np.nan, 4.0, 5.0, 100.0])
    res = flag_above(values, ThresholdSpec(m=1.0), 1)
    valid = values[~np.isnan(values)]
    assert res.mean == pytest.approx(valid.mean())
    assert res.std == pytest.approx(valid.std())
    assert res.n_missing == 2
    assert not res.flagged[1] and not res.flagged[4]
    assert res.flagged.tolist() == [False, False, False, False, False, False, False, True]
    low = flag_below(values, ThresholdSpec(m=0.0), 1)
    assert not low.flagged[np.isnan(values)].any()
    assert flag_above(values, ThresholdSpec(target_fraction=1.0), 1).n_flagged == 6


def test_empty_and_all_missing():
    res = flag_above([], ThresholdSpec(), 1)
    assert res.flagged.shape == (0,) and res.n_flagged == 0 and res.fraction == 0.0
    assert math.isnan(res.threshold)
    res = flag_below([np.nan, np.nan], ThresholdSpec(), 1)
    assert res.flagged.tolist() == [False, False] and res.n_missing == 2 and math.isnan(res.mean)
    meta = res.as_metadata()
    assert all(isinstance(v, (int, float, str)) for v in meta.values())


def test_both_above_rule():
    before = np.array([1.0, 1.0, 1.0, 1.0, 10.0, 10.0, np.nan, 1.0])
    after = np.array([1.0, 1.0, 1.0, 9.0, 9.0, 1.0, 9.0, 1.0])
    ra, rb, hard = flag_both_above(before, after, ThresholdSpec(m=0.5), 1)
    assert ra.flagged.tolist() == [False, False, False, False, True, True, False, False]
    assert rb.flagged.tolist() == [False, False, False, True, True, False, True, False]
    assert hard.tolist() == [False, False, False, False, True, False, False, False]
    with pytest.raises(ValueError):
        flag_both_above([1.0, 2.0], [1.0], ThresholdSpec(), 1)


def test_metadata_plain_types():
    meta = flag_above(VALUES, ThresholdSpec(m=[1.0, 2.0]), 2).as_metadata()
    assert meta["m"] == 2.0 and meta["direction"] == "above" and meta["n_flagged"] == 0
    assert meta["threshold"] == pytest.approx(3 + 2 * STD)
    for v in meta.values():
        assert type(v) in (int, float, str)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(m=2.0, target_fraction=0.1),
        dict(m=None),
        dict(m=[]),
        dict(m=1.0, decay=0.0),
        dict(m=None, target_fraction=0.1, decay=0.9),
        dict(target_fraction=1.5),
        dict(m=float("nan")),
    ],
)
def test_spec_validation(kwargs):
    with pytest.raises(ValueError):
        ThresholdSpec(**kwargs)


def test_round_validation():
    with pytest.raises(ValueError):
        resolve_m(ThresholdSpec(), 0)
