r"""OPIS and epsilon-OPIS: threshold (in)consistency of a metric-learning embedding.

Zhang et al., "Threshold-Consistent Margin Loss for Open-World Deep Metric Learning", ICLR 2024 (arXiv 2307.04047).
Only a blog article about the paper was available here; the definitions below follow the restatement in
``shared/papers/FACTS.md`` (section C) and the project brief, and every choice that might differ from the paper is
an argument.

Definitions (defaults in brackets)
----------------------------------
* distance ``d(a, b)``: ``1 - cos(a, b)`` of L2-normalized embeddings [``distance="cosine"``], or the Euclidean
  distance of the raw embeddings (``distance="euclidean"``).
* pairs: unordered pairs ``{a, b}`` of distinct samples. Positive pairs of class ``i``: both ends in class ``i``.
  Negative pairs of class ``i``: exactly one end in class ``i``.
* ``TPR_i(d)`` = share of the positive pairs of class ``i`` with distance ``<= d``;
  ``TNR_i(d)`` = share of the negative pairs of class ``i`` with distance ``> d``.
* utility ``U_i(d)`` = F-beta-style weighted harmonic mean of ``TPR_i`` and ``TNR_i``
  ``(1 + beta^2) TPR TNR / (beta^2 TNR + TPR)`` [``beta=1``: ``2 TPR TNR / (TPR + TNR)``], 0 when both are 0;
  ``beta > 1`` weighs false rejections (TPR) more, as recall is weighed in F-beta.
* calibration range ``[d_lo, d_hi]``: the distances at which the global false-acceptance rate
  ``FAR(d)`` = share of *all* negative pairs with distance ``<= d`` equals ``far_range = (1e-2, 1e-1)``, i.e. the
  ``far_range`` quantiles of the negative-pair distances (linear interpolation between order statistics, as
  ``numpy.quantile``); ``n_thresholds`` [101] evenly spaced thresholds ``d_0 = d_lo, ..., d_{K-1} = d_hi``.
* ``OPIS = 1/(C K) sum_i sum_k (U_i(d_k) - Ubar(d_k))^2`` over the C classes with at least ``min_class_size`` [2]
  samples, where ``Ubar(d)`` is the mean of ``U_i(d)`` over those classes [``reference="class_mean"``]. If the
  paper's Ubar is rather the utility of the whole test set (our recollection, not verified here),
  ``reference="global"`` gives it: the utility of the pooled rates (TPR over all positive pairs, TNR = 1 - FAR).
  An average over d written as an integral over the range divided by its length is approximated by the evenly
  spaced grid (its Riemann sum). Classes are weighted equally (``1/C``).
* Classes with fewer than ``min_class_size`` samples have no (or too few) positive pairs: they are left out of the
  average over classes, but their samples still count as negatives of the other classes and in the global FAR.
* ``epsilon-OPIS`` (the paper's "10%-OPIS" for epsilon = 0.1; described only as "the difference between the
  worst-performing 10% and the remaining 90%"). Our default: rank the classes once by their mean utility over the
  calibration range [``rank_by="mean_utility"``]; the worst ``ceil(epsilon C)`` (at least 1, at most C - 1) classes
  form W, the others R [``compare_to="rest"``];
  ``epsilon-OPIS = 1/K sum_k (mean_{i in R} U_i(d_k) - mean_{i in W} U_i(d_k))`` [``statistic="difference"``].
  Options: ``rank_by="per_threshold"`` re-ranks at every threshold, ``compare_to="all"`` compares W with all
  classes, ``statistic="squared"`` averages the squared gap (an OPIS-like quantity). The paper may use any of these;
  state the choice next to reported numbers.

The exact functions here compute every pairwise distance in float64, in row chunks (memory O(chunk x N) plus the
negative-pair distances, kept for the exact quantiles: 8 bytes x N^2/2, fine up to N ~ 10k). For large N use
:class:`contrastive_repro.metrics.StreamingRetrievalEvaluator`, whose histogram OPIS comes with an error bound
(:func:`opis_from_histograms`).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ._common import default_chunk, dense_labels, float_embeddings, int_labels, l2_normalize

__all__ = ["opis", "epsilon_opis", "utility", "opis_from_utilities", "epsilon_opis_from_utilities",
           "opis_from_histograms"]

_RANK_BY = ("mean_utility", "per_threshold")
_COMPARE_TO = ("rest", "all")
_STATISTIC = ("difference", "squared")
_REFERENCE = ("class_mean", "global")


# ----------------------------------------------------------------------------------------------------------------
# utilities -> scores (shared by the exact and the histogram versions)
# ----------------------------------------------------------------------------------------------------------------
def utility(tpr, tnr, beta: float = 1.0) -> torch.Tensor:
    """``(1 + beta^2) tpr tnr / (beta^2 tnr + tpr)``, 0 where ``tpr = tnr = 0`` (elementwise, float64)."""
    tpr = torch.as_tensor(tpr, dtype=torch.float64)
    tnr = torch.as_tensor(tnr, dtype=torch.float64, device=tpr.device)
    if beta <= 0:
        raise ValueError("beta must be > 0")
    b2 = float(beta) ** 2
    den = b2 * tnr + tpr
    return torch.where(den > 0, (1.0 + b2) * tpr * tnr / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(den))


def opis_from_utilities(utilities, reference_utility=None) -> float:
    """``mean_{i,k} (U[i, k] - Ubar[k])^2`` for a utility matrix ``U`` [classes, thresholds]; ``Ubar`` is the class
    mean unless ``reference_utility`` [thresholds] is given."""
    u = torch.as_tensor(utilities, dtype=torch.float64)
    if u.ndim != 2 or u.shape[0] < 1 or u.shape[1] < 1:
        raise ValueError("utilities must be [classes >= 1, thresholds >= 1]")
    ref = u.mean(0) if reference_utility is None else torch.as_tensor(reference_utility, dtype=torch.float64,
                                                                      device=u.device)
    return float(((u - ref[None, :]) ** 2).mean())


def _n_worst(n_classes: int, epsilon: float) -> int:
    return int(min(max(1, math.ceil(epsilon * n_classes - 1e-9)), n_classes - 1))


def epsilon_opis_from_utilities(utilities, epsilon: float = 0.1, rank_by: str = "mean_utility",
                                compare_to: str = "rest", statistic: str = "difference") -> float:
    """epsilon-OPIS from a utility matrix [classes, thresholds] (see the module docstring for the definition)."""
    u = torch.as_tensor(utilities, dtype=torch.float64)
    if not 0.0 < epsilon < 1.0:
        raise ValueError("epsilon must be in (0, 1)")
    if rank_by not in _RANK_BY or compare_to not in _COMPARE_TO or statistic not in _STATISTIC:
        raise ValueError(f"rank_by in {_RANK_BY}, compare_to in {_COMPARE_TO}, statistic in {_STATISTIC}")
    if u.ndim != 2 or u.shape[0] < 2:
        raise ValueError("epsilon-OPIS needs at least 2 classes")
    n_cls = u.shape[0]
    m = _n_worst(n_cls, epsilon)
    if rank_by == "mean_utility":
        order = torch.argsort(u.mean(1), stable=True)
        s = u[order]  # [C, K], worst class first
    else:
        s = torch.sort(u, dim=0, stable=True).values
    worst = s[:m].mean(0)
    other = s[m:].mean(0) if compare_to == "rest" else u.mean(0)
    gap = other - worst
    return float((gap if statistic == "difference" else gap ** 2).mean())


# ----------------------------------------------------------------------------------------------------------------
# exact (all pairs) version
# ----------------------------------------------------------------------------------------------------------------
def _check_options(far_range, n_thresholds, distance, min_class_size, reference):
    lo, hi = (float(v) for v in far_range)
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"far_range must satisfy 0 < lo <= hi <= 1, got {far_range}")
    if int(n_thresholds) < 1:
        raise ValueError("n_thresholds must be >= 1")
    if distance not in ("cosine", "euclidean"):
        raise ValueError("distance must be 'cosine' or 'euclidean'")
    if int(min_class_size) < 2:
        raise ValueError("min_class_size must be >= 2 (a class needs a positive pair)")
    if reference not in _REFERENCE:
        raise ValueError(f"reference must be one of {_REFERENCE}")
    return lo, hi


def _linear_quantiles(values: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """``numpy.quantile(values, q)`` (method 'linear') for each q, selecting order statistics without a full sort
    on CPU."""
    n = values.numel()
    pos = []
    for q in qs:
        h = (n - 1) * float(q)
        lo = int(math.floor(h))
        pos.append((lo, min(lo + 1, n - 1), h - lo))
    ranks = sorted({i for lo, hi, _ in pos for i in (lo, hi)})
    if values.device.type == "cpu":
        part = np.partition(values.numpy(), ranks)
        stat = {i: float(part[i]) for i in ranks}
    else:
        srt = torch.sort(values).values
        stat = {i: float(srt[i]) for i in ranks}
    return [stat[lo] + frac * (stat[hi] - stat[lo]) for lo, hi, frac in pos]


def _distance_rows(x: torch.Tensor, rows: slice, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1.0 - x[rows] @ x.T
    return torch.cdist(x[rows], x, compute_mode="donot_use_mm_for_euclid_dist")


def _exact_rates(embeddings, labels, far_range, n_thresholds, distance, chunk_size):
    """Per class, the number of positive / negative pairs at or below each threshold (exact, float64).

    Samples are sorted by label (OPIS does not depend on the order), so that for a row of class c the columns after
    the class block are exactly its negative partners j > i: every unordered pair is visited once, with one distance
    value, without boolean masks.
    """
    x = float_embeddings(embeddings, "embeddings", dtype=torch.float64)
    y = int_labels(labels, x.shape[0], "labels", device=x.device)
    uniq, lab = dense_labels(y)
    n, n_cls = x.shape[0], uniq.numel()
    if n_cls < 2:
        raise ValueError("OPIS needs at least 2 classes (negative pairs)")
    order = torch.argsort(lab, stable=True)
    lab = lab[order]
    x = x[order]
    if distance == "cosine":
        x = l2_normalize(x)
    sizes = torch.bincount(lab, minlength=n_cls)
    ends = torch.cumsum(sizes, 0)
    starts_l, ends_l, lab_l = (ends - sizes).tolist(), ends.tolist(), lab.tolist()
    chunk = chunk_size or default_chunk(n, 1 << 22)

    def blocks():
        """(class, global row range, distance rows) for every run of same-class rows in every chunk."""
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            d = _distance_rows(x, slice(s, e), distance)
            r0 = s
            while r0 < e:
                c = lab_l[r0]
                r1 = min(ends_l[c], e)
                yield c, r0, r1, d[r0 - s:r1 - s]
                r0 = r1

    # pass 1: every negative-pair distance once (j > i), for the exact calibration range
    neg = [dr[:, ends_l[c]:].reshape(-1) for c, r0, r1, dr in blocks()]
    neg = torch.cat(neg)
    if neg.numel() == 0:
        raise ValueError("no negative pairs")
    d_lo, d_hi = _linear_quantiles(neg, far_range)
    del neg
    thresholds = torch.linspace(d_lo, d_hi, int(n_thresholds), dtype=torch.float64, device=x.device)
    # pass 2: bucket b = searchsorted(t, d) (d <= t_k  <=>  b <= k), counted per class
    k1 = thresholds.numel() + 1
    pos_h = torch.zeros(n_cls, k1, dtype=torch.int64, device=x.device)
    neg_h = torch.zeros(n_cls, k1, dtype=torch.int64, device=x.device)
    neg_h_cols = torch.zeros(n_cls * k1, dtype=torch.int64, device=x.device)
    col_key = lab * k1
    cols = torch.arange(n, device=x.device)
    for c, r0, r1, dr in blocks():
        c0, c1 = starts_l[c], ends_l[c]
        blk = dr[:, c0:c1]
        upper = cols[None, c0:c1] > cols[r0:r1, None]
        if bool(upper.any()):
            pos_h[c] += torch.bincount(torch.searchsorted(thresholds, blk[upper]), minlength=k1)
        if c1 < n:
            b = torch.searchsorted(thresholds, dr[:, c1:].contiguous())
            neg_h[c] += torch.bincount(b.reshape(-1), minlength=k1)  # the pair, for the row's class
            neg_h_cols += torch.bincount((b + col_key[None, c1:]).reshape(-1), minlength=n_cls * k1)  # column's
    neg_h += neg_h_cols.view(n_cls, k1)
    pos_le = pos_h.cumsum(1)[:, :-1]  # [C, K]: pairs with d <= t_k
    neg_le = neg_h.cumsum(1)[:, :-1]
    n_pos = sizes * (sizes - 1) // 2
    n_neg = sizes * (n - sizes)
    return dict(uniq=uniq, sizes=sizes, thresholds=thresholds, calibration_range=(d_lo, d_hi),
                pos_le=pos_le.double(), neg_le=neg_le.double(), n_pos=n_pos.double(), n_neg=n_neg.double(),
                neg_le_global=neg_le.double().sum(0) / 2, n_neg_global=float(n_neg.sum()) / 2)


def _scores_from_rates(r: dict, min_class_size, beta, reference):
    valid = r["sizes"] >= int(min_class_size)
    if not bool(valid.any()):
        raise ValueError(f"no class has at least min_class_size={min_class_size} samples")
    tpr = r["pos_le"][valid] / r["n_pos"][valid, None]
    tnr = 1.0 - r["neg_le"][valid] / r["n_neg"][valid, None]
    u = utility(tpr, tnr, beta)
    if reference == "global":
        n_pos_all = r["n_pos"].sum()
        tpr_g = r["pos_le"].sum(0) / n_pos_all if float(n_pos_all) > 0 else torch.zeros_like(u[0])
        ref = utility(tpr_g, 1.0 - r["neg_le_global"] / r["n_neg_global"], beta)
    else:
        ref = u.mean(0)
    return valid, tpr, tnr, u, ref


def _details(r, valid, tpr, tnr, u, ref, value_opis):
    return {
        "opis": value_opis,
        "calibration_range": tuple(float(v) for v in r["calibration_range"]),
        "thresholds": r["thresholds"].cpu().numpy(),
        "classes": r["uniq"][valid].cpu().numpy(),
        "class_sizes": r["sizes"][valid].cpu().numpy(),
        "n_excluded_classes": int((~valid).sum()),
        "tpr": tpr.cpu().numpy(), "tnr": tnr.cpu().numpy(),
        "utility": u.cpu().numpy(), "reference_utility": ref.cpu().numpy(),
        "mean_utility": u.mean(1).cpu().numpy(),
    }


def opis(embeddings, labels, far_range: Sequence[float] = (1e-2, 1e-1), n_thresholds: int = 101,
         distance: str = "cosine", min_class_size: int = 2, beta: float = 1.0, reference: str = "class_mean",
         chunk_size: int | None = None, return_details: bool = False):
    """Exact OPIS (operating-point-inconsistency score) over all pairs; see the module docstring.

    Lower is more consistent; classes with identical utility curves give 0. Raises ``NonFiniteError`` for NaN/inf
    embeddings and ``ValueError`` when there are fewer than 2 classes or no class with ``min_class_size`` samples.
    With ``return_details`` returns a dict with ``opis``, ``calibration_range``, ``thresholds``, ``classes`` (the
    label values kept), ``tpr``/``tnr``/``utility`` [classes, thresholds], ``reference_utility``, ``mean_utility``.
    """
    _check_options(far_range, n_thresholds, distance, min_class_size, reference)
    r = _exact_rates(embeddings, labels, far_range, n_thresholds, distance, chunk_size)
    valid, tpr, tnr, u, ref = _scores_from_rates(r, min_class_size, beta, reference)
    value = opis_from_utilities(u, ref)
    return _details(r, valid, tpr, tnr, u, ref, value) if return_details else value


def epsilon_opis(embeddings, labels, epsilon: float = 0.1, far_range: Sequence[float] = (1e-2, 1e-1),
                 n_thresholds: int = 101, distance: str = "cosine", min_class_size: int = 2, beta: float = 1.0,
                 rank_by: str = "mean_utility", compare_to: str = "rest", statistic: str = "difference",
                 chunk_size: int | None = None, return_details: bool = False):
    """Exact epsilon-OPIS (the paper's "10%-OPIS" for epsilon = 0.1); see the module docstring for the definition
    and its options. Needs at least 2 classes with ``min_class_size`` samples. With ``return_details`` returns the
    :func:`opis` details plus ``epsilon_opis`` and ``worst_classes`` (label values, for ``rank_by="mean_utility"``).
    """
    _check_options(far_range, n_thresholds, distance, min_class_size, "class_mean")
    r = _exact_rates(embeddings, labels, far_range, n_thresholds, distance, chunk_size)
    valid, tpr, tnr, u, ref = _scores_from_rates(r, min_class_size, beta, "class_mean")
    value = epsilon_opis_from_utilities(u, epsilon, rank_by, compare_to, statistic)
    if not return_details:
        return value
    out = _details(r, valid, tpr, tnr, u, ref, opis_from_utilities(u, ref))
    out["epsilon_opis"] = value
    m = _n_worst(u.shape[0], epsilon)
    out["worst_classes"] = out["classes"][np.argsort(out["mean_utility"], kind="stable")[:m]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# histogram version (used by the streaming evaluator)
# ----------------------------------------------------------------------------------------------------------------
def _cum(h: torch.Tensor) -> torch.Tensor:
    """Counts at the bin edges: ``C[..., b] = sum_{b' < b} h[..., b']`` ([..., B+1])."""
    return torch.nn.functional.pad(h.cumsum(-1), (1, 0))


def _interp_cum(cum: torch.Tensor, h: torch.Tensor, t: torch.Tensor, w: float) -> torch.Tensor:
    """Cumulative count at distances ``t`` [K], linear inside a bin: ``C[b] + (t/w - b) h[b]``; [..., K]."""
    n_bins = h.shape[-1]
    pos = (t / w).clamp(0, n_bins)
    b = pos.floor().long().clamp(max=n_bins - 1)
    frac = (pos - b).clamp(0, 1)
    return cum[..., b] + frac * h[..., b]


def _hist_quantile(cum: torch.Tensor, h: torch.Tensor, q: float, w: float) -> float:
    """Distance at which the piecewise-linear CDF of a histogram reaches q."""
    total = float(cum[-1])
    target = q * total
    b = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype, device=cum.device))[0])
    b = min(max(b, 1), h.numel())
    hb = float(h[b - 1])
    frac = 0.0 if hb <= 0 else (target - float(cum[b - 1])) / hb
    return (b - 1 + min(max(frac, 0.0), 1.0)) * w


def _order_stat_bin(cum: torch.Tensor, k: float) -> int:
    """Index of the bin that holds the k-th smallest value (1-based)."""
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype, device=cum.device))[0]) - 1
    return min(max(b, 0), cum.numel() - 2)


def opis_from_histograms(pos_hist, neg_hist, class_sizes, far_range: Sequence[float] = (1e-2, 1e-1),
                         n_thresholds: int = 101, min_class_size: int = 2, beta: float = 1.0,
                         reference: str = "class_mean", epsilon: float | None = 0.1,
                         rank_by: str = "mean_utility", compare_to: str = "rest", statistic: str = "difference",
                         max_distance: float = 2.0, slack_bins: int = 1) -> dict:
    r"""OPIS (and epsilon-OPIS) from per-class distance histograms, with a rigorous error bound.

    Inputs: ``pos_hist[c, b]`` = number of unordered positive pairs of class c whose distance falls in bin b,
    ``neg_hist[c, b]`` = number of negative pairs with exactly one end in class c in bin b (so every negative pair
    is in two rows), ``class_sizes[c]``; B equal bins on ``[0, max_distance]`` (width ``w = max_distance / B``;
    bin b holds ``b w <= d < (b+1) w``). The global negative histogram is ``neg_hist.sum(0) / 2``.

    Approximation: counts between bin edges are interpolated linearly (uniform density inside a bin); the
    calibration range comes from the piecewise-linear global negative CDF.

    Error bound (``opis_error_bound``). Exact and approximate values both lie in intervals computed from the
    histograms: (1) the exact ``q``-quantile of the M negative distances lies between the order statistics
    ``m-1`` and ``m+1`` (``m = ceil(qM)``), hence between the lower edge of the bin of the former and the upper
    edge of the bin of the latter; the approximate quantile lies in the bin of the m-th, inside the same interval;
    (2) so each threshold ``t_k`` (a convex combination of the two range ends) and its approximation lie in an
    interval ``[t_lo, t_hi]``, widened by ``slack_bins`` bins on both sides to absorb the rounding of distances in
    the compute dtype (valid while that rounding is below one bin width); (3) cumulative counts are monotone, so
    both the exact and the approximate ``TPR_i`` lie between the counts at the two bin edges enclosing that
    interval, likewise ``TNR_i``, i.e. each moves by at most the pair mass of class i in those few bins;
    (4) U is increasing in TPR and TNR, so both utilities lie in ``[U(lo, lo), U(hi, hi)]``, of width ``e_ik``;
    (5) with ``D = U - Ubar``, ``|D - D'| <= e_ik + r_k`` (``r_k`` = mean of ``e_ik``, or the global utility's
    width for ``reference="global"``) and ``|D^2 - D'^2| <= |D - D'| (2|D'| + |D - D'|)``; averaging gives
    ``|OPIS - OPIS'| <= mean_{i,k} (e_ik + r_k)(2|D'_ik| + e_ik + r_k)``. The bound shrinks with the bin width
    (for continuous distance distributions, linearly). ``epsilon_opis_error_bound`` bounds epsilon-OPIS the same way
    (order-statistic sums are monotone in the utilities, whatever the class ranking; ``statistic="difference"`` only,
    else None).

    Returns a dict: ``opis``, ``opis_error_bound``, ``epsilon_opis`` and ``epsilon_opis_error_bound`` (unless
    ``epsilon`` is None),
    ``calibration_range``, ``thresholds``, ``utility`` [kept classes, thresholds], ``kept_classes`` (row indices).
    """
    _check_options(far_range, n_thresholds, "cosine", min_class_size, reference)
    pos = torch.as_tensor(pos_hist).to(torch.float64)
    neg = torch.as_tensor(neg_hist).to(torch.float64)
    sizes = torch.as_tensor(class_sizes).to(torch.int64).to(pos.device)
    neg = neg.to(pos.device)
    if pos.ndim != 2 or neg.shape != pos.shape or sizes.shape != pos.shape[:1]:
        raise ValueError("pos_hist and neg_hist must be [classes, bins] and class_sizes [classes]")
    n_cls, n_bins = pos.shape
    if n_cls < 2:
        raise ValueError("OPIS needs at least 2 classes (negative pairs)")
    w = float(max_distance) / n_bins
    n = int(sizes.sum())
    n_pos = (sizes * (sizes - 1) // 2).double()
    n_neg = (sizes * (n - sizes)).double()
    gneg = neg.sum(0) / 2
    gcum = _cum(gneg)
    m_total = float(gcum[-1])
    if m_total <= 0:
        raise ValueError("no negative pairs in the histograms")
    d_lo, d_hi = (_hist_quantile(gcum, gneg, q, w) for q in far_range)
    k = int(n_thresholds)
    lam = torch.linspace(0.0, 1.0, k, dtype=torch.float64, device=pos.device)
    thresholds = (1 - lam) * d_lo + lam * d_hi
    pcum, ncum = _cum(pos), _cum(neg)

    # approximate rates and utilities
    valid = sizes >= int(min_class_size)
    if not bool(valid.any()):
        raise ValueError(f"no class has at least min_class_size={min_class_size} samples")
    vp, vn = n_pos[valid, None], n_neg[valid, None]
    tpr = _interp_cum(pcum[valid], pos[valid], thresholds, w) / vp
    tnr = 1.0 - _interp_cum(ncum[valid], neg[valid], thresholds, w) / vn
    u = utility(tpr, tnr, beta)
    gpos = pos.sum(0)
    gpcum = _cum(gpos)
    n_pos_all = float(n_pos.sum())

    def global_u(tp_counts, fa_counts):
        tp = tp_counts / n_pos_all if n_pos_all > 0 else torch.zeros_like(tp_counts)
        return utility(tp, 1.0 - fa_counts / m_total, beta)

    ref = u.mean(0) if reference == "class_mean" else global_u(_interp_cum(gpcum, gpos, thresholds, w),
                                                               _interp_cum(gcum, gneg, thresholds, w))
    value = opis_from_utilities(u, ref)

    # error bound (see docstring)
    def q_interval(q):
        m = math.ceil(q * m_total - 1e-9)
        b_lo = _order_stat_bin(gcum, max(m - 1, 1))
        b_hi = _order_stat_bin(gcum, min(m + 1, m_total))
        return b_lo * w, (b_hi + 1) * w

    (a_lo, a_hi), (b_lo, b_hi) = q_interval(far_range[0]), q_interval(far_range[1])
    t_lo = (1 - lam) * a_lo + lam * b_lo
    t_hi = (1 - lam) * a_hi + lam * b_hi
    e_lo = (torch.floor(t_lo / w + 1e-9).long() - slack_bins).clamp(0, n_bins)
    e_hi = (torch.ceil(t_hi / w - 1e-9).long() + slack_bins).clamp(0, n_bins)
    u_lo = utility(pcum[valid][:, e_lo] / vp, 1.0 - ncum[valid][:, e_hi] / vn, beta)
    u_hi = utility(pcum[valid][:, e_hi] / vp, 1.0 - ncum[valid][:, e_lo] / vn, beta)
    e = u_hi - u_lo
    if reference == "class_mean":
        r = e.mean(0)
    else:
        r = global_u(gpcum[e_hi], gcum[e_lo]) - global_u(gpcum[e_lo], gcum[e_hi])
    dev = (u - ref[None, :]).abs()
    bound = float(((e + r) * (2 * dev + e + r)).mean())

    out = {
        "opis": value,
        "opis_error_bound": bound,
        "calibration_range": (d_lo, d_hi),
        "thresholds": thresholds.cpu().numpy(),
        "utility": u.cpu().numpy(),
        "kept_classes": torch.nonzero(valid).flatten().cpu().numpy(),
        "bin_width": w,
    }
    if epsilon is not None:
        out["epsilon_opis"] = (epsilon_opis_from_utilities(u, epsilon, rank_by, compare_to, statistic)
                               if u.shape[0] >= 2 else float("nan"))
        out["epsilon_opis_error_bound"] = (
            _eps_bound(u, u_lo, u_hi, out["epsilon_opis"], epsilon, rank_by, compare_to)
            if u.shape[0] >= 2 and statistic == "difference" else None)
    return out


def _eps_bound(u, u_lo, u_hi, value, epsilon, rank_by, compare_to) -> float:
    """Bound on |epsilon-OPIS_hist - epsilon-OPIS_exact| for ``statistic="difference"``.

    With W the m worst classes, the gap "mean of the rest (or of all) minus mean of W" is a difference of two
    order-statistic sums -- the sum of the C - m largest (or of all) values and the sum of the m smallest -- and each
    is monotone in every class's utility, whichever classes end up in W. ``rank_by="mean_utility"`` ranks by the mean
    over thresholds (the statistic is then the gap of those means); ``"per_threshold"`` ranks at every threshold (the
    gap is averaged). The exact and the approximate utilities both lie in ``[u_lo, u_hi]`` (see
    :func:`opis_from_histograms`), so both statistics lie in ``[G(lo, hi), G(hi, lo)]`` with
    ``G(a, b) = top(a) - bottom(b)``: the bound is the larger distance from the approximate value to its ends.
    """
    n_cls = u.shape[0]
    m = _n_worst(n_cls, epsilon)
    lo, hi = (u_lo.mean(1, keepdim=True), u_hi.mean(1, keepdim=True)) if rank_by == "mean_utility" else (u_lo, u_hi)

    def gap(a, b):  # lower end: a = lo (upper part), b = hi (worst part); upper end: the other way round
        top = torch.sort(a, dim=0).values[m:].mean(0) if compare_to == "rest" else a.mean(0)
        bottom = torch.sort(b, dim=0).values[:m].mean(0)
        return float((top - bottom).mean())

    g_lo, g_hi = gap(lo, hi), gap(hi, lo)
    return float(max(abs(value - g_lo), abs(g_hi - value)))
