"""paired_verdict, gates and helpers: hand-computed cases, calibration on null data, power on a planted effect."""
import math

import numpy as np
import pytest

from contrastive_repro.stats import (balanced_accuracy, chance_rate, gate, gated_verdict, majority_rate, mean_ci,
                                     paired_verdict)


def test_hand_computed_case():
    # d = b - a = [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3); t_{0.975, 2} = 4.302652729911275
    v = paired_verdict([0, 0, 0], [1, 2, 3])
    se = 1 / math.sqrt(3)
    assert v.n == 3 and v.effect == pytest.approx(2.0) and v.se == pytest.approx(se)
    assert v.ci_low == pytest.approx(2 - 4.302652729911275 * se)
    assert v.ci_high == pytest.approx(2 + 4.302652729911275 * se)
    # t = 2 / se = 3.4641; two-sided p with 2 df = 0.0741799 (from the t table / closed form for 2 df)
    t = 2 / se
    p_closed = 1 - t / math.sqrt(2 + t * t)  # two-sided p for 2 degrees of freedom
    assert v.p_value == pytest.approx(p_closed, rel=1e-9)
    assert v.verdict == "inconclusive"  # the interval [-0.48, 4.48] contains 0


def test_directions_and_opposite():
    a = np.array([0.50, 0.52, 0.49, 0.51, 0.50])
    b = a + np.array([0.10, 0.11, 0.09, 0.10, 0.12])
    assert paired_verdict(a, b, direction=+1).verdict == "reproduced"
    assert paired_verdict(a, b, direction=-1).verdict == "opposite"
    assert paired_verdict(b, a, direction=-1).verdict == "reproduced"


def test_non_inferiority_margin():
    a = np.array([0.80, 0.81, 0.79, 0.80, 0.82, 0.80])
    b = a - np.array([0.005, 0.004, 0.006, 0.005, 0.003, 0.006])  # slightly worse, by ~0.005
    assert paired_verdict(a, b).verdict == "opposite"                      # superiority: worse
    assert paired_verdict(a, b, margin=0.02).verdict == "reproduced"       # not worse by more than 0.02
    assert paired_verdict(a, b, margin=0.001).verdict == "opposite"        # worse by more than 0.001


def test_zero_spread():
    v = paired_verdict([1, 1, 1], [2, 2, 2])
    assert v.se == 0 and v.ci_low == v.ci_high == 1 and v.verdict == "reproduced" and v.p_value == 0
    v0 = paired_verdict([1, 1, 1], [1, 1, 1])
    assert v0.verdict == "inconclusive" and v0.p_value == 1


def test_calibrated_on_null_data():
    rng = np.random.default_rng(0)
    n_sim, hits = 4000, 0
    for _ in range(n_sim):
        shared = rng.normal(size=8)
        a = shared + rng.normal(scale=0.3, size=8)
        b = shared + rng.normal(scale=0.3, size=8)
        hits += paired_verdict(a, b, alpha=0.05).verdict == "reproduced"
    rate = hits / n_sim
    # one-sided rejection at a two-sided 5 % interval: 2.5 % expected; allow Monte Carlo error
    assert rate <= 0.05 and rate == pytest.approx(0.025, abs=0.01)


def test_finds_a_planted_effect_and_mde_is_honest():
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(500):
        a = rng.normal(size=10)
        b = a + 0.5 + rng.normal(scale=0.3, size=10)
        v = paired_verdict(a, b)
        found += v.verdict == "reproduced"
    assert found / 500 > 0.99
    # the MDE is the effect found with ~80 % power: plant it and count
    a = rng.normal(size=(2000, 10))
    noise = rng.normal(scale=1.0, size=(2000, 10))
    se = 1.0 / math.sqrt(10)
    mde = paired_verdict(a[0], a[0] + noise[0]).mde * (se / paired_verdict(a[0], a[0] + noise[0]).se)
    power = np.mean([paired_verdict(a[i], a[i] + mde + noise[i]).verdict == "reproduced" for i in range(2000)])
    assert 0.7 < power < 0.9


@pytest.mark.parametrize("bad, match", [
    (dict(a=[1, 2], b=[1, 2, 3]), "same units"),
    (dict(a=[1], b=[2]), "at least 2"),
    (dict(a=[1, float("nan")], b=[1, 2]), "non-finite"),
    (dict(a=[1, 2], b=[1, 2], direction=0), "direction"),
    (dict(a=[1, 2], b=[1, 2], alpha=0.7), "alpha"),
    (dict(a=[1, 2], b=[1, 2], margin=-1), "margin"),
    (dict(a=[[1, 2]], b=[[1, 2]]), "1-D"),
])
def test_bad_input_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        paired_verdict(**bad)


def test_gate_and_gated_verdict():
    g = gate(0.80, {"chance": 0.1, "majority": 0.55, "untrained": 0.70}, margin=0.05)
    assert g.passed and g.best_baseline == "untrained"
    g2 = gate(0.72, {"chance": 0.1, "untrained": 0.70}, margin=0.05)
    assert not g2.passed
    lower = gate(0.1, {"random": 0.3}, margin=0.1, higher_is_better=False)
    assert lower.passed
    v = paired_verdict([0, 0, 0], [1, 1.1, 0.9])
    assert gated_verdict(v, g) == "reproduced" and gated_verdict(v, g, g2) == "uninformative"
    with pytest.raises(ValueError, match="baseline 'x'"):
        gate(0.5, {"x": float("inf")})


def test_trivial_rates():
    assert chance_rate(4) == 0.25
    assert majority_rate([0, 0, 1, 2]) == 0.5
    assert majority_rate([1, 1, 0], train_labels=[0, 0, 0, 1]) == pytest.approx(1 / 3)
    # class 0: 2/2 right, class 1: 0/2 right -> 0.5 (plain accuracy would be 0.5 too); imbalanced case:
    assert balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == 0.5
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2 and lo == pytest.approx(2 - 4.302652729911275 / math.sqrt(3))
