r"""One line or two? Least-squares line vs. a continuous two-piece (hinge) fit, compared by BIC, slopes with intervals.

Used for the TCM paper's accuracy-vs-OPIS claim (notebook 08): "accuracy and OPIS correlate at low accuracy; past
an inflection point higher accuracy brings worse OPIS". With ``x`` = recognition error and ``y`` = OPIS that is a
positive slope at high error and a negative slope at low error, joined at a breakpoint.

* :func:`fit_line`: ``y = a + b x``, ordinary least squares; ``b`` with its Student-t interval (``n - 2`` d.o.f.).
* :func:`fit_two_piece`: ``y = a + b x + c max(x - t, 0)``, continuous at the breakpoint ``t``; ``t`` is searched on
  a grid between the ``min_pts``-th smallest and largest ``x`` (so each piece holds at least ``min_pts`` points) and
  the coefficients are OLS given ``t``. Slopes: ``left = b`` (``x < t``), ``right = b + c``; their intervals are the
  OLS ones *conditional on the chosen breakpoint* (``n - 4`` d.o.f., counting ``t`` as a parameter), so slightly
  optimistic.
* BIC with Gaussian errors: ``n log(SSE / n) + k log n``, ``k`` = mean parameters + 1 (the variance): 3 for the line,
  5 for the two-piece fit (3 coefficients and the breakpoint). Lower is better; :func:`compare_line_two_piece`
  reports ``delta_bic = BIC_line - BIC_two_piece`` (> 0 favours the kink; > 2 "positive", > 6 "strong" evidence in
  Kass & Raftery's scale).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st

__all__ = ["fit_line", "fit_two_piece", "compare_line_two_piece", "bic", "slope_verdict"]


def _xy(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    return x, y


def bic(sse: float, n: int, k: int) -> float:
    """``n log(SSE / n) + k log n`` (SSE floored at 1e-300)."""
    return float(n * math.log(max(float(sse), 1e-300) / n) + k * math.log(n))


def _ols(X: np.ndarray, y: np.ndarray, dof: int):
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ coef
    sse = float(resid @ resid)
    s2 = sse / dof if dof > 0 else float("nan")
    cov = s2 * np.linalg.pinv(X.T @ X)
    return coef, sse, cov


def _interval(est: float, var: float, dof: int, alpha: float) -> tuple[float, float, float]:
    se = math.sqrt(max(var, 0.0)) if math.isfinite(var) else float("nan")
    if dof < 1 or not math.isfinite(se):
        return se, float("nan"), float("nan")
    t = float(_st.t.ppf(1 - alpha / 2, dof))
    return se, est - t * se, est + t * se


def fit_line(x, y, alpha: float = 0.05) -> dict:
    """OLS line: ``intercept``, ``slope``, ``slope_se``, ``slope_ci`` (tuple), ``sse``, ``bic``, ``n``."""
    x, y = _xy(x, y)
    n = x.size
    if n < 3:
        raise ValueError(f"fit_line needs >= 3 points, got {n}")
    X = np.column_stack([np.ones(n), x])
    coef, sse, cov = _ols(X, y, n - 2)
    se, lo, hi = _interval(float(coef[1]), float(cov[1, 1]), n - 2, alpha)
    return {"intercept": float(coef[0]), "slope": float(coef[1]), "slope_se": se, "slope_ci": (lo, hi),
            "sse": sse, "bic": bic(sse, n, 3), "n": n}


def fit_two_piece(x, y, min_pts: int = 3, grid: int = 200, alpha: float = 0.05) -> dict:
    """Continuous hinge fit (see the module docstring): ``breakpoint``, ``coef`` (a, b, c), ``slope_left`` /
    ``slope_right`` with ``*_se`` and ``*_ci``, ``sse``, ``bic``, ``n``."""
    x, y = _xy(x, y)
    n = x.size
    if min_pts < 2 or n < 2 * min_pts or n < 5:
        raise ValueError(f"fit_two_piece needs >= max(5, 2 * min_pts) points and min_pts >= 2, got n={n}, "
                         f"min_pts={min_pts}")
    xs = np.sort(x)
    lo_t, hi_t = xs[min_pts - 1], xs[-min_pts]
    if not hi_t > lo_t:
        raise ValueError("fit_two_piece: x has too few distinct values for a breakpoint")
    best = None
    for t in np.linspace(lo_t, hi_t, int(grid)):
        X = np.column_stack([np.ones(n), x, np.maximum(x - t, 0.0)])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        sse = float(np.sum((y - X @ coef) ** 2))
        if best is None or sse < best[0] - 1e-15:
            best = (sse, float(t))
    t = best[1]
    X = np.column_stack([np.ones(n), x, np.maximum(x - t, 0.0)])
    coef, sse, cov = _ols(X, y, n - 4)
    se_l, lo_l, hi_l = _interval(float(coef[1]), float(cov[1, 1]), n - 4, alpha)
    right = float(coef[1] + coef[2])
    se_r, lo_r, hi_r = _interval(right, float(cov[1, 1] + cov[2, 2] + 2 * cov[1, 2]), n - 4, alpha)
    return {"breakpoint": t, "coef": [float(c) for c in coef], "slope_left": float(coef[1]), "slope_left_se": se_l,
            "slope_left_ci": (lo_l, hi_l), "slope_right": right, "slope_right_se": se_r,
            "slope_right_ci": (lo_r, hi_r), "sse": sse, "bic": bic(sse, n, 5), "n": n}


def compare_line_two_piece(x, y, min_pts: int = 3, alpha: float = 0.05) -> dict:
    """``{"line": fit_line, "two_piece": fit_two_piece, "delta_bic": BIC_line - BIC_two_piece,
    "prefers": "two_piece" | "line"}`` (``prefers`` is the lower BIC)."""
    line = fit_line(x, y, alpha)
    two = fit_two_piece(x, y, min_pts=min_pts, alpha=alpha)
    d = line["bic"] - two["bic"]
    return {"line": line, "two_piece": two, "delta_bic": float(d), "prefers": "two_piece" if d > 0 else "line"}


def slope_verdict(estimate: float, se: float, ci: tuple[float, float], n: int, dof: int, direction: int,
                  alpha: float = 0.05):
    """A :class:`~contrastive_repro.stats.PairedVerdict` for a slope (so that it can be a claims-ledger row):
    ``effect`` = the slope, ``reproduced`` when its interval excludes 0 in ``direction``, ``opposite`` when it
    excludes 0 the other way, else ``inconclusive`` with the 80 %-power detectable slope. ``mean_a`` / ``mean_b``
    are 0 (there are no arms)."""
    from .stats import PairedVerdict

    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    lo, hi = float(ci[0]), float(ci[1])
    lo_d, hi_d = sorted((direction * lo, direction * hi))
    verdict = "reproduced" if lo_d > 0 else ("opposite" if hi_d < 0 else "inconclusive")
    p = float(2 * _st.t.sf(abs(estimate) / se, dof)) if se > 0 and dof > 0 else float("nan")
    mde = float((_st.t.ppf(1 - alpha / 2, dof) + _st.t.ppf(0.8, dof)) * se) if dof > 0 else float("nan")
    return PairedVerdict(n=int(n), mean_a=0.0, mean_b=0.0, effect=float(estimate), se=float(se), ci_low=lo,
                         ci_high=hi, p_value=p, mde=mde, direction=int(direction), alpha=float(alpha), margin=0.0,
                         verdict=verdict)
