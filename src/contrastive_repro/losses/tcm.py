"""Threshold-consistent margin (TCM) loss and a wrapper that adds it to any base DML loss.

Zhang et al., "Threshold-Consistent Margin Loss for Open-World Deep Metric Learning", ICLR 2024
(arXiv 2307.04047). The formula below is Eq. (TCM) of the paper as restated in ``/work/shared/papers/FACTS.md``
(section C); the equation number in the paper is not verified here.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import check_finite

__all__ = ["TCMLoss", "WithTCM", "add_tcm", "cosine_similarity_matrix", "pair_masks"]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 inputs (AMP) are promoted to float32; float32 / float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cosine_similarity_matrix(embeddings: torch.Tensor, ref_embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """``S[i, j] = cos(x_i, y_j)`` with ``y = ref_embeddings`` (or ``x``), computed outside autocast in >= float32."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = F.normalize(_as_float(embeddings), dim=1)
        y = x if ref_embeddings is None else F.normalize(_as_float(ref_embeddings).to(x.dtype), dim=1)
        return x @ y.T


def pair_masks(labels: torch.Tensor, ref_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(positive, negative)`` masks of shape ``(B, R)``.

    Without ``ref_labels`` the reference set is the batch itself and the diagonal (a sample with itself) is neither
    positive nor negative. With ``ref_labels`` every (batch, reference) pair counts: the reference set is taken to be
    disjoint from the batch (e.g. a cross-batch memory).
    """
    labels = labels.reshape(-1)
    ref = labels if ref_labels is None else ref_labels.reshape(-1).to(labels.device)
    same = labels[:, None] == ref[None, :]
    neg = ~same
    if ref_labels is None:
        pos = same & ~torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    else:
        pos = same
    return pos, neg


class TCMLoss(nn.Module):
    r"""Threshold-consistent margin loss (Zhang et al., ICLR 2024, Eq. (TCM) of the paper).

    With cosine similarities :math:`s` (embeddings are L2-normalized inside), :math:`S^+` the positive pairs
    (same label, :math:`i \ne j`) and :math:`S^-` the negative pairs of the batch,

    .. math::

        L_{TCM} = \lambda^+ \frac{\sum_{s \in S^+, s \le m^+} (m^+ - s)}{|\{s \in S^+ : s \le m^+\}|}
                + \lambda^- \frac{\sum_{s \in S^-, s \ge m^-} (s - m^-)}{|\{s \in S^- : s \ge m^-\}|},

    a term whose denominator is empty being 0. Defaults :math:`m^+ = 0.9`, :math:`m^- = 0.5`,
    :math:`\lambda^\pm = 1` (paper section 5.2, as quoted by an independent implementation).

    Pair counting: pairs are *ordered* -- ``(i, j)`` and ``(j, i)`` are both counted, the diagonal is excluded --
    exactly as pytorch-metric-learning's ``ThresholdConsistentMarginLoss`` (``get_all_pairs_indices``). Since the
    similarity is symmetric every unordered pair appears exactly twice in both the numerator and the denominator, so
    the value equals the unordered-pair definition too. The computation uses masked ``B x B`` similarity matrices
    (no index lists, no host synchronisation), so it is a few matrix ops on top of the ``B x B`` Gram matrix.

    Cross-batch: ``forward(embeddings, labels, ref_embeddings, ref_labels)`` uses pairs (batch sample, reference
    sample), with no diagonal exclusion (the reference set is assumed disjoint from the batch). Note: PML 2.9's
    ``ThresholdConsistentMarginLoss`` indexes ``embeddings`` instead of ``ref_emb`` with reference indices, so its
    cross-batch result is not comparable; ours is checked against a loop reference instead.
    """

    def __init__(self, pos_margin: float = 0.9, neg_margin: float = 0.5, pos_weight: float = 1.0,
                 neg_weight: float = 1.0):
        super().__init__()
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)
        self.pos_weight = float(pos_weight)
        self.neg_weight = float(neg_weight)
        self.last_parts: dict[str, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return (f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}, pos_weight={self.pos_weight}, "
                f"neg_weight={self.neg_weight}")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_embeddings: torch.Tensor | None = None,
                ref_labels: torch.Tensor | None = None) -> torch.Tensor:
        if (ref_embeddings is None) != (ref_labels is None):
            raise ValueError("ref_embeddings and ref_labels must be given together")
        if embeddings.ndim != 2 or labels.reshape(-1).numel() != embeddings.shape[0]:
            raise ValueError(f"expected embeddings (B, D) and labels (B,), got {tuple(embeddings.shape)} "
                             f"and {tuple(labels.shape)}")
        for name, x in (("embeddings", embeddings), ("ref_embeddings", ref_embeddings)):
            if x is None:
                continue
            if not x.is_floating_point():
                raise TypeError(f"TCMLoss {name} must be floating-point, got dtype {x.dtype}")
            check_finite(x, f"TCMLoss {name}")  # NaN would drop out of both masks and give a silent number
        sims = cosine_similarity_matrix(embeddings, ref_embeddings)
        pos, neg = pair_masks(labels.to(sims.device), None if ref_labels is None else ref_labels.to(sims.device))
        hard_pos = pos & (sims <= self.pos_margin)
        hard_neg = neg & (sims >= self.neg_margin)
        zero = sims.new_zeros(())
        # where() (not a product) so that a non-finite similarity outside the mask cannot leak into the sum.
        pos_num = torch.where(hard_pos, self.pos_margin - sims, zero).sum()
        neg_num = torch.where(hard_neg, sims - self.neg_margin, zero).sum()
        # An empty set has a zero numerator with zero gradient, so clamping the count at 1 gives the "0" convention
        # without a data-dependent branch.
        pos_cnt = hard_pos.sum().clamp(min=1).to(sims.dtype)
        neg_cnt = hard_neg.sum().clamp(min=1).to(sims.dtype)
        pos_term = pos_num / pos_cnt
        neg_term = neg_num / neg_cnt
        self.last_parts = {"tcm_pos": pos_term.detach(), "tcm_neg": neg_term.detach(),
                           "tcm_hard_pos_pairs": hard_pos.sum().detach(), "tcm_hard_neg_pairs": hard_neg.sum().detach()}
        return self.pos_weight * pos_term + self.neg_weight * neg_term


class WithTCM(nn.Module):
    r"""``L = L_base(embeddings, labels) + weight * L_TCM(embeddings, labels)`` (the paper's ``L_base + L_TCM``).

    ``base_loss`` is any callable ``(embeddings, labels) -> scalar`` (our losses, or pytorch-metric-learning losses).
    If it is an ``nn.Module`` its parameters (e.g. ArcFace's class weights, Proxy-Anchor's proxies) are this module's
    parameters too, so ``optimizer = SGD(list(model.parameters()) + list(loss.parameters()))`` trains them.

    After each call ``last_parts`` holds detached tensors ``{"base", "tcm", "total"}`` plus TCM's own parts
    (``tcm_pos``, ``tcm_neg``, hard-pair counts) for logging; call ``float()`` on them when logging (that syncs).
    """

    def __init__(self, base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], tcm: TCMLoss | None = None,
                 weight: float = 1.0):
        super().__init__()
        self.base_loss = base_loss
        self.tcm = TCMLoss() if tcm is None else tcm
        self.weight = float(weight)
        self.last_parts: dict[str, torch.Tensor] = {}

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        base = self.base_loss(embeddings, labels)
        tcm = self.tcm(embeddings, labels)
        total = base + self.weight * tcm
        parts = {"base": base.detach(), "tcm": tcm.detach(), "total": total.detach()}
        parts.update(self.tcm.last_parts)
        self.last_parts = parts
        return total


def add_tcm(base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weight: float = 1.0,
            **tcm_kwargs) -> WithTCM:
    """``WithTCM(base_loss, TCMLoss(**tcm_kwargs), weight)``."""
    return WithTCM(base_loss, TCMLoss(**tcm_kwargs), weight)
