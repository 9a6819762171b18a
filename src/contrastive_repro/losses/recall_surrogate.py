"""Recall@k surrogate loss (Patel, Tolias, Matas, "Recall@k Surrogate Loss with Large Batches and Similarity
Mixup", CVPR 2022, arXiv 2108.11179)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .smooth_ap import retrieval_masks, smoothed_positive_ranks
from .tcm import cosine_similarity_matrix

__all__ = ["RecallAtKSurrogateLoss"]


class RecallAtKSurrogateLoss(nn.Module):
    r"""Recall@k surrogate (Patel et al., CVPR 2022, section 3 of the paper; equation numbers not verified here).

    Every sample of the batch is a query ``q`` against the rest of the batch :math:`\Omega_q` (``include_query``
    below), with positives :math:`P_q` (same label) and cosine similarities :math:`s` (embeddings L2-normalized
    inside). Exactly what is computed:

    .. math::

        \tilde r(q, x) = 1 + \sum_{z \in \Omega_q, z \ne x} \sigma\!\left(\frac{s_{qz} - s_{qx}}{\tau_2}\right),
        \qquad
        \tilde R^k(q) = \frac{\min\!\big(k, \sum_{x \in P_q} \sigma\big((k - \tilde r(q, x)) / \tau_1^{(k)}\big)\big)}
                             {\min(k, |P_q|)},

    .. math::

        L = 1 - \frac{1}{|Q|} \sum_{q \in Q} \frac{1}{|K|} \sum_{k \in K} \tilde R^k(q),

    i.e. the paper's :math:`R^k_\Omega(q) = \sum_{x \in P_q} H(k - r(q, x)) / \min(k, |P_q|)` with the rank
    :math:`r(q, x) = 1 + \sum_{z \in \Omega, z \ne x} H(s_{qz} - s_{qx})` smoothed with :math:`\tau_2` and the outer
    Heaviside smoothed with :math:`\tau_1`. :math:`Q` = queries with at least one positive (loss 0 with zero
    gradient if none). The numerator is clipped at ``k`` (``clip_numerator=True``), as in the authors' code: the exact
    count of positives ranked within the top k can never exceed k, but its smooth version can. As in the paper,
    :math:`\sigma(0) = 1/2`: a positive at (smooth) rank exactly k counts one half, so even a perfect ranking scores
    below 1 at k = 1 (``tau1 = 1``: R^1 = 1/2); only the gradient matters for training.

    Parameters: ``ks`` = :math:`K` (default ``(1, 2, 4, 8, 16)``); ``tau2`` = rank temperature (0.01);
    ``tau1`` = outer temperature -- a float used for every k (default 1.0), a sequence (one per k), or the string
    ``"k"`` for :math:`\tau_1^{(k)} = k`, which is the default of the authors' public code (``k_temperatures``).
    ``include_query=False`` follows the paper (the query is not in :math:`\Omega_q`); the authors' code ranks
    against the whole batch including the query itself (``include_query=True``: the query is in :math:`\Omega_q`
    but not in :math:`P_q`, pushing every rank up by about 1).

    Not implemented: similarity mixup (SiMix) and the paper's multi-stage large-batch computation (the batch is
    scored in one pass; ``max_chunk_elements`` only bounds the peak memory of the ``B x P x B`` sigmoid tensor).
    """

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8, 16), tau1: float | Sequence[float] | str = 1.0,
                 tau2: float = 0.01, include_query: bool = False, clip_numerator: bool = True,
                 max_chunk_elements: int = 2 ** 24):
        super().__init__()
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        if isinstance(tau1, str):
            if tau1 != "k":
                raise ValueError(f"tau1 must be a float, a sequence of floats or 'k', got {tau1!r}")
            tau1s = tuple(float(k) for k in ks)
        elif isinstance(tau1, (int, float)):
            tau1s = (float(tau1),) * len(ks)
        else:
            tau1s = tuple(float(t) for t in tau1)
            if len(tau1s) != len(ks):
                raise ValueError(f"got {len(tau1s)} tau1 values for {len(ks)} ks")
        if min(tau1s) <= 0 or tau2 <= 0:
            raise ValueError("temperatures must be > 0")
        self.ks = ks
        self.tau1 = tau1s
        self.tau2 = float(tau2)
        self.include_query = bool(include_query)
        self.clip_numerator = bool(clip_numerator)
        self.max_chunk_elements = int(max_chunk_elements)

    def extra_repr(self) -> str:
        return (f"ks={self.ks}, tau1={self.tau1}, tau2={self.tau2}, include_query={self.include_query}, "
                f"clip_numerator={self.clip_numerator}")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or labels.reshape(-1).numel() != embeddings.shape[0]:
            raise ValueError(f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
                             f"and {tuple(labels.shape)}")
        sims = cosine_similarity_matrix(embeddings)
        pos, omega = retrieval_masks(labels.to(sims.device), include_query=self.include_query)
        if self.include_query:  # the query is ranked against but is not its own positive
            pos = pos & ~torch.eye(pos.shape[0], dtype=torch.bool, device=pos.device)
        out = smoothed_positive_ranks(sims, pos, omega[:, :, None], self.tau2, self.max_chunk_elements)
        if out is None:
            return sims.sum() * 0.0
        ranks, valid, n_pos = out
        rank = ranks[..., 0]                                               # (B, P)
        k = torch.tensor(self.ks, dtype=rank.dtype, device=rank.device)    # (K,)
        tau1 = torch.tensor(self.tau1, dtype=rank.dtype, device=rank.device)
        hits = torch.sigmoid((k - rank[..., None]) / tau1)                 # (B, P, K)
        hits = torch.where(valid[..., None], hits, hits.new_zeros(()))
        num = hits.sum(1)                                                  # (B, K)
        if self.clip_numerator:
            num = torch.minimum(num, k)
        den = torch.minimum(k, n_pos[:, None].to(rank.dtype))
        has_pos = n_pos > 0
        recall = num[has_pos] / den[has_pos]
        return 1.0 - recall.mean()
