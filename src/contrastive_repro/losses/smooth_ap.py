"""Smooth-AP (Brown, Xie, Kalogeiton, Zisserman, ECCV 2020) and the smoothed-rank machinery it shares with the
Recall@k surrogate (``recall_surrogate.py``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .tcm import cosine_similarity_matrix

__all__ = ["SmoothAPLoss", "smoothed_positive_ranks", "retrieval_masks"]


def retrieval_masks(labels: torch.Tensor, include_query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positives, retrieval_set)`` boolean ``(B, B)`` masks for "each sample queries the rest of the batch".

    ``include_query=False`` (the papers' definition): the query is neither in its retrieval set nor a positive.
    ``include_query=True`` (the Smooth-AP authors' code and pytorch-metric-learning): the query is retrieved too,
    as a positive of itself.
    """
    labels = labels.reshape(-1)
    n = labels.numel()
    pos = labels[:, None] == labels[None, :]
    omega = torch.ones(n, n, dtype=torch.bool, device=labels.device)
    if not include_query:
        eye = torch.eye(n, dtype=torch.bool, device=labels.device)
        pos = pos & ~eye
        omega = omega & ~eye
    return pos, omega


def _rank_chunk(sims: torch.Tensor, sims_pos: torch.Tensor, counted: torch.Tensor, inv_temp: float) -> torch.Tensor:
    # d[q, p, j] = s_qj - s_qp  (c, P, R); sum_j sigmoid(d / tau) * counted[q, j, m]  -> (c, P, M)
    d = sims[:, None, :] - sims_pos[:, :, None]
    return torch.bmm(torch.sigmoid(d * inv_temp), counted)


def smoothed_positive_ranks(sims: torch.Tensor, pos: torch.Tensor, counted: torch.Tensor, temperature: float,
                            max_chunk_elements: int = 2 ** 24):
    r"""Smoothed ranks of each query's positives among several "counted" sets.

    For query ``q`` (a row of ``sims``), each positive ``p`` of ``q`` (``pos[q, p]``) and each counted set
    ``C_m`` (``counted[q, :, m]``, a 0/1 mask that contains the positives):

    .. math:: r_m(q, p) = 1 + \sum_{j \in C_m(q), j \ne p} \sigma\big((s_{qj} - s_{qp}) / \tau\big).

    Only the positives are ranked (gathered and padded to ``P = max_q |P_q|``), so the work is
    ``B x P x R`` rather than ``B x B x B``. If that exceeds ``max_chunk_elements`` the queries are processed in
    chunks under activation checkpointing, so the ``c x P x R`` sigmoid tensor is recomputed in the backward pass
    instead of stored: peak memory is one chunk.

    Returns ``(ranks (B, P, M), valid (B, P) bool, n_pos (B,))`` or ``None`` when no query has a positive.
    The ``j = p`` term is removed by subtracting ``sigma(0) = 1/2`` (its argument is exactly 0 and its gradient
    exactly cancels).
    """
    n_pos = pos.sum(1)
    p_max = int(n_pos.max()) if n_pos.numel() else 0
    if p_max == 0:
        return None
    idx = pos.to(sims.dtype).topk(p_max, dim=1).indices  # positives first; padding points at non-positives
    valid = torch.arange(p_max, device=sims.device)[None, :] < n_pos[:, None]
    sims_pos = sims.gather(1, idx)
    counted = counted.to(sims.dtype)
    self_term = 0.5 * counted.gather(1, idx[:, :, None].expand(-1, -1, counted.shape[2]))
    inv_temp = 1.0 / float(temperature)
    b, r = sims.shape
    rows = max(1, int(max_chunk_elements) // max(1, p_max * r))
    if rows >= b:
        sums = _rank_chunk(sims, sims_pos, counted, inv_temp)
    else:
        parts = []
        for start in range(0, b, rows):
            sl = slice(start, start + rows)
            if torch.is_grad_enabled() and sims.requires_grad:
                parts.append(checkpoint(_rank_chunk, sims[sl], sims_pos[sl], counted[sl], inv_temp,
                                        use_reentrant=False))
            else:
                parts.append(_rank_chunk(sims[sl], sims_pos[sl], counted[sl], inv_temp))
        sums = torch.cat(parts, 0)
    return 1.0 + sums - self_term, valid, n_pos


class SmoothAPLoss(nn.Module):
    r"""Smooth-AP loss (Brown et al., "Smooth-AP: Smoothing the Path Towards Large-Scale Image Retrieval",
    ECCV 2020, section 3 of the paper: AP written with ranks, the ranking indicator replaced by a sigmoid;
    equation numbers not verified here).

    Every sample of the batch is a query against the rest of the batch (retrieval set :math:`\Omega_q`, positives
    :math:`P_q` = same label). With cosine similarities (embeddings L2-normalized inside) and
    :math:`\mathcal{G}(x) = \sigma(x / \tau)`,

    .. math::

        \widetilde{AP}_q = \frac{1}{|P_q|} \sum_{i \in P_q}
            \frac{1 + \sum_{j \in P_q, j \ne i} \mathcal{G}(s_{qj} - s_{qi})}
                 {1 + \sum_{j \in \Omega_q, j \ne i} \mathcal{G}(s_{qj} - s_{qi})},
        \qquad L = 1 - \frac{1}{|Q|} \sum_{q \in Q} \widetilde{AP}_q,

    over the queries :math:`Q` that have at least one positive (the loss is 0, with a zero gradient, if none has).
    ``temperature`` is the paper's :math:`\tau = 0.01`.

    ``include_query=False`` (default) follows the paper: the query is not in its own retrieval set.
    ``include_query=True`` reproduces the authors' code and pytorch-metric-learning's ``SmoothAPLoss``, where the
    query is retrieved too, as a positive of itself (rank 1 with similarity 1), which inflates AP slightly.
    Differences from PML 2.9's ``SmoothAPLoss``: PML requires the same number of samples per class *and*
    contiguous class blocks, and its block size is the number of classes (``batch // (batch // n_classes)``), so
    it is only right when #classes == samples per class; it builds ``B x B x B`` tensors. Ours accepts any label
    layout (queries without positives are skipped) and only ranks the positives (``B x P x B``), chunking over
    queries with activation checkpointing past ``max_chunk_elements``.
    """

    def __init__(self, temperature: float = 0.01, include_query: bool = False, max_chunk_elements: int = 2 ** 24):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.include_query = bool(include_query)
        self.max_chunk_elements = int(max_chunk_elements)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, include_query={self.include_query}"

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or labels.reshape(-1).numel() != embeddings.shape[0]:
            raise ValueError(f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
                             f"and {tuple(labels.shape)}")
        sims = cosine_similarity_matrix(embeddings)
        pos, omega = retrieval_masks(labels.to(sims.device), self.include_query)
        counted = torch.stack([omega, pos], dim=2)
        out = smoothed_positive_ranks(sims, pos, counted, self.temperature, self.max_chunk_elements)
        if out is None:
            return sims.sum() * 0.0
        ranks, valid, n_pos = out
        ratio = torch.where(valid, ranks[..., 1] / ranks[..., 0], ranks.new_zeros(()))
        has_pos = n_pos > 0
        ap = ratio.sum(1)[has_pos] / n_pos[has_pos].to(ratio.dtype)
        return 1.0 - ap.mean()
