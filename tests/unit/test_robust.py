from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_stability.ops.robust import Baseline, RollingWindow, median_mad, robust_zscore

floats = st.floats(allow_nan=True, allow_infinity=True, width=64)
finite = st.floats(min_value=-1e300, max_value=1e300, allow_nan=False, allow_infinity=False)


def test_median_mad_known_answer():
    med, mad = median_mad(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert med == 3.0
    assert mad == 1.0  # |x - 3| = 2, 1, 0, 1, 97 -> median 1


def test_median_mad_even_count_interpolates():
    med, mad = median_mad(torch.tensor([1.0, 2.0, 3.0, 10.0]))
    assert med == 2.5
    assert mad == pytest.approx(1.0)  # 1.5, 0.5, 0.5, 7.5 -> 1.0


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, min_size=0, max_size=64))
def test_median_mad_matches_numpy_on_finite_part(values):
    med, mad = median_mad(torch.tensor(values, dtype=torch.float64))
    arr = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        assert math.isnan(med) and math.isnan(mad)
        return
    ref_med = float(np.median(arr))
    with np.errstate(all="ignore"):
        ref_mad = float(np.median(np.abs(arr - ref_med)))
    assert med == pytest.approx(ref_med, rel=1e-9, abs=1e-300) or (math.isinf(ref_med) and math.isinf(med))
    if math.isfinite(ref_mad):
        assert mad == pytest.approx(ref_mad, rel=1e-9, abs=1e-300)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=32), floats)
def test_zscore_is_never_nan_for_a_real_baseline(values, x):
    med, mad = median_mad(torch.tensor(values, dtype=torch.float64))
    z = robust_zscore(x, med, mad)
    if math.isfinite(med) and math.isfinite(mad):
        assert not math.isnan(z)
        if math.isnan(x) or x == math.inf:
            assert z == math.inf


def test_zscore_floor_keeps_constant_baseline_calm():
    # a constant window has MAD 0; a 1% wiggle must not be an astronomically large score
    z = robust_zscore(1.01, 1.0, 0.0)
    assert z == pytest.approx(1.0)
    assert robust_zscore(3.0, 1.0, 0.0) == pytest.approx(200.0)


def test_zscore_uses_mad_scale():
    assert robust_zscore(11.0, 1.0, 1.0) == pytest.approx(10.0 / 1.4826)


def test_window_refuses_nonfinite_and_rolls():
    w = RollingWindow(3)
    assert not w.push(float("nan"))
    assert not w.push(float("inf"))
    assert len(w) == 0
    for v in (1.0, 2.0, 3.0, 4.0):
        assert w.push(v)
    assert w.values().tolist() == [2.0, 3.0, 4.0]
    b = w.baseline()
    assert (b.median, b.count) == (3.0, 3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([0.5, 1.0, 1.0, 2.0, 3.5, 1e-3, 7.0]) | st.floats(0.0, 10.0), min_size=1, max_size=60),
       st.integers(2, 9))
def test_window_baseline_equals_median_mad_of_its_last_values(values, capacity):
    # the window's sorted copy is updated by insertions and removals (ties included): after every push
    # its baseline must be that of the last ``capacity`` values
    window = RollingWindow(capacity)
    for i, v in enumerate(values):
        window.push(v)
        last = values[max(0, i + 1 - capacity): i + 1]
        b = window.baseline()
        assert (b.median, b.mad, b.count) == (*median_mad(last), len(last))


def test_window_state_round_trip():
    w = RollingWindow(4)
    for v in (5.0, 1.0, 7.0, 2.0, 9.0):
        w.push(v)
    w2 = RollingWindow(4)
    w2.load_state_dict(w.state_dict())
    assert w2.values().tolist() == w.values().tolist() == [1.0, 7.0, 2.0, 9.0]
    # pushes continue identically after a restore
    w.push(3.0)
    w2.push(3.0)
    assert w2.values().tolist() == w.values().tolist()


@pytest.mark.parametrize("capacity", [0, 1, -3, 2.5, True])
def test_window_rejects_bad_capacity(capacity):
    with pytest.raises(ValueError, match="capacity"):
        RollingWindow(capacity)


def test_baseline_ratio():
    b = Baseline(median=2.0, mad=0.1, count=10)
    assert b.ratio(5.0) == 2.5
    assert b.ratio(float("nan")) == math.inf
    assert math.isnan(Baseline(-1.0, 0.1, 3).ratio(1.0))


def test_threshold_is_where_both_spike_rules_begin():
    from lightning_stability.ops.robust import MAD_TO_STD, Baseline

    b = Baseline(median=2.0, mad=0.5, count=10)
    t = b.threshold(zscore=6.0, ratio=2.0)
    assert t == max(2.0 + 6.0 * MAD_TO_STD * 0.5, 4.0)
    assert b.zscore(t) == pytest.approx(6.0) and b.ratio(t) >= 2.0
    assert b.zscore(t * 0.999) < 6.0  # just below: not a spike by the z-score rule
    narrow = Baseline(median=2.0, mad=0.0, count=10)  # the ratio rule decides when the spread is tiny
    assert narrow.threshold(zscore=6.0, ratio=5.0) == 10.0
    assert math.isnan(Baseline(median=math.nan, mad=math.nan, count=0).threshold(6.0, 2.0))
