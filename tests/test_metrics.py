"""Metrics checked against values computed by hand on small matrices and curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clframe.metrics import matrix as mm
from clframe.metrics import stability as st

NAN = math.nan
# R[i][j]: accuracy on task j after training task i (3 tasks).
R = [[0.9, NAN, NAN],
     [0.6, 0.8, NAN],
     [0.5, 0.7, 0.95]]


def test_average_accuracy_and_incremental():
    assert mm.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert mm.average_accuracy(R, after_task=1) == pytest.approx(0.7)
    assert mm.average_incremental_accuracy(R) == pytest.approx((0.9 + 0.7 + 2.15 / 3) / 3)


def test_forgetting_variants_and_bwt():
    # max-based (Chaudhry): task0 max(0.9, 0.6) - 0.5 = 0.4; task1 0.8 - 0.7 = 0.1
    assert mm.average_forgetting(R) == pytest.approx(0.25)
    # first-based: (0.9 - 0.5 + 0.8 - 0.7) / 2 = 0.25; BWT is its negative
    assert mm.forgetting_first(R) == pytest.approx(0.25)
    assert mm.backward_transfer(R) == pytest.approx(-0.25)
    # per-step: step 1: (0.9-0.6)/1 = 0.3; step 2: ((0.6-0.5)+(0.8-0.7))/2 = 0.1 -> mean 0.2
    assert mm.forgetting_step(R) == pytest.approx(0.2)


def test_max_and_first_forgetting_differ_with_positive_backward_transfer():
    r = [[0.5, NAN, NAN], [0.9, 0.8, NAN], [0.7, 0.8, 0.9]]
    assert mm.average_forgetting(r) == pytest.approx(((0.9 - 0.7) + 0.0) / 2)
    assert mm.forgetting_first(r) == pytest.approx(((0.5 - 0.7) + 0.0) / 2)


def test_fwt_learning_accuracy_and_single_task():
    full = [[0.9, 0.3, 0.2], [0.8, 0.9, 0.4], [0.7, 0.8, 0.9]]
    initial = [0.1, 0.1, 0.1]
    assert mm.forward_transfer(full, initial) == pytest.approx(((0.3 - 0.1) + (0.4 - 0.1)) / 2)
    assert mm.learning_accuracy(full) == pytest.approx(0.9)
    one = [[0.7]]
    assert mm.average_forgetting(one) == 0.0 and mm.backward_transfer(one) == 0.0
    summary = mm.summarize_matrix(full, initial)
    assert summary["final/fwt"] == pytest.approx(0.25)
    assert "final/fwt" not in mm.summarize_matrix(R)
    with pytest.raises(ValueError, match="2-D"):
        mm.average_accuracy([])


def test_short_trace_min_acc_wf_wp():
    steps, trace = [0, 1, 2], [1.0, 0.5, 0.9]
    assert st.min_acc(steps, trace, task_end=-1) == pytest.approx(0.5)
    assert st.windowed_forgetting(steps, trace, 3) == pytest.approx(0.5)
    assert st.windowed_plasticity(steps, trace, 3) == pytest.approx(0.4)
    # A window of 2 iterations only pairs neighbours.
    assert st.windowed_plasticity([0, 1, 2, 3], [1.0, 0.5, 0.6, 0.9], 2) == pytest.approx(0.3)


def test_min_acc_starts_after_the_task_ends_and_skips_the_current_task():
    steps = [0, 1, 2, 3, 4, 5]
    acc = np.array([[0.2, NAN], [0.9, NAN], [0.95, NAN], [0.4, 0.1], [0.7, 0.6], [0.8, 0.9]])
    task_ends = [2, 5]
    assert st.min_acc(steps, acc[:, 0], task_ends[0]) == pytest.approx(0.4)  # 0.2 (during training) excluded
    assert math.isnan(st.min_acc(steps, acc[:, 1], task_ends[1]))
    assert st.average_min_acc(steps, acc, task_ends) == pytest.approx(0.4)
    # WC-ACC = (1/k) A_current + (1 - 1/k) avg-min-ACC with k = 2
    assert st.wc_acc(steps, acc, task_ends) == pytest.approx(0.5 * 0.9 + 0.5 * 0.4)


def test_gap_depth_and_recovery():
    steps = [0, 1, 2, 3, 4, 5, 6]
    acc = np.array([[0.5, NAN], [1.0, NAN], [0.6, 0.3], [0.4, 0.5], [0.7, 0.7], [0.95, 0.8], [1.0, 0.9]])
    gaps = st.gap_at_boundaries(steps, acc, task_ends=[1, 6])
    assert gaps[0]["task"] == 1
    assert gaps[0]["depth"] == pytest.approx(1.0 - 0.4)
    # recovery target: 0.4 + 0.9 * (1.0 - 0.4) = 0.94, first reached at step 5 -> 5 - 1 = 4 iterations
    assert gaps[0]["recovery_steps"] == pytest.approx(4)
    summary = st.summarize_curves(steps, acc, [1, 6], windows=[2])
    assert summary["stability/min_acc"] == pytest.approx(0.4)
    assert summary["stability/gap_depth"] == pytest.approx(0.6)
    assert summary["stability/wf2"] == pytest.approx(0.4)  # 1.0 -> 0.6 between neighbouring steps
