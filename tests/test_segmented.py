"""Line vs. two-piece fit (contrastive_repro.segmented): exact recovery, BIC by hand, intervals against statsmodels-
free closed forms, and the BIC choice on null data."""
import math

import numpy as np
import pytest

from contrastive_repro.segmented import bic, compare_line_two_piece, fit_line, fit_two_piece, slope_verdict


def test_line_matches_closed_form():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 3.1, 4.9, 7.2, 8.8])
    f = fit_line(x, y)
    xm, ym = x.mean(), y.mean()
    b = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    a = ym - b * xm
    sse = ((y - a - b * x) ** 2).sum()
    se = math.sqrt(sse / 3 / ((x - xm) ** 2).sum())
    assert f["slope"] == pytest.approx(b) and f["intercept"] == pytest.approx(a) and f["sse"] == pytest.approx(sse)
    assert f["slope_se"] == pytest.approx(se)
    t = 3.182446305284263  # t_{0.975, 3}
    assert f["slope_ci"][0] == pytest.approx(b - t * se) and f["slope_ci"][1] == pytest.approx(b + t * se)
    assert f["bic"] == pytest.approx(5 * math.log(sse / 5) + 3 * math.log(5))


def test_two_piece_recovers_a_hinge():
    x = np.linspace(0, 1, 41)
    y = np.where(x < 0.4, 1.0 - 2.0 * x, 0.2 + 1.5 * (x - 0.4))  # slopes -2 then +1.5, kink at 0.4
    y = y + 1e-4 * np.sin(37 * x)
    f = fit_two_piece(x, y, grid=401)
    assert f["breakpoint"] == pytest.approx(0.4, abs=0.01)
    assert f["slope_left"] == pytest.approx(-2.0, abs=0.01) and f["slope_right"] == pytest.approx(1.5, abs=0.01)
    assert f["slope_left_ci"][1] < 0 < f["slope_right_ci"][0]
    c = compare_line_two_piece(x, y)
    assert c["prefers"] == "two_piece" and c["delta_bic"] > 10
    assert c["delta_bic"] == pytest.approx(c["line"]["bic"] - c["two_piece"]["bic"])


def test_bic_prefers_the_line_on_straight_noisy_data_most_of_the_time():
    rng = np.random.default_rng(0)
    wins = 0
    for _ in range(100):
        x = rng.uniform(0, 1, 20)
        y = 0.5 * x + rng.normal(0, 0.1, 20)
        wins += compare_line_two_piece(x, y)["prefers"] == "line"
    assert wins >= 70


def test_bad_inputs_and_slope_verdict():
    with pytest.raises(ValueError):
        fit_two_piece([0, 1, 2, 3], [0, 1, 0, 1])
    with pytest.raises(ValueError):
        fit_line([0, 1, 2], [0, 1, float("nan")])
    assert bic(2.0, 10, 3) == pytest.approx(10 * math.log(0.2) + 3 * math.log(10))
    v = slope_verdict(-0.5, 0.1, (-0.7, -0.3), n=12, dof=8, direction=-1)
    assert v.verdict == "reproduced" and v.effect == -0.5
    assert slope_verdict(-0.5, 0.1, (-0.7, -0.3), n=12, dof=8, direction=+1).verdict == "opposite"
    assert slope_verdict(0.1, 0.2, (-0.3, 0.5), n=12, dof=8, direction=+1).verdict == "inconclusive"
