"""Base deep-metric-learning losses by name, optionally with the TCM regularizer, behind a NaN/inf guard.

``build_dml_loss("smooth_ap", tcm=True)`` returns a :class:`DMLLoss` module called as ``loss(embeddings, labels)``.
Losses with learnable parameters ("arcface": class weights, "proxy_anchor": proxies) need ``num_classes`` and
``embedding_size``, and their parameters must be given to an optimizer::

    loss = build_dml_loss("proxy_anchor", num_classes=100, embedding_size=512)
    opt = torch.optim.AdamW([{"params": model.parameters()},
                             {"params": loss.parameters(), "lr": 100 * lr}])  # Proxy-Anchor trains proxies x100

and moved with the model (``loss.to(device)``).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from ..utils import NonFiniteError, check_finite
from .recall_surrogate import RecallAtKSurrogateLoss
from .smooth_ap import SmoothAPLoss
from .tcm import TCMLoss, WithTCM

__all__ = ["DML_LOSS_NAMES", "build_dml_loss", "needs_class_balanced_batches", "has_learnable_parameters",
           "DMLLoss"]


def _pml():
    from pytorch_metric_learning import losses

    return losses


def _smooth_ap(num_classes, embedding_size, **kw):
    return SmoothAPLoss(**kw)


def _recall_at_k(num_classes, embedding_size, **kw):
    return RecallAtKSurrogateLoss(**kw)


def _require(name, num_classes, embedding_size):
    if num_classes is None or embedding_size is None:
        raise ValueError(f"{name!r} has learnable class weights: pass num_classes and embedding_size")


def _arcface(num_classes, embedding_size, **kw):
    _require("arcface", num_classes, embedding_size)
    kw.setdefault("margin", 28.6)   # degrees (= 0.5 rad), as in the ArcFace paper
    kw.setdefault("scale", 64.0)
    return _pml().ArcFaceLoss(num_classes=int(num_classes), embedding_size=int(embedding_size), **kw)


def _proxy_anchor(num_classes, embedding_size, **kw):
    _require("proxy_anchor", num_classes, embedding_size)
    kw.setdefault("margin", 0.1)
    kw.setdefault("alpha", 32.0)
    return _pml().ProxyAnchorLoss(num_classes=int(num_classes), embedding_size=int(embedding_size), **kw)


def _multi_similarity(num_classes, embedding_size, **kw):
    kw.setdefault("alpha", 2.0)
    kw.setdefault("beta", 50.0)
    kw.setdefault("base", 0.5)
    return _pml().MultiSimilarityLoss(**kw)


def _contrastive(num_classes, embedding_size, **kw):
    # PML default distance: L2 between L2-normalized embeddings (in [0, 2]); positives pulled to distance 0,
    # negatives pushed past distance 1 (cosine 0.5, TCM's default negative margin).
    kw.setdefault("pos_margin", 0.0)
    kw.setdefault("neg_margin", 1.0)
    return _pml().ContrastiveLoss(**kw)


def _supcon(num_classes, embedding_size, **kw):
    kw.setdefault("temperature", 0.1)
    return _pml().SupConLoss(**kw)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "smooth_ap": _smooth_ap,
    "recall_at_k": _recall_at_k,
    "arcface": _arcface,
    "proxy_anchor": _proxy_anchor,
    "multi_similarity": _multi_similarity,
    "contrastive": _contrastive,
    "supcon": _supcon,
}
DML_LOSS_NAMES: tuple[str, ...] = tuple(_BUILDERS)
# Pair/ranking losses see no positive pair unless the batch holds >= 2 samples of a class (use an m-per-class
# sampler); proxy/classifier losses (arcface, proxy_anchor) compare samples with learned class weights instead.
_CLASS_BALANCED = frozenset({"smooth_ap", "recall_at_k", "contrastive", "multi_similarity", "supcon"})
_LEARNABLE = frozenset({"arcface", "proxy_anchor"})


def _check_name(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    if key not in _BUILDERS:
        raise ValueError(f"unknown DML loss {name!r}; allowed: {', '.join(DML_LOSS_NAMES)}")
    return key


def needs_class_balanced_batches(name: str) -> bool:
    """True if the loss needs >= 2 samples per class in a batch (an m-per-class sampler)."""
    return _check_name(name) in _CLASS_BALANCED


def has_learnable_parameters(name: str) -> bool:
    """True if the loss owns parameters (class weights / proxies) that the optimizer must update."""
    return _check_name(name) in _LEARNABLE


class DMLLoss(nn.Module):
    """``loss(embeddings, labels)``: the named base loss (+ TCM when built with ``tcm=True``), checked finite.

    Attributes: ``name``, ``loss`` (the module called: the base loss or ``WithTCM``), ``base_loss``,
    ``tcm`` (``TCMLoss`` or ``None``), ``needs_class_balanced_batches``, ``has_learnable_parameters``;
    ``last_parts`` (detached tensors: ``base`` / ``tcm`` / ``total`` / TCM's parts, or ``total`` alone).
    ``parameters()`` yields the learnable class weights / proxies, if any.
    """

    def __init__(self, name: str, base_loss: nn.Module, tcm: TCMLoss | None = None, tcm_weight: float = 1.0,
                 check_finite: bool = True):
        super().__init__()
        self.name = _check_name(name)
        self.loss = base_loss if tcm is None else WithTCM(base_loss, tcm, tcm_weight)
        self.check_finite = bool(check_finite)
        self.needs_class_balanced_batches = self.name in _CLASS_BALANCED
        self.has_learnable_parameters = self.name in _LEARNABLE
        self.last_parts: dict[str, torch.Tensor] = {}

    @property
    def base_loss(self) -> nn.Module:
        return self.loss.base_loss if isinstance(self.loss, WithTCM) else self.loss

    @property
    def tcm(self) -> TCMLoss | None:
        return self.loss.tcm if isinstance(self.loss, WithTCM) else None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        try:
            value = self.loss(embeddings, labels)
        except NonFiniteError as e:  # e.g. TCM's check of its input: say which loss it was
            raise NonFiniteError(f"{self.name} loss: {e}") from e
        if self.check_finite:
            check_finite(value, f"{self.name} loss")
        self.last_parts = dict(self.loss.last_parts) if isinstance(self.loss, WithTCM) else {"total": value.detach()}
        return value


def build_dml_loss(name: str, num_classes: int | None = None, embedding_size: int | None = None, *,
                   tcm: bool | TCMLoss = False, tcm_weight: float = 1.0, tcm_kwargs: dict[str, Any] | None = None,
                   check_finite: bool = True, **kwargs) -> DMLLoss:
    """Build a base DML loss by name; ``kwargs`` go to the loss constructor (overriding our defaults).

    Names: ``smooth_ap`` (ours, temperature 0.01), ``recall_at_k`` (ours, ks 1..16, tau1 1, tau2 0.01),
    ``arcface`` (PML, margin 28.6 deg, scale 64), ``proxy_anchor`` (PML, margin 0.1, alpha 32),
    ``multi_similarity`` (PML, alpha 2, beta 50, base 0.5), ``contrastive`` (PML, L2 on normalized embeddings,
    pos margin 0, neg margin 1), ``supcon`` (PML, temperature 0.1).
    ``tcm=True`` (or a ``TCMLoss``) adds ``tcm_weight * TCM`` (``tcm_kwargs`` go to ``TCMLoss``).
    ``check_finite`` raises ``NonFiniteError`` when the loss is NaN/inf (costs one device sync per call).
    """
    key = _check_name(name)
    base = _BUILDERS[key](num_classes, embedding_size, **kwargs)
    if isinstance(tcm, TCMLoss):
        if tcm_kwargs:
            raise ValueError("give either a TCMLoss instance or tcm_kwargs, not both")
        tcm_module = tcm
    elif tcm:
        tcm_module = TCMLoss(**(tcm_kwargs or {}))
    else:
        if tcm_kwargs:
            raise ValueError("tcm_kwargs given but tcm=False")
        tcm_module = None
    return DMLLoss(key, base, tcm_module, tcm_weight, check_finite)
