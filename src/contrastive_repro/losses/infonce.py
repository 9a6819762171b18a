"""InfoNCE for one modality (NT-Xent / SimCLR) and the symmetric two-modality (CLIP) contrastive loss.

Notation: ``a_i`` anchor features, ``p_i`` their positives (``[B, d]``), ``s(x, y) = <x, y>`` (cosine similarity when
``normalize=True``), ``tau`` the temperature, ``W`` the number of ranks when negatives are gathered.

One modality, two views (NT-Xent, SimCLR eq. 1; "InfoNCE" of van den Oord et al. 2018, eq. 4)::

    z = [a_1..a_B, p_1..p_B]                       (2B views; the positive of view k is its other view k+)
    L = 1/(2B) * sum_k  -log( exp(s(z_k, z_k+)/tau) / sum_{m != k} exp(s(z_k, z_m)/tau) )

i.e. each view is contrasted with its other view against the 2B-2 other views of the batch (the positive is in the
denominator). This is exactly ``pytorch_metric_learning.losses.NTXentLoss(temperature)`` applied to
``cat([a, p])`` with labels ``cat([arange(B), arange(B)])`` (tested).

One modality, explicit negatives ``n_1..n_M`` shared by all anchors (MoCo)::

    L = 1/B * sum_i -log( exp(s(a_i, p_i)/tau) / (exp(s(a_i, p_i)/tau) + sum_m exp(s(a_i, n_m)/tau)) )

Two modalities (CLIP, Radford et al. 2021, the pseudo-code of Fig. 3) with ``t = logit_scale`` (already exponentiated,
open_clip's convention: ``t = model.logit_scale.exp()``)::

    L = 1/2 * [ CE(t * I T^T, arange(B)) + CE(t * T I^T, arange(B)) ]

which is ``open_clip.loss.ClipLoss`` on L2-normalized features (tested; in a single process we call it).

Gathered negatives. ``gather`` is a callable ``x -> cat over ranks of x`` that keeps gradients (e.g.
:func:`contrastive_repro.distributed.all_gather_with_grad`; ``gather=True`` picks that one). Each rank then computes
the *local* loss: its own ``B`` anchors against all ``W*B`` gathered candidates, with labels ``arange(B) + B*rank``
(open_clip's ``local_loss=True, gather_with_grad=True``). The mean over ranks of these local losses is the loss of
the concatenated global batch, and with DDP's gradient averaging the parameter gradient is exactly the global one.
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["info_nce", "InfoNCELoss", "clip_loss", "SymmetricContrastiveLoss", "resolve_gather"]

GatherArg = Union[Callable[[torch.Tensor], torch.Tensor], bool, None]


def resolve_gather(gather: GatherArg, rank: int | None = None) -> tuple[Callable | None, int]:
    """Normalize the ``gather`` argument of the losses: ``None``/``False`` -> no gathering, ``True`` ->
    :func:`contrastive_repro.distributed.all_gather_with_grad`, a callable -> itself. Returns ``(gather, rank)`` with
    ``rank`` defaulting to the process-group rank (0 without a process group)."""
    if gather is None or gather is False:
        return None, 0 if rank is None else int(rank)
    if gather is True:
        from ..distributed import all_gather_with_grad

        gather = all_gather_with_grad
    if not callable(gather):
        raise TypeError(f"gather must be a callable, True, False or None, got {type(gather).__name__}")
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return gather, int(rank)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in at least float32 (exp/logsumexp in half precision lose the small terms)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _prep(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = _upcast(x)
    return F.normalize(x, dim=-1) if normalize else x


def _check_pair(anchor: torch.Tensor, positive: torch.Tensor, names: tuple[str, str] = ("anchor", "positive")
                ) -> None:
    """Both ``[B, d]`` floating-point with the same shape and ``B >= 1``; errors name the arguments."""
    if anchor.dim() != 2 or anchor.shape != positive.shape:
        raise ValueError(f"{names[0]} and {names[1]} must both be [B, d] with the same shape, got "
                         f"{tuple(anchor.shape)} and {tuple(positive.shape)}")
    for name, x in zip(names, (anchor, positive)):
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating-point features, got dtype {x.dtype}")
    if anchor.shape[0] == 0:
        raise ValueError(f"empty batch: {names[0]} and {names[1]} have 0 rows")


def _scalar_value(x) -> float:
    return float(x.detach().reshape(-1)[0]) if isinstance(x, torch.Tensor) else float(x)


def check_temperature(temperature, name: str = "temperature") -> None:
    """Raise ValueError naming ``name`` unless the temperature is a finite number > 0 (a 0-d or 1-element
    tensor is read once: one host sync)."""
    if isinstance(temperature, torch.Tensor) and temperature.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(temperature.shape)}")
    t = _scalar_value(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {t}")


def check_logit_scale(logit_scale, name: str = "logit_scale") -> None:
    """Raise ValueError unless the (exponentiated) logit scale is a finite number >= 0: a negative scale rewards
    dissimilar pairs, i.e. trains the wrong way."""
    if isinstance(logit_scale, torch.Tensor) and logit_scale.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(logit_scale.shape)}")
    t = _scalar_value(logit_scale)
    if not (math.isfinite(t) and t >= 0):
        raise ValueError(f"{name} must be a finite number >= 0 (the exponentiated scale 1/temperature), got {t}")


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, temperature: float | torch.Tensor = 0.1,
             negatives: torch.Tensor | None = None, *, normalize: bool = True, gather: GatherArg = None,
             rank: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """InfoNCE / NT-Xent for one modality (formulas in the module docstring).

    Args:
        anchor, positive: ``[B, d]`` the two views of each sample.
        temperature: ``tau`` (float or a 0-d tensor, e.g. a learnable one).
        negatives: ``None`` -> NT-Xent with the 2B views of the batch (each view against the 2B-2 other views);
            ``[M, d]`` -> MoCo form: every anchor against its positive and these ``M`` negatives (one direction,
            ``B`` terms; ``gather`` is then ignored).
        normalize: L2-normalize features first (cosine similarity).
        gather: gather-with-grad callable for in-batch negatives over ranks (``True`` = the library's); the result
            is this rank's local loss (see module docstring).
        rank: this rank's position in the gathered tensor (default: the process-group rank).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (per view: ``[2B]``, or ``[B]`` with ``negatives``).

    Raises ValueError for a temperature <= 0 or an empty batch, TypeError for non-floating features.
    """
    _check_pair(anchor, positive)
    check_temperature(temperature)
    a, p = _prep(anchor, normalize), _prep(positive, normalize)
    if negatives is not None:
        n = _prep(negatives, normalize)
        pos = (a * p).sum(-1, keepdim=True)
        logits = torch.cat([pos, a @ n.T], dim=1) / temperature
        losses = torch.logsumexp(logits, dim=1) - logits[:, 0]
    else:
        gather, rank = resolve_gather(gather, rank)
        b = a.shape[0]
        z = torch.cat([a, p], dim=0)                                  # local views [2B, d]
        if gather is None:
            ref, half, off = z, b, 0
        else:
            ga, gp = gather(a), gather(p)
            ref, half, off = torch.cat([ga, gp], dim=0), ga.shape[0], rank * b
        logits = (z / temperature) @ ref.T                            # [2B, 2*half]
        idx = torch.arange(b, device=z.device)
        self_col = torch.cat([idx + off, idx + off + half])
        pos_col = torch.cat([idx + off + half, idx + off])
        rows = torch.arange(2 * b, device=z.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, self_col] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        losses = F.cross_entropy(logits, pos_col, reduction="none")
    return _reduce(losses, reduction)


def _reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce` (NT-Xent with 2B views, or MoCo form with explicit negatives).

    ``loss = InfoNCELoss(temperature=0.1)(view1, view2)``; under torchrun pass ``gather=True``.
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True, gather: GatherArg = None,
                 rank: int | None = None, reduction: str = "mean"):
        super().__init__()
        check_temperature(temperature)
        self.temperature = temperature
        self.normalize = normalize
        self.gather = gather
        self.rank = rank
        self.reduction = reduction

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor,
                negatives: torch.Tensor | None = None) -> torch.Tensor:
        return info_nce(anchor, positive, self.temperature, negatives, normalize=self.normalize,
                        gather=self.gather, rank=self.rank, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, gather={self.gather is not None}"


def _own_clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale, gather: Callable | None,
                   rank: int) -> torch.Tensor:
    b = img.shape[0]
    if gather is None:
        logits = (img * logit_scale) @ txt.T                         # one matmul for both directions
        labels = torch.arange(b, device=img.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    all_img, all_txt = gather(img), gather(txt)
    labels = torch.arange(b, device=img.device) + b * rank
    logits_i = (img * logit_scale) @ all_txt.T
    logits_t = (txt * logit_scale) @ all_img.T
    return 0.5 * (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels))


_OPEN_CLIP_LOSS = None


def _open_clip_loss():
    global _OPEN_CLIP_LOSS
    if _OPEN_CLIP_LOSS is None:
        try:
            from open_clip.loss import ClipLoss
        except ImportError:  # pragma: no cover - open_clip is a dependency
            _OPEN_CLIP_LOSS = False
        else:
            _OPEN_CLIP_LOSS = ClipLoss(local_loss=False, gather_with_grad=False, rank=0, world_size=1)
    return _OPEN_CLIP_LOSS or None


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float | torch.Tensor,
              *, normalize: bool = True, gather: GatherArg = None, rank: int | None = None,
              use_open_clip: bool = True) -> torch.Tensor:
    """Symmetric image-text contrastive loss ``(CE(t I T^T) + CE(t T I^T)) / 2`` (CLIP).

    ``logit_scale`` is the *exponentiated* scale ``t = 1/tau`` (open_clip convention). Without ``gather`` and with
    ``use_open_clip`` this calls ``open_clip.loss.ClipLoss`` on the (normalized) features; with ``gather`` it
    computes the local loss against the gathered features with labels ``arange(B) + B*rank``.
    Raises ValueError for a negative or non-finite ``logit_scale`` or an empty batch.
    """
    _check_pair(image_features, text_features, ("image_features", "text_features"))
    check_logit_scale(logit_scale)
    img, txt = _prep(image_features, normalize), _prep(text_features, normalize)
    gather, rank = resolve_gather(gather, rank)
    if gather is None and use_open_clip:
        ocl = _open_clip_loss()
        if ocl is not None:
            return ocl(img, txt, logit_scale)
    return _own_clip_loss(img, txt, logit_scale, gather, rank)


class SymmetricContrastiveLoss(nn.Module):
    """Module form of :func:`clip_loss`: ``loss = SymmetricContrastiveLoss()(img_f, txt_f, model.logit_scale.exp())``.

    ``logit_scale=None`` in ``forward`` uses the fixed ``1 / temperature`` given at construction.
    """

    def __init__(self, temperature: float | None = None, normalize: bool = True, gather: GatherArg = None,
                 rank: int | None = None, use_open_clip: bool = True):
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.gather = gather
        self.rank = rank
        self.use_open_clip = use_open_clip

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: float | torch.Tensor | None = None) -> torch.Tensor:
        if logit_scale is None:
            if self.temperature is None:
                raise ValueError("pass logit_scale (exponentiated) or construct with a temperature")
            check_temperature(self.temperature)
            logit_scale = 1.0 / self.temperature
        return clip_loss(image_features, text_features, logit_scale, normalize=self.normalize, gather=self.gather,
                         rank=self.rank, use_open_clip=self.use_open_clip)
