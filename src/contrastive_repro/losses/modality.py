r"""Latent modality-structure losses: the contrastive base and the three regularizers of Jiang et al. (CVPR 2023).

Jiang, Chen, Zhao, Chen, Zeng, Chilimbi et al., "Understanding and constructing latent modality structures in
multi-modal representation learning", CVPR 2023. The formulas are those restated in
``/work/shared/papers/FACTS.md`` (section B); the paper's equation numbers are not verified here, so each docstring
names the paper's subsection instead. The CyCLIP baseline follows Goel et al., "CyCLIP: Cyclic Contrastive
Language-Image Pretraining" (NeurIPS 2022) and its public ``src/train.py``.

Notation (all functions): ``z_v``, ``z_t`` are the image / text features of a batch, shape ``[N, d]``, row ``j`` of
both belonging to the same image-text pair; they are expected to be L2-normalised (the functions do not normalise
them, so that each value is exactly the paper's formula of its inputs). ``z_v_aug``, ``z_t_aug`` (the paper's
:math:`z^a`) are the features of augmented views of the same pairs. ``logit_scale`` is the *multiplicative* inverse
temperature :math:`s = 1/\tau` -- i.e. already exponentiated, as open_clip's ``model(...)`` returns it and as CyCLIP
uses ``logit_scale.exp()`` -- given as a float or a scalar tensor (which may require grad).

Precision: inputs in float16 / bfloat16 are promoted to float32 and every loss runs with autocast disabled, so a
loss computed inside an AMP region is still computed in (at least) float32; float64 inputs stay float64.

Cost: the base loss and the cyclic / geometric-consistency / uniformity terms are all ``N x N`` pairwise objectives,
``O(N^2 d)``. :class:`ModalityStructureLoss` computes each similarity matrix once per batch and shares it between the
base loss and the regularizers (the cross-modal matrix ``z_v z_t^T`` feeds InfoNCE, the CyCLIP cross-modal term
and the GC cross-modal term), and in-modal Gram matrices ``z z^T`` use a custom autograd function whose backward
is one matrix product (``(G + G^T) z``) instead of autograd's two. See ``benchmarks/bench_regularizers.py``.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils import check_finite

__all__ = [
    "contrastive_base_loss",
    "cyclip_loss",
    "separation_loss",
    "brownian_bridge_loss",
    "bridge_mean",
    "geometric_consistency_loss",
    "ModalityStructureLoss",
    "REGULARIZERS",
    "BASES",
]

REGULARIZERS = ("cyclip", "separation", "bridge", "gc")
BASES = ("clip", "clip+inmodal")
_REDUCTIONS = ("batch", "mean")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Half / bfloat16 (AMP) inputs are promoted to float32; float32 / float64 are kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _prep(name: str, x: torch.Tensor | None, ref: torch.Tensor | None = None) -> torch.Tensor | None:
    """Check that ``x`` is a 2-D floating tensor (of ``ref``'s shape, dtype and device when given)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, d], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    x = _as_float(x)
    if ref is not None:
        if x.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} (same as z_v)")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device}, z_v on {ref.device}")
        x = x.to(ref.dtype)
    return x


def _scale(logit_scale, ref: torch.Tensor) -> torch.Tensor:
    """The multiplicative logit scale as a 0-d tensor of ``ref``'s dtype and device."""
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        return logit_scale.reshape(()).to(dtype=ref.dtype, device=ref.device)
    logit_scale = float(logit_scale)
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive finite multiplier (1/temperature), got {logit_scale}")
    return torch.tensor(logit_scale, dtype=ref.dtype, device=ref.device)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _pair_sum_norm(n: int, reduction: str) -> float:
    """Normaliser of a sum over the N^2 pairs (j, k): the paper's / CyCLIP's 1/N ("batch") or 1/N^2 ("mean")."""
    return float(n) if reduction == "batch" else float(n) * float(n)


class _SymGram(torch.autograd.Function):
    """``x @ x.T`` whose backward is one matrix product, ``(G + G^T) @ x`` (autograd would do two).

    The backward is written in differentiable torch ops on the saved input, so double backward works too.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x @ x.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (grad + grad.transpose(0, 1)) @ x


def _gram(x: torch.Tensor) -> torch.Tensor:
    return _SymGram.apply(x)


def _targets(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)


def _info_nce(logits: torch.Tensor) -> torch.Tensor:
    r"""Mean over rows of :math:`-\log \mathrm{softmax}(\text{logits}_{j,:})_j` (positive on the diagonal)."""
    return F.cross_entropy(logits, _targets(logits.shape[0], logits.device))


class _Batch:
    """The features of one batch and lazily computed, shared similarity matrices."""

    def __init__(self, z_v, z_t, z_v_aug=None, z_t_aug=None):
        self.z_v = _prep("z_v", z_v)
        self.z_t = _prep("z_t", z_t, self.z_v)
        self.z_v_aug = _prep("z_v_aug", z_v_aug, self.z_v)
        self.z_t_aug = _prep("z_t_aug", z_t_aug, self.z_v)
        self.n = self.z_v.shape[0]
        self._cache: dict[str, torch.Tensor] = {}

    def _get(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def s_vt(self) -> torch.Tensor:
        """``S[j, k] = <z_Vj, z_Tk>``."""
        return self._get("vt", lambda: self.z_v @ self.z_t.transpose(0, 1))

    def gram(self, which: str) -> torch.Tensor:
        """``z z^T`` for ``which`` in {"v", "t", "v_aug", "t_aug"}."""
        return self._get("g_" + which, lambda: _gram(getattr(self, "z_" + which)))


def _require_pair_of_augs(z_v_aug, z_t_aug, what: str) -> bool:
    if (z_v_aug is None) != (z_t_aug is None):
        raise ValueError(f"{what}: give both z_v_aug and z_t_aug (in-modal terms) or neither (cross-modal only)")
    return z_v_aug is not None


# ----------------------------------------------------------------------------------------------------------------
# parts (shared by the functions and the module)
# ----------------------------------------------------------------------------------------------------------------
def _con_parts(b: _Batch, scale: torch.Tensor, inmodal: bool) -> dict[str, torch.Tensor]:
    logits = scale * b.s_vt()
    parts = {"v2t": _info_nce(logits), "t2v": _info_nce(logits.transpose(0, 1))}
    if inmodal:
        parts["v2v"] = _info_nce(scale * (b.z_v @ b.z_v_aug.transpose(0, 1)))
        parts["t2t"] = _info_nce(scale * (b.z_t @ b.z_t_aug.transpose(0, 1)))
        parts["con"] = (parts["v2t"] + parts["t2v"] + parts["v2v"] + parts["t2t"]) / 4
    else:
        parts["con"] = (parts["v2t"] + parts["t2v"]) / 2
    return parts


def _sq_diff_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum((a - b)^2)`` as one fused kernel forward and backward."""
    return F.mse_loss(a, b, reduction="sum")


def _cross_consistency(b: _Batch, norm: float) -> torch.Tensor:
    s = b.s_vt()
    return _sq_diff_sum(s, s.transpose(0, 1)) / norm


def _inmodal_consistency(b: _Batch, first: str, second: str, norm: float) -> torch.Tensor:
    return _sq_diff_sum(b.gram(first), b.gram(second)) / norm


def _cyclip_parts(b: _Batch, inmodal_weight: float, crossmodal_weight: float, reduction: str):
    norm = _pair_sum_norm(b.n, reduction)
    parts = {}
    total = b.z_v.new_zeros(())
    if inmodal_weight != 0:
        parts["cyclip/inmodal"] = _inmodal_consistency(b, "v", "t", norm)
        total = total + inmodal_weight * parts["cyclip/inmodal"]
    if crossmodal_weight != 0:
        parts["cyclip/crossmodal"] = _cross_consistency(b, norm)
        total = total + crossmodal_weight * parts["cyclip/crossmodal"]
    parts["cyclip"] = total
    return parts


def _gc_parts(b: _Batch, use_aug: bool, reduction: str):
    norm = _pair_sum_norm(b.n, reduction)
    parts = {"gc/crossmodal": _cross_consistency(b, norm), "gc/inmodal": _inmodal_consistency(b, "v", "t", norm)}
    parts["gc/plain"] = parts["gc/crossmodal"] + parts["gc/inmodal"]
    total = parts["gc/plain"]
    if use_aug and (b.z_v_aug is not None or b.z_t_aug is not None):
        aug_total = b.z_v.new_zeros(())
        if b.z_v_aug is not None:
            parts["gc/aug_v"] = _inmodal_consistency(b, "v", "v_aug", norm)
            aug_total = aug_total + parts["gc/aug_v"]
        if b.z_t_aug is not None:
            parts["gc/aug_t"] = _inmodal_consistency(b, "t", "t_aug", norm)
            aug_total = aug_total + parts["gc/aug_t"]
        va = b.z_v if b.z_v_aug is None else b.z_v_aug
        ta = b.z_t if b.z_t_aug is None else b.z_t_aug
        pair = (b.z_v * b.z_t).sum(1) - (va * ta).sum(1)
        parts["gc/aug_pair"] = pair.square().sum() / b.n  # a sum over j only: the paper's 1/N is a mean here
        parts["gc/aug"] = aug_total + parts["gc/aug_pair"]
        total = total + parts["gc/aug"]
    parts["gc"] = total
    return parts


def bridge_mean(z_from_end: torch.Tensor, z_other_end: torch.Tensor, t: float) -> torch.Tensor:
    r""":math:`\mu = \mathrm{normalize}(t\,z_{end} + (1-t)\,z_{other})`, the point of the bridge the view is pulled to.

    ``t`` weights ``z_from_end``: for the paper's image bridge, ``bridge_mean(z_v, z_t, t)`` =
    normalize(t z_V + (1-t) z_T), which equals z_T at t = 0 and z_V at t = 1.
    """
    return F.normalize(torch.lerp(z_other_end, z_from_end, t), dim=-1)  # lerp(a, b, t) = (1 - t) a + t b


def _bridge_parts(b: _Batch, t: float, symmetric: bool, detach_mean: bool):
    if b.z_v_aug is None:
        raise ValueError("the Brownian-bridge loss needs z_v_aug (features of the augmented image view)")
    mu_v = bridge_mean(b.z_v, b.z_t, t)
    if detach_mean:
        mu_v = mu_v.detach()
    parts = {"bridge/v": _sq_diff_sum(b.z_v_aug, mu_v) / b.n}
    if symmetric:
        if b.z_t_aug is None:
            raise ValueError("the symmetric Brownian-bridge loss needs z_t_aug as well")
        mu_t = bridge_mean(b.z_t, b.z_v, t)
        if detach_mean:
            mu_t = mu_t.detach()
        parts["bridge/t"] = _sq_diff_sum(b.z_t_aug, mu_t) / b.n
        parts["bridge"] = (parts["bridge/v"] + parts["bridge/t"]) / 2
    else:
        parts["bridge"] = parts["bridge/v"]
    return parts


def _check_t_bridge(t: float) -> float:
    t = float(t)
    if not (0.0 < t < 1.0):
        raise ValueError(f"the bridge time t must lie in (0, 1) (variance t(1-t) > 0), got {t}")
    return t


def _neg_t_sq_dists(x: torch.Tensor, t: float) -> torch.Tensor:
    """``-t ||x_j - x_k||^2 = 2t <x_j, x_k> - t|x_j|^2 - t|x_k|^2`` from the Gram matrix; the diagonal is set to
    exactly 0 (no rounding residue, no gradient through it)."""
    g = _gram(x)
    sq = torch.diagonal(g) * t
    a = (2 * t) * g - sq[:, None] - sq[None, :]
    a.diagonal().fill_(0.0)
    return a


def _sep_parts(z_v, z_t, zi_v, zi_v_aug, zi_t, zi_t_aug, scale, t_uni: float):
    n = z_v.shape[0]
    parts = {"sep/ortho": ((z_v * zi_v).sum(1).square() + (z_t * zi_t).sum(1).square()).mean()}
    parts["sep/con_v2v"] = _info_nce(scale * (zi_v @ zi_v_aug.transpose(0, 1)))
    parts["sep/con_t2t"] = _info_nce(scale * (zi_t @ zi_t_aug.transpose(0, 1)))
    parts["sep/con"] = parts["sep/con_v2v"] + parts["sep/con_t2t"]
    # log (1/N) sum_{j,k} [exp(-t d_V^2) + exp(-t d_T^2)], as one stable logsumexp over both N x N blocks.
    lse_v = torch.logsumexp(_neg_t_sq_dists(zi_v, t_uni).reshape(-1), dim=0)
    lse_t = torch.logsumexp(_neg_t_sq_dists(zi_t, t_uni).reshape(-1), dim=0)
    parts["sep/uni"] = torch.logaddexp(lse_v, lse_t) - math.log(n)
    parts["sep"] = parts["sep/ortho"] + parts["sep/con"] + parts["sep/uni"]
    return parts


def _finish(parts: dict, key: str, return_parts: bool):
    return (parts[key], parts) if return_parts else parts[key]


# ----------------------------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------------------------
def contrastive_base_loss(z_v, z_t, z_v_aug, z_t_aug, logit_scale, *, return_parts: bool = False):
    r"""The contrastive base loss of the paper (CyCLIP's ``--inmodal`` objective).

    With :math:`s` = ``logit_scale`` and :math:`\ell(A, B) = -\frac1N\sum_j \log
    \frac{\exp(s\langle a_j, b_j\rangle)}{\sum_k \exp(s\langle a_j, b_k\rangle)}` (InfoNCE, positive on the
    diagonal, negatives the other rows of ``B``):

    .. math::

        L_{Con} = \tfrac14\,(L_{V2T} + L_{T2V} + L_{V2V} + L_{T2T}),\quad
        L_{V2T} = \ell(z_V, z_T),\ L_{T2V} = \ell(z_T, z_V),\ L_{V2V} = \ell(z_V, z^a_V),\ L_{T2T} = \ell(z_T, z^a_T).

    The in-modal terms use the augmented view as the positive and the other augmented views as negatives, one
    direction only, exactly as CyCLIP's ``src/train.py``. With ``z_v_aug = z_t_aug = None`` the in-modal terms are
    dropped and the loss is CLIP's :math:`(L_{V2T} + L_{T2V})/2`; giving only one of them is an error.

    Returns the scalar loss, or ``(loss, parts)`` with ``parts`` = {"v2t", "t2v", ["v2v", "t2t"], "con"} when
    ``return_parts``.
    """
    inmodal = _require_pair_of_augs(z_v_aug, z_t_aug, "contrastive_base_loss")
    with torch.autocast(device_type=z_v.device.type, enabled=False):
        b = _Batch(z_v, z_t, z_v_aug, z_t_aug)
        parts = _con_parts(b, _scale(logit_scale, b.z_v), inmodal)
    return _finish(parts, "con", return_parts)


def cyclip_loss(z_v, z_t, *, inmodal_weight: float = 0.25, crossmodal_weight: float = 0.25,
                reduction: str = "batch", return_parts: bool = False):
    r"""CyCLIP's cyclic consistency regularizer (Goel et al., NeurIPS 2022) -- a baseline.

    .. math::

        L_{C\text{-}cyc} = \frac{1}{c}\sum_{j,k} (\langle z_{Vj}, z_{Tk}\rangle - \langle z_{Vk}, z_{Tj}\rangle)^2,
        \qquad
        L_{I\text{-}cyc} = \frac{1}{c}\sum_{j,k} (\langle z_{Vj}, z_{Vk}\rangle - \langle z_{Tj}, z_{Tk}\rangle)^2,

        L_{CyCLIP} = \lambda_1 L_{I\text{-}cyc} + \lambda_2 L_{C\text{-}cyc}

    (add it to the CLIP / in-modal base loss). ``inmodal_weight`` = :math:`\lambda_1` (CyCLIP's ``--cylambda1``),
    ``crossmodal_weight`` = :math:`\lambda_2` (``--cylambda2``); both default to 0.25, the values of CyCLIP's runs.

    Normalisation ``c``: ``reduction="batch"`` (default) is :math:`c = N`, which is what CyCLIP's code computes
    (``(logits_a - logits_b).square().mean() / logit_scale**2 * batch_size``) and what the CVPR paper's geometric
    consistency loss uses; ``reduction="mean"`` is :math:`c = N^2` (``mean_{j,k}``), i.e. the ``"batch"`` value
    divided by N. The ``logit_scale`` CyCLIP multiplies in and divides out again cancels, so it is not an argument.

    Returns the scalar, or ``(loss, parts)`` with parts {"cyclip/inmodal", "cyclip/crossmodal", "cyclip"}.
    """
    _check_reduction(reduction)
    with torch.autocast(device_type=z_v.device.type, enabled=False):
        b = _Batch(z_v, z_t)
        parts = _cyclip_parts(b, float(inmodal_weight), float(crossmodal_weight), reduction)
    return _finish(parts, "cyclip", return_parts)


def separation_loss(z_v, z_t, zi_v, zi_v_aug, zi_t, zi_t_aug, logit_scale, t: float = 2.0, *,
                    return_parts: bool = False):
    r"""Deep feature separation, the paper's intra-modal structure ("Deep feature separation").

    Extra heads on each encoder give modality-*independent* features :math:`z^i` (model side; this function takes
    them as inputs, normalised or not). With :math:`\ell` the InfoNCE of :func:`contrastive_base_loss` and
    :math:`G(u, v) = \exp(-t\,\|u - v\|^2)`:

    .. math::

        L_{Ortho} = \frac1N \sum_j \big(\langle z_{Vj}, z^i_{Vj}\rangle^2 + \langle z_{Tj}, z^i_{Tj}\rangle^2\big),
        \qquad L^i_{Con} = L^i_{V2V} + L^i_{T2T} = \ell(z^i_V, z^{i,a}_V) + \ell(z^i_T, z^{i,a}_T),

        L^i_{Uni} = \log \frac1N \sum_{j,k} \big[G(z^i_{Vj}, z^i_{Vk}) + G(z^i_{Tj}, z^i_{Tk})\big],
        \qquad L_{Sep} = L_{Ortho} + L^i_{Con} + L^i_{Uni},

    with ``t`` = 2 as in the paper. Notes: the sum in :math:`L^i_{Uni}` runs over all (j, k), the diagonal
    (:math:`G = 1`) included, and both modalities sit inside one logarithm, exactly as written; the paper's
    :math:`1/N` (rather than :math:`1/N^2`) only shifts the value by :math:`\log N` -- the gradient is the same.
    It is computed as one ``logsumexp`` (stable for any ``t``). The in-modal terms use the same ``logit_scale`` as the
    base loss.

    Returns the scalar, or ``(loss, parts)`` with parts {"sep/ortho", "sep/con_v2v", "sep/con_t2t", "sep/con",
    "sep/uni", "sep"}.
    """
    t = float(t)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"the uniformity temperature t must be positive, got {t}")
    with torch.autocast(device_type=z_v.device.type, enabled=False):
        z_v = _prep("z_v", z_v)
        z_t = _prep("z_t", z_t, z_v)
        zi = [_prep(name, x, z_v) for name, x in
              (("zi_v", zi_v), ("zi_v_aug", zi_v_aug), ("zi_t", zi_t), ("zi_t_aug", zi_t_aug))]
        if any(x is None for x in zi):
            raise ValueError("separation_loss needs zi_v, zi_v_aug, zi_t and zi_t_aug")
        parts = _sep_parts(z_v, z_t, *zi, _scale(logit_scale, z_v), t)
    return _finish(parts, "sep", return_parts)


def brownian_bridge_loss(z_v, z_t, z_v_aug, t: float = 0.25, *, z_t_aug=None, detach_mean: bool = False,
                         return_parts: bool = False):
    r"""Brownian-bridge loss, the paper's inter-modal structure ("Brownian bridge").

    A Brownian bridge from :math:`z_T` (time 0) to :math:`z_V` (time 1) has, at time ``t``, mean
    :math:`t z_V + (1-t) z_T` and variance :math:`t(1-t)`. The paper projects the mean to the sphere,

    .. math::

        \mu_j = \mathrm{normalize}(t\,z_{Vj} + (1-t)\,z_{Tj}),\qquad z^a_{Vj} \sim \mathcal N(\mu_j, t(1-t) I),

        L_{Br} = \frac1N \sum_j \| z^a_{Vj} - \mu_j \|^2 .

    So ``t`` is the weight of the **image** end: t = 0 puts :math:`\mu` at :math:`z_T`, t = 1 at :math:`z_V`; the
    paper's t = 0.25 (all experiments) pulls the augmented image view to a point a quarter of the way from the text
    feature towards the image feature. :math:`L_{Br}` is the negative log-likelihood of the augmented view under
    that Gaussian up to an additive constant :math:`\frac d2\log(2\pi t(1-t))` and the positive factor
    :math:`1/(2t(1-t))` (t is fixed, so neither changes the optimum; the loss weight absorbs the factor).

    Optional symmetric text version (our extension, not in the paper): with ``z_t_aug`` given, the text view is
    pulled to :math:`\mu^T_j = \mathrm{normalize}(t\,z_{Tj} + (1-t)\,z_{Vj})` (the same construction from the other
    end) and the loss is the average :math:`(L^V_{Br} + L^T_{Br})/2`. ``detach_mean=True`` stops the gradient
    through :math:`\mu` (the paper does not say; the default lets it flow, moving z_V and z_T as well).

    Returns the scalar, or ``(loss, parts)`` with parts {"bridge/v", ["bridge/t"], "bridge"}.
    """
    t = _check_t_bridge(t)
    with torch.autocast(device_type=z_v.device.type, enabled=False):
        b = _Batch(z_v, z_t, z_v_aug, z_t_aug)
        if b.z_v_aug is None:
            raise ValueError("brownian_bridge_loss needs z_v_aug")
        parts = _bridge_parts(b, t, symmetric=z_t_aug is not None, detach_mean=detach_mean)
    return _finish(parts, "bridge", return_parts)


def geometric_consistency_loss(z_v, z_t, z_v_aug=None, z_t_aug=None, *, reduction: str = "batch",
                               return_parts: bool = False):
    r"""Geometric consistency, the paper's intra- and inter-modal structure ("Geometric consistency").

    .. math::

        L_{GC} = \frac1N \sum_{j,k} \big[(\langle z_{Vj}, z_{Tk}\rangle - \langle z_{Vk}, z_{Tj}\rangle)^2
                 + (\langle z_{Vj}, z_{Vk}\rangle - \langle z_{Tj}, z_{Tk}\rangle)^2\big],

        L^a_{GC} = \frac1N \sum_{j,k} \big[(\langle z_{Vj}, z_{Vk}\rangle - \langle z^a_{Vj}, z^a_{Vk}\rangle)^2
                 + (\langle z_{Tj}, z_{Tk}\rangle - \langle z^a_{Tj}, z^a_{Tk}\rangle)^2\big]
                 + \frac1N \sum_j (\langle z_{Vj}, z_{Tj}\rangle - \langle z^a_{Vj}, z^a_{Tj}\rangle)^2,

    total :math:`L_{GC} + L^a_{GC}` (only :math:`L_{GC}` when no augmented view is given).

    Normalisation: the paper writes :math:`\frac1N` in front of the double sums (not :math:`\frac1{N^2}`), the same
    as CyCLIP's code; ``reduction="batch"`` (default) keeps it. Consequence: the double-sum terms grow roughly
    linearly with N at a fixed geometry, so the weight that balances them against :math:`L_{Con}` depends on the
    batch size. ``reduction="mean"`` divides the double sums by :math:`N^2` instead (the single sum over j keeps its
    :math:`\frac1N`, which is a mean in both cases). :math:`L_{GC}` equals CyCLIP's regularizer with
    :math:`\lambda_1 = \lambda_2 = 1`.

    With only one augmented view given, the missing one is replaced by its clean feature: its in-modal term is then
    dropped (it would be 0) and the pair term compares :math:`\langle z_{Vj}, z_{Tj}\rangle` with
    :math:`\langle z^a_{Vj}, z_{Tj}\rangle` (or the text analogue).

    Returns the scalar, or ``(loss, parts)`` with parts {"gc/crossmodal", "gc/inmodal", "gc/plain", ["gc/aug_v",
    "gc/aug_t", "gc/aug_pair", "gc/aug"], "gc"}.
    """
    _check_reduction(reduction)
    with torch.autocast(device_type=z_v.device.type, enabled=False):
        b = _Batch(z_v, z_t, z_v_aug, z_t_aug)
        parts = _gc_parts(b, use_aug=True, reduction=reduction)
    return _finish(parts, "gc", return_parts)


# ----------------------------------------------------------------------------------------------------------------
# the composed loss
# ----------------------------------------------------------------------------------------------------------------
class ModalityStructureLoss(nn.Module):
    r"""Base contrastive loss plus weighted modality-structure regularizers (Jiang et al., CVPR 2023).

    .. math::

        L = L_{base} + \sum_{r} w_r L_r,\qquad r \in \{\text{cyclip}, \text{separation}, \text{bridge}, \text{gc}\}

    with :math:`L_{base}` = CLIP's :math:`(L_{V2T} + L_{T2V})/2` (``base="clip"``) or the paper's
    :math:`L_{Con}` (``base="clip+inmodal"``, needs both augmented views), and the regularizers of
    :func:`cyclip_loss` (:math:`\lambda_1 L_{I-cyc} + \lambda_2 L_{C-cyc}`), :func:`separation_loss`
    (:math:`L_{Sep}`), :func:`brownian_bridge_loss` (:math:`L_{Br}`) and :func:`geometric_consistency_loss`
    (:math:`L_{GC} + L^a_{GC}`, the augmented part when augmented views are given and ``gc_use_aug``).
    The paper's main text does not give the regularizer weights (FACTS.md B) -- choose and report them.

    ``regularizers``: a mapping name -> weight, or an iterable of names (weight 1). A weight of 0 skips the term.
    Unknown names raise ``ValueError`` listing the allowed ones.

    ``forward(z_v, z_t, logit_scale, *, z_v_aug=None, z_t_aug=None, zi_v=None, zi_v_aug=None, zi_t=None,
    zi_t_aug=None)`` returns ``(total, parts)``: ``total`` is the differentiable scalar, ``parts`` a dict of
    **detached** scalars for logging -- the unweighted value of every term and sub-term (keys of the functions above,
    e.g. "con", "v2t", "cyclip", "sep/uni", "bridge", "gc/aug") and "total". Similarity matrices are computed once
    and shared between the terms. With ``check_finite`` (default) a NaN / inf in any term raises
    :class:`contrastive_repro.utils.NonFiniteError` naming it.
    """

    def __init__(self, base: str = "clip+inmodal", regularizers: Mapping[str, float] | Iterable[str] | None = None,
                 *, cyclip_inmodal_weight: float = 0.25, cyclip_crossmodal_weight: float = 0.25,
                 cyclip_reduction: str = "batch", gc_reduction: str = "batch", gc_use_aug: bool = True,
                 bridge_t: float = 0.25, bridge_symmetric: bool = False, bridge_detach_mean: bool = False,
                 uniformity_t: float = 2.0, check_finite: bool = True):
        super().__init__()
        if base not in BASES:
            raise ValueError(f"unknown base {base!r}; allowed: {', '.join(BASES)}")
        if regularizers is None:
            regularizers = {}
        elif isinstance(regularizers, str):
            regularizers = {regularizers: 1.0}
        elif not isinstance(regularizers, Mapping):
            regularizers = {name: 1.0 for name in regularizers}
        unknown = [name for name in regularizers if name not in REGULARIZERS]
        if unknown:
            raise ValueError(f"unknown regularizer(s) {unknown}; allowed: {', '.join(REGULARIZERS)}")
        weights = {}
        for name, w in regularizers.items():
            w = float(w)
            if not math.isfinite(w) or w < 0:
                raise ValueError(f"regularizer weight for {name!r} must be finite and >= 0, got {w}")
            if w > 0:
                weights[name] = w
        _check_reduction(cyclip_reduction)
        _check_reduction(gc_reduction)
        self.base = base
        self.weights = weights
        self.cyclip_inmodal_weight = float(cyclip_inmodal_weight)
        self.cyclip_crossmodal_weight = float(cyclip_crossmodal_weight)
        self.cyclip_reduction = cyclip_reduction
        self.gc_reduction = gc_reduction
        self.gc_use_aug = bool(gc_use_aug)
        self.bridge_t = _check_t_bridge(bridge_t)
        self.bridge_symmetric = bool(bridge_symmetric)
        self.bridge_detach_mean = bool(bridge_detach_mean)
        self.uniformity_t = float(uniformity_t)
        if not (math.isfinite(self.uniformity_t) and self.uniformity_t > 0):
            raise ValueError(f"uniformity_t must be positive, got {uniformity_t}")
        self.check_finite = bool(check_finite)

    def extra_repr(self) -> str:
        return f"base={self.base!r}, regularizers={self.weights}"

    def forward(self, z_v, z_t, logit_scale, *, z_v_aug=None, z_t_aug=None, zi_v=None, zi_v_aug=None, zi_t=None,
                zi_t_aug=None):
        inmodal = self.base == "clip+inmodal"
        if inmodal and (z_v_aug is None or z_t_aug is None):
            raise ValueError("base='clip+inmodal' needs z_v_aug and z_t_aug")
        w = self.weights
        if "bridge" in w and z_v_aug is None:
            raise ValueError("the 'bridge' regularizer needs z_v_aug")
        if "bridge" in w and self.bridge_symmetric and z_t_aug is None:
            raise ValueError("the symmetric 'bridge' regularizer needs z_t_aug")
        if "separation" in w and any(x is None for x in (zi_v, zi_v_aug, zi_t, zi_t_aug)):
            raise ValueError("the 'separation' regularizer needs zi_v, zi_v_aug, zi_t and zi_t_aug "
                             "(modality-independent features from the extra heads)")
        with torch.autocast(device_type=z_v.device.type, enabled=False):
            b = _Batch(z_v, z_t, z_v_aug, z_t_aug)
            scale = _scale(logit_scale, b.z_v)
            parts = _con_parts(b, scale, inmodal)
            total = parts["con"]
            if "cyclip" in w:
                parts.update(_cyclip_parts(b, self.cyclip_inmodal_weight, self.cyclip_crossmodal_weight,
                                           self.cyclip_reduction))
                total = total + w["cyclip"] * parts["cyclip"]
            if "separation" in w:
                zi = [_prep(name, x, b.z_v) for name, x in
                      (("zi_v", zi_v), ("zi_v_aug", zi_v_aug), ("zi_t", zi_t), ("zi_t_aug", zi_t_aug))]
                parts.update(_sep_parts(b.z_v, b.z_t, *zi, scale, self.uniformity_t))
                total = total + w["separation"] * parts["sep"]
            if "bridge" in w:
                parts.update(_bridge_parts(b, self.bridge_t, self.bridge_symmetric, self.bridge_detach_mean))
                total = total + w["bridge"] * parts["bridge"]
            if "gc" in w:
                parts.update(_gc_parts(b, self.gc_use_aug, self.gc_reduction))
                total = total + w["gc"] * parts["gc"]
        out = {k: v.detach() for k, v in parts.items()}
        out["total"] = total.detach()
        if self.check_finite:
            # One host sync for the whole dict; name the first offending term only when something is off.
            if not bool(torch.isfinite(torch.stack([v.reshape(()) for v in out.values()])).all()):
                for name, value in out.items():
                    check_finite(value, f"ModalityStructureLoss term {name!r}")
        return total, out
