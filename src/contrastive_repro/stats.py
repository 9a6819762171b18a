"""Paired comparisons with a verdict, and trivial-baseline gates.

A claim such as "TCM lowers OPIS" is tested on *units* -- (seed, split) pairs on which both arms ran -- so the
noise shared by the two arms cancels. :func:`paired_verdict` takes the per-unit results ``a`` (baseline arm) and
``b`` (the paper's arm) and reports the mean paired difference ``d = mean(b - a)``, its standard error, a
``1 - alpha`` confidence interval from Student's t with ``n - 1`` degrees of freedom, the two-sided p-value, and a
verdict in the paper's ``direction`` (+1: the paper says b > a; -1: b < a):

* ``reproduced``   the interval lies entirely on the paper's side of ``-margin`` (``margin = 0``: of zero);
* ``opposite``     the interval lies entirely on the other side;
* ``inconclusive`` otherwise -- reported with the minimum detectable effect of this design (the true effect that
  the same test would find with 80 % power, given the observed spread and ``n``).

``margin > 0`` turns the test into a non-inferiority test ("b is not worse than a by more than ``margin``"), used
for claims like "matches the conventional loss at half the batch". Thresholds are arguments, declared by the caller
before anything runs (the notebooks put them in their parameters cell).

:func:`gate` checks that a model beats its trivial baselines (chance, the most common class, an untrained encoder,
an image-blind model) by a declared margin; a comparison whose models fail their gate is ``uninformative``
whatever its interval says (:func:`gated_verdict`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as _st

__all__ = ["PairedVerdict", "GateResult", "paired_verdict", "gate", "gated_verdict", "chance_rate",
           "majority_rate", "balanced_accuracy", "mean_ci", "VERDICTS"]

VERDICTS = ("reproduced", "opposite", "inconclusive", "uninformative")


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of per-unit results, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} has non-finite values at positions {np.flatnonzero(bad)[:10].tolist()}: "
                         f"{arr[bad][:5].tolist()}")
    return arr


@dataclass(frozen=True)
class PairedVerdict:
    """The result of :func:`paired_verdict`; ``as_dict()`` gives JSON-ready values."""

    n: int
    mean_a: float
    mean_b: float
    effect: float          # mean of b - a
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    mde: float             # minimum detectable |effect| at 80 % power (beyond the margin)
    direction: int
    alpha: float
    margin: float
    verdict: str

    def as_dict(self) -> dict:
        return {k: (round(v, 10) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        lo, hi = self.ci_low, self.ci_high
        s = (f"{self.verdict}: effect {self.effect:+.4g} [{lo:+.4g}, {hi:+.4g}] (n={self.n}, "
             f"p={self.p_value:.3g})")
        if self.verdict == "inconclusive":
            s += f"; this design detects |effect| >= {self.mde:.3g} with 80% power"
        return s


def paired_verdict(a: Sequence[float], b: Sequence[float], direction: int = +1, alpha: float = 0.05,
                   margin: float = 0.0, power: float = 0.8) -> PairedVerdict:
    """Compare arm ``b`` with arm ``a`` on the same units (see the module docstring).

    ``a[i]`` and ``b[i]`` must come from the same seed and split. ``direction`` is the paper's claimed sign of
    ``b - a``. ``margin >= 0`` is the non-inferiority margin in the units of ``a``; 0 tests superiority.
    """
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired arms need the same units: len(a)={a.size}, len(b)={b.size}")
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    n = int(a.size)
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 units, got {n}")
    d = b - a
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t_crit = float(_st.t.ppf(1 - alpha / 2, n - 1))
    lo, hi = mean - t_crit * se, mean + t_crit * se
    if se > 0:
        p = float(2 * _st.t.sf(abs(mean) / se, n - 1))
    else:
        p = 0.0 if mean != 0 else 1.0
    mde = (t_crit + float(_st.t.ppf(power, n - 1))) * se
    # the interval in the paper's orientation: the claim holds when all of it is above -margin
    lo_dir, hi_dir = sorted((direction * lo, direction * hi))
    if lo_dir > -margin:
        verdict = "reproduced"
    elif hi_dir < -margin:
        verdict = "opposite"
    else:
        verdict = "inconclusive"
    return PairedVerdict(n=n, mean_a=float(a.mean()), mean_b=float(b.mean()), effect=mean, se=se, ci_low=lo,
                         ci_high=hi, p_value=p, mde=mde, direction=direction, alpha=alpha, margin=float(margin),
                         verdict=verdict)


def mean_ci(x: Sequence[float], alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean of ``x`` and its ``1 - alpha`` Student-t interval: ``(mean, low, high)``; one value gives a zero width."""
    x = _as_1d(x, "x")
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    m = float(x.mean())
    if x.size == 1:
        return m, m, m
    h = float(_st.t.ppf(1 - alpha / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - h, m + h


@dataclass(frozen=True)
class GateResult:
    """Did ``score`` beat every trivial baseline in ``baselines`` by ``margin``? (higher is better)"""

    passed: bool
    score: float
    best_baseline: str
    best_baseline_score: float
    margin: float
    baselines: dict

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        word = "passes" if self.passed else "FAILS"
        return (f"gate {word}: {self.score:.4g} vs best baseline {self.best_baseline} = "
                f"{self.best_baseline_score:.4g} (margin {self.margin:g})")


def gate(score: float, baselines: Mapping[str, float], margin: float = 0.0,
         higher_is_better: bool = True) -> GateResult:
    """``passed`` when ``score`` beats the best of ``baselines`` by more than ``margin``.

    For a lower-is-better metric pass ``higher_is_better=False``: the best baseline is then the smallest, and the
    score must be below it by more than ``margin``.
    """
    if not baselines:
        raise ValueError("gate needs at least one baseline")
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"gate: score is not finite ({score})")
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"gate: margin must be a finite number >= 0, got {margin!r}")
    vals = {str(k): float(v) for k, v in baselines.items()}
    for k, v in vals.items():
        if not math.isfinite(v):
            raise ValueError(f"gate: baseline {k!r} is not finite ({v})")
    pick = max if higher_is_better else min
    best = pick(vals, key=vals.get)
    gap = (score - vals[best]) if higher_is_better else (vals[best] - score)
    return GateResult(passed=gap > margin, score=score, best_baseline=best, best_baseline_score=vals[best],
                      margin=float(margin), baselines=vals)


def gated_verdict(v: PairedVerdict, *gates: GateResult) -> str:
    """``uninformative`` when any gate failed, else the verdict of ``v``."""
    return "uninformative" if any(not g.passed for g in gates) else v.verdict


def chance_rate(n_classes: int) -> float:
    """Accuracy of a uniform random guess over ``n_classes``."""
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes!r}")
    return 1.0 / int(n_classes)


def majority_rate(test_labels, train_labels=None) -> float:
    """Accuracy of always answering the most common class (of ``train_labels`` when given, else of the test set)."""
    test = np.asarray(test_labels).ravel()
    if test.size == 0:
        raise ValueError("majority_rate: empty test labels")
    ref = np.asarray(train_labels).ravel() if train_labels is not None else test
    values, counts = np.unique(ref, return_counts=True)
    return float((test == values[counts.argmax()]).mean())


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean over the classes present in ``y_true`` of the per-class recall (sklearn's definition)."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"balanced_accuracy: need equal non-empty shapes, got {y_true.shape} and {y_pred.shape}")
    recalls = [float((y_pred[y_true == c] == c).mean()) for c in np.unique(y_true)]
    return float(np.mean(recalls))
