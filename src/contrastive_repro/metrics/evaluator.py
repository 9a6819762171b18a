r"""One chunked pass over the similarity matrix for Recall@k, MAP@R, OPIS and epsilon-OPIS.

:class:`StreamingRetrievalEvaluator` (and the function :func:`evaluate_retrieval`) evaluates a labelled embedding
set against itself (leave-one-out retrieval, the CUB/Cars/SOP/iNaturalist protocol) without ever holding the N x N
similarity matrix. Memory is O(N d) for the embeddings, O(chunk x N) for one block of similarities and
O(classes x bins) for the histograms.

Algorithm
---------
1. Embeddings are L2-normalized (in float32, or float64 for float64 input; bf16/fp16 are upcast) and sorted by
   label, so each class is a contiguous run of columns and each chunk of query rows is a few runs of rows. They are
   stored as ``sqrt(B/2) [x/|x|, 1]`` (one extra constant column), so that the matmul directly yields
   ``(B/2)(1 + cos) = B - d/w``: the similarity on the bin scale (B bins of width ``w = 2/B`` on the cosine
   distance ``d = 1 - cos`` in [0, 2]). Ranking by it is ranking by cosine similarity.
2. For each chunk of ``chunk_size`` query rows: ``S = Q_chunk @ G^T`` (one matmul into a reused buffer), then

   * the strict upper triangle of each (class rows x class columns) block is binned into the class's
     positive-pair histogram: every unordered positive pair exactly once;
   * the query's own column is set to -inf and one ``torch.topk`` takes ``max(max(ks), largest R in the chunk)``
     neighbours, from which Recall@k and AP@R are exact (ties aside; R = class size - 1). A chunk that holds a very
     large class pays for a large topk (O(chunk x R) memory);
   * the (class rows x class columns) blocks, which hold the positives and the query itself, are set to a discard
     index, the chunk is cast to int32 (truncation = the bin index) into a reused buffer, and ``torch.bincount``
     adds to the classes' negative-pair histograms (one call per class run of rows, or, when a chunk holds more than
     four runs, one call on (run, bin) indices). A negative pair {a, b} is
     thus counted once in the row of a (for a's class) and once in the row of b (for b's class): exactly the
     per-class negative counts OPIS needs, and twice the global negative histogram. The pair is binned from
     ``S[a, b]`` for one class and ``S[b, a]`` for the other; the two may differ in the last bit, which the error
     bound's slack bin absorbs.
3. OPIS / epsilon-OPIS come from the histograms (:func:`~contrastive_repro.metrics.opis.opis_from_histograms`),
   with a rigorous bound on ``|OPIS_hist - OPIS_exact|`` returned as ``opis_error_bound``.

Cost per chunk beyond the matmul: one topk, one cast to int32 and one bincount over the chunk (all in preallocated
buffers), plus work on the class blocks (O(chunk x largest class)).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch

from ..utils import check_finite
from ._common import as_tensor, check_ks, dense_labels, int_labels
from .opis import _check_options, epsilon_opis_from_utilities, opis_from_histograms
from .retrieval import _ap_at_r

__all__ = ["StreamingRetrievalEvaluator", "evaluate_retrieval", "auto_bins"]

#: automatic histogram resolution: the default 2000 bins above AUTO_BINS_MAX_N items (keeps the N = 100k speed);
#: below, as many bins as AUTO_BINS_BYTES of int64 histograms allow (16 bytes x classes x bins), at most AUTO_BINS_MAX
AUTO_BINS_DEFAULT, AUTO_BINS_MAX, AUTO_BINS_MAX_N, AUTO_BINS_BYTES = 2000, 32768, 20000, 64 << 20


def auto_bins(n_items: int, n_classes: int) -> int:
    """Bins used when ``n_bins=None``: finer histograms (a tighter OPIS bound, which shrinks with the bin width)
    where they are cheap -- up to ``AUTO_BINS_MAX_N`` items and ``AUTO_BINS_BYTES`` of histograms -- else 2000."""
    if n_items > AUTO_BINS_MAX_N:
        return AUTO_BINS_DEFAULT
    fit = AUTO_BINS_BYTES // (16 * max(1, int(n_classes)))
    return int(min(AUTO_BINS_MAX, max(AUTO_BINS_DEFAULT, fit)))


class StreamingRetrievalEvaluator:
    """Accumulate embeddings with :meth:`update`, then :meth:`compute` Recall@k, MAP@R, OPIS and epsilon-OPIS in one
    chunked pass (see the module docstring).

    Args:
        ks: the k of Recall@k.
        n_bins: number of equal cosine-distance bins on [0, 2] for the OPIS histograms (bin width ``2 / n_bins``).
            The histograms take ``16 x classes x n_bins`` bytes (int64, positive + negative). None (default):
            :func:`auto_bins` -- 2000 above 20,000 items, up to 32,768 below (64 MiB of histograms at most).
        chunk_size: query rows per block; default: about 2^24 similarities per block (64 MiB in float32).
        compute_opis / compute_map_at_r: skip the histograms / the MAP@R topk when False.
        epsilon: for epsilon-OPIS (None: skip it).
        far_range, n_thresholds, min_class_size, beta, reference, rank_by, compare_to, statistic: OPIS options, as
            in :func:`contrastive_repro.metrics.opis`.
        device: where to compute (default: the device of the first embeddings given to :meth:`update`).
        compute_dtype: float32 (default; float64 for float64 input) or float64.
        exclude_lone_queries: leave queries without a same-label item out of Recall@k (PML's convention).

    Only the leave-one-out protocol (query set = gallery set) is supported. Lone queries are always left out of
    MAP@R. Queries' order does not matter.
    """

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8), n_bins: int | None = None, chunk_size: int | None = None,
                 compute_opis: bool = True, epsilon: float | None = 0.1, compute_map_at_r: bool = True,
                 far_range: Sequence[float] = (1e-2, 1e-1), n_thresholds: int = 101, min_class_size: int = 2,
                 beta: float = 1.0, reference: str = "class_mean", rank_by: str = "mean_utility",
                 compare_to: str = "rest", statistic: str = "difference", device: torch.device | str | None = None,
                 compute_dtype: torch.dtype | None = None, exclude_lone_queries: bool = True):
        self.ks = check_ks(ks)
        if n_bins is not None and int(n_bins) < 2:
            raise ValueError(f"n_bins must be >= 2 (or None: automatic), got {n_bins!r}")
        self.n_bins = None if n_bins is None else int(n_bins)
        self.chunk_size = chunk_size
        self.compute_opis = compute_opis
        self.compute_map_at_r = compute_map_at_r
        self.opis_kwargs = dict(far_range=tuple(far_range), n_thresholds=n_thresholds, min_class_size=min_class_size,
                                beta=beta, reference=reference, epsilon=epsilon, rank_by=rank_by,
                                compare_to=compare_to, statistic=statistic)
        # fail now rather than after the pass
        _check_options(far_range, n_thresholds, "cosine", min_class_size, reference)
        if epsilon is not None:
            epsilon_opis_from_utilities(torch.zeros(2, 1), epsilon, rank_by, compare_to, statistic)
        if beta <= 0:
            raise ValueError("beta must be > 0")
        self.device = torch.device(device) if device is not None else None
        self.compute_dtype = compute_dtype
        self.exclude_lone_queries = exclude_lone_queries
        self.reset()

    # ------------------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._emb: list[torch.Tensor] = []
        self._lab: list[torch.Tensor] = []
        self.histograms: dict | None = None

    def update(self, embeddings, labels) -> None:
        """Add a batch (any device / float dtype; stored detached in its dtype, on the compute device)."""
        e = as_tensor(embeddings, "embeddings")
        if e.ndim != 2 or not e.is_floating_point():
            raise ValueError(f"embeddings must be a 2-D floating tensor, got {tuple(e.shape)} {e.dtype}")
        check_finite(e, "embeddings")
        if self.device is None:
            self.device = e.device
        if self._emb and e.shape[1] != self._emb[0].shape[1]:
            raise ValueError("embedding size changed between updates")
        self._emb.append(e.to(self.device))
        self._lab.append(int_labels(labels, e.shape[0], "labels", device=self.device))

    # ------------------------------------------------------------------------------------------------------------
    def compute(self) -> dict:
        """Returns ``{"R@k": ..., "MAP@R": ..., "OPIS": ..., "eps_OPIS": ..., "opis_error_bound": ..., ...}``.

        Fractions in [0, 1]. Where OPIS is undefined (fewer than 2 classes, or no class of ``min_class_size``), the
        OPIS entries are None (with a warning) and the retrieval metrics are still returned; ``eps_OPIS`` is None
        with fewer than 2 classes of ``min_class_size``.

        Extra keys: ``n_queries`` (queries counted in Recall@k), ``n_classes``, ``calibration_range``,
        ``epsilon``, ``eps_OPIS_error_bound`` (a bound on |eps_OPIS - exact|), ``n_bins``. The histograms stay
        available as ``self.histograms`` (``pos``, ``neg`` [classes, bins],
        ``class_sizes``, ``classes``).
        """
        if not self._emb:
            raise ValueError("no embeddings: call update() first")
        emb = self._emb[0] if len(self._emb) == 1 else torch.cat(self._emb)
        lab = self._lab[0] if len(self._lab) == 1 else torch.cat(self._lab)
        return self._run(emb, lab)

    def _run(self, emb: torch.Tensor, lab: torch.Tensor) -> dict:
        dev = self.device
        dtype = self.compute_dtype or (torch.float64 if emb.dtype == torch.float64 else torch.float32)
        n, dim = emb.shape
        if n < 2:
            raise ValueError("need at least 2 embeddings")
        uniq, dense = dense_labels(lab)
        nb = self.n_bins or auto_bins(n, int(uniq.numel()))
        half = nb / 2.0
        order = torch.argsort(dense, stable=True)
        dense = dense[order]
        # ga = sqrt(nb/2) [x / |x|, 1] (rows sorted by label): ga_i . ga_j = (nb/2)(1 + cos_ij) = nb - d_ij / w, the
        # similarity already on the bin scale, so the binning below needs no affine pass over the chunk.
        ga = torch.empty(n, dim + 1, dtype=dtype, device=dev)
        root = math.sqrt(half)
        for a in range(0, n, 8192):
            blk = ga[a:a + 8192, :dim]
            blk.copy_(emb[order[a:a + 8192]])
            blk.mul_(root / blk.norm(dim=1, keepdim=True).clamp_(min=1e-12))
        ga[:, dim] = root
        n_cls = uniq.numel()
        sizes = torch.bincount(dense, minlength=n_cls)
        starts = torch.cumsum(sizes, 0) - sizes
        sizes_l, starts_l, dense_l = sizes.tolist(), starts.tolist(), dense.tolist()
        r_all = (sizes - 1)[dense]  # R of every query (same-label items other than itself)

        chunk = int(self.chunk_size or max(1, min(n, (1 << 24) // n)))
        ks = self.ks
        kmax_recall = min(max(ks), n - 1)
        want_opis = self.compute_opis
        # histograms on the similarity-bin scale: index floor(nb - d/w) = nb - 1 - (distance bin), flipped at the end
        pos_hist = torch.zeros(n_cls, nb, dtype=torch.int64, device=dev) if want_opis else None
        neg_hist = torch.zeros(n_cls, nb + 2, dtype=torch.int64, device=dev) if want_opis else None
        hits = torch.zeros(len(ks), dtype=torch.int64, device=dev)
        ap_sum = torch.zeros((), dtype=torch.float64, device=dev)

        pending: list[torch.Tensor] = []  # topk indices of consecutive chunks, not yet scored
        pending_rows = pending_elems = 0

        def flush(end: int) -> None:
            """Recall@k hits and AP@R of the pending rows (few large ops instead of many small ones per chunk)."""
            nonlocal pending_rows, pending_elems, ap_sum
            if not pending:
                return
            start = end - pending_rows
            kk = max(t.shape[1] for t in pending)
            idx = torch.cat([torch.nn.functional.pad(t, (0, kk - t.shape[1]), value=-1) for t in pending])
            pending.clear()
            pending_rows = pending_elems = 0
            cls = dense[start:end]
            lo = starts[cls][:, None]
            match = (idx >= lo) & (idx < lo + sizes[cls][:, None])
            r = r_all[start:end]
            valid = r > 0 if self.exclude_lone_queries else torch.ones_like(r, dtype=torch.bool)
            first = torch.where(match.any(1), match.int().argmax(1), torch.full_like(r, kk))
            for j, kq in enumerate(ks):
                hits[j] += ((first < min(kq, kmax_recall)) & valid).sum()
            if self.compute_map_at_r:
                ap_sum = ap_sum + _ap_at_r(match, r).sum()

        s_buf = torch.empty(chunk, n, dtype=dtype, device=dev)
        i_buf = torch.empty(chunk, n, dtype=torch.int32, device=dev) if want_opis else None
        row_off = torch.empty(chunk, dtype=torch.int32, device=dev)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            b = e - s
            sim = s_buf[:b]
            torch.mm(ga[s:e], ga.T, out=sim)
            # class runs of rows in this chunk: (class, local row start, local row end)
            runs = []
            r0 = 0
            while r0 < b:
                c = dense_l[s + r0]
                r1 = min(starts_l[c] + sizes_l[c], e) - s
                runs.append((c, r0, r1))
                r0 = r1
            # positives: strict upper triangle of each class block, each unordered pair once
            if want_opis:
                for c, a0, a1 in runs:
                    c0, c1 = starts_l[c], starts_l[c] + sizes_l[c]
                    upper = (torch.arange(c0, c1, device=dev)[None, :]
                             > torch.arange(s + a0, s + a1, device=dev)[:, None])
                    v = sim[a0:a1, c0:c1][upper]
                    if v.numel():
                        pos_hist[c] += torch.bincount(v.clamp_(0, nb - 0.5).to(torch.int64), minlength=nb)
            # retrieval: leave the query out, one topk for Recall@k and AP@R (bookkeeping batched in flush())
            sim[:, s:e].diagonal().fill_(float("-inf"))
            k = kmax_recall
            if self.compute_map_at_r:
                k = max(k, max(sizes_l[c] for c, _, _ in runs) - 1)
            k = min(k, n - 1)
            pending.append(sim.topk(k, dim=1).indices)
            pending_rows += b
            pending_elems += b * k
            if pending_elems >= 1 << 22:
                flush(e)
            # negatives: class blocks (positives and the query itself) go to the discard index nb + 1; the cast to
            # an integer truncates (values in (-1, 0), i.e. cos just below -1, land in 0 as they should; values in
            # [nb, nb + 1), i.e. cos >= 1 from rounding, are folded into nb - 1 below); one bincount per class run
            if want_opis:
                for c, a0, a1 in runs:
                    sim[a0:a1, starts_l[c]:starts_l[c] + sizes_l[c]] = nb + 1
                ib = i_buf[:b]
                ib.copy_(sim)
                if len(runs) <= 4:
                    for c, a0, a1 in runs:
                        neg_hist[c] += torch.bincount(ib[a0:a1].reshape(-1), minlength=nb + 2)
                else:  # many classes in the chunk: one bincount on (run, bin) indices instead of one per run
                    for j, (c, a0, a1) in enumerate(runs):
                        row_off[a0:a1] = j * (nb + 2)
                    ib.add_(row_off[:b, None])
                    cnt = torch.bincount(ib.reshape(-1), minlength=len(runs) * (nb + 2))
                    neg_hist.index_add_(0, torch.tensor([c for c, _, _ in runs], device=dev),
                                        cnt.view(len(runs), nb + 2))
        flush(n)
        del s_buf, i_buf, ga
        if want_opis:
            neg_hist[:, nb - 1] += neg_hist[:, nb]
            neg_hist = neg_hist[:, :nb].flip(1)
            pos_hist = pos_hist.flip(1)

        out: dict = {}
        n_valid = int((r_all > 0).sum()) if self.exclude_lone_queries else n
        if n_valid == 0:
            raise ValueError(f"no query has a same-label item (every class has one sample): labels hold {n_cls} "
                             f"classes for {n} samples; retrieval metrics need classes with at least 2 samples")
        for j, kk in enumerate(ks):
            out[f"R@{kk}"] = float(hits[j]) / n_valid
        if self.compute_map_at_r:
            out["MAP@R"] = float(ap_sum) / int((r_all > 0).sum())
        out["n_queries"] = n_valid
        out["n_classes"] = n_cls
        if want_opis:
            self.histograms = {"pos": pos_hist.cpu(), "neg": neg_hist.cpu(), "class_sizes": sizes.cpu(),
                               "classes": uniq.cpu(), "bin_width": 2.0 / nb}
            try:
                res = opis_from_histograms(pos_hist, neg_hist, sizes, max_distance=2.0, **self.opis_kwargs)
            except ValueError as exc:  # e.g. one class only, or no class of min_class_size: keep the retrieval
                warnings.warn(f"OPIS is undefined here ({exc}); reporting None", RuntimeWarning, stacklevel=3)
                res = None
            out["OPIS"] = res["opis"] if res else None
            out["opis_error_bound"] = res["opis_error_bound"] if res else None
            out["n_bins"] = nb
            if self.opis_kwargs["epsilon"] is not None:
                eps = res["epsilon_opis"] if res else float("nan")
                out["eps_OPIS"] = None if math.isnan(eps) else eps
                out["eps_OPIS_error_bound"] = None if out["eps_OPIS"] is None else res.get("epsilon_opis_error_bound")
                out["epsilon"] = self.opis_kwargs["epsilon"]
            out["calibration_range"] = res["calibration_range"] if res else None
        return out


def evaluate_retrieval(embeddings, labels, ks: Sequence[int] = (1, 2, 4, 8), **kwargs) -> dict:
    """Recall@k, MAP@R, OPIS and epsilon-OPIS of ``embeddings`` (leave-one-out) in one chunked pass.

    Keyword arguments are those of :class:`StreamingRetrievalEvaluator`; see its :meth:`compute` for the keys.
    """
    ev = StreamingRetrievalEvaluator(ks=ks, **kwargs)
    ev.update(embeddings, labels)
    return ev.compute()
