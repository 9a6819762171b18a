r"""The decomposable contrastive loss of Chen et al. (NeurIPS 2022), optimized by stochastic EM.

Chen, Zhang, Xu, Chen, Duan, Chen, Tran, Zeng, Chilimbi, "Why do we need large batch sizes in contrastive learning?
A gradient-bias perspective", NeurIPS 35 (2022). The paper's full text was not available to us; the derivation below
is ours, from the public description (``/work/shared/papers/FACTS.md`` section A) and a standard gamma identity.

Generalized loss
----------------
For anchor ``x_i`` with positive ``x_i+`` and scores ``s_ij = s(x_i, x_j) / tau`` (cosine similarity over a
temperature), the *generalized* contrastive loss has infinitely many negatives::

    L(theta) = E_i [ l_i ],   l_i = -s_ii+ + log Z_i,   Z_i = E_{x- ~ p_neg} [ exp(s(x_i, x-) / tau) ].

``Z_i`` is a mean over the negative distribution, not a sum, and the positive is *not* part of it (one positive
among infinitely many negatives contributes nothing to a mean). The conventional minibatch loss replaces ``Z_i`` by
its plug-in estimate from the ``n`` negatives ``N_i`` of the batch::

    Zhat_i = 1/n * sum_{j in N_i} exp(s_ij),    l_i^conv = -s_ii+ + log Zhat_i        (conventional_contrastive_loss)

``Zhat_i`` is unbiased for ``Z_i`` but ``log`` is concave, so ``E[log Zhat_i] != log Z_i`` and, more to the point,
``E[grad log Zhat_i] = E[grad Zhat_i / Zhat_i] != grad Z_i / Z_i``: the minibatch gradient is biased, the more so
the smaller (or noisier) the batch. With in-batch negatives ``l_i^conv`` equals the usual CLIP/InfoNCE
cross-entropy with the positive removed from the denominator, shifted by the constant ``log n``
(``l_i^CE = -s_ii + log(exp(s_ii) + n Zhat_i)``).

Augmentation (Bayesian data augmentation with a gamma variable)
---------------------------------------------------------------
For ``Z > 0`` and shape ``a > 0``::

    Z^(-a) = 1/Gamma(a) * integral_0^inf u^(a-1) exp(-u Z) du.

The per-anchor likelihood ``exp(a s_ii+) Z_i^(-a)`` (``a = 1``: the InfoNCE probability ``exp(s_ii+)/Z_i``) is thus
the marginal of the joint ``p(x_i, u_i) ∝ exp(a s_ii+) u_i^(a-1) exp(-u_i Z_i)``, whose negative log is, up to terms
constant in the model parameters::

    l_i(theta, u_i) = -a s_ii+ + u_i Z_i                     (complete-data objective; we keep a = 1 on s_ii+
                                                               and absorb a into u, see below)

* It is *linear* in ``Z_i``, so replacing ``Z_i`` by the minibatch mean ``Zhat_i`` gives an **unbiased** estimate
  of ``l_i(theta, u_i)`` and of its gradient for fixed ``u_i``: the loss decomposes into a sum over (anchor,
  negative) pairs and any random subset of negatives gives an unbiased gradient.
* The conditional of ``u_i`` given the model is ``p(u_i | theta) ∝ u_i^(a-1) exp(-u_i Z_i)``, i.e.
  ``Gamma(shape=a, rate=Z_i)``, with mean ``a / Z_i`` and variance ``a / Z_i^2``.
* EM: the E-step takes the expectation of the complete-data objective over ``u_i | theta_old``; the objective is
  linear in ``u_i``, so this is ``-s_ii+ + (a / Z_i(theta_old)) Z_i(theta)``. At ``theta = theta_old`` its gradient
  is ``a grad Z_i / Z_i = a grad log Z_i``: with ``u_i = 1/Z_i`` (``a = 1``) the M-step gradient
  ``-grad s_ii+ + u_i grad Z_i`` equals the generalized InfoNCE gradient **exactly**. General ``a`` weights the
  uniformity term: the fixed point is that of ``-s_ii+ + a log Z_i``.

Stochastic EM as implemented
----------------------------
Per step and per anchor ``i`` (``indices`` are dataset indices; the state is kept per data point)::

    E-step (no grad):  Zbar_i <- estimate of Z_i                       (``z_estimate``)
                       u_i    <- a / Zbar_i            (e_step="mean")  or  u_i ~ Gamma(a, rate=Zbar_i)  ("sample")
    M-step (grad):     loss = mean_i [ -s_ii+ + u_i * Zhat_i ],   Zhat_i = mean_{j in N_i} exp(s_ij)   (with grad)

Note the scale: ``u_i`` multiplies the *mean* over the negatives, as ``Z_i`` is a mean; then ``u_i = 1/Zhat_i``
reproduces the minibatch InfoNCE gradient and ``u_i = 1/Z_i`` the generalized one. Everything is computed in log
space (``u_i Zhat_i = exp(log u_i + logmeanexp_j s_ij)``), so small temperatures do not overflow.

``z_estimate`` -- where ``Zbar_i`` comes from. The remaining bias of the method lives here: the M-step is unbiased
*given* ``u_i``, but ``u_i = a / Zbar_i`` with a noisy ``Zbar_i`` has ``E[1/Zbar_i] >= 1/Z_i`` (Jensen), a gap of
relative size about ``Var(Zbar_i) / Z_i^2``.

* ``"running"`` (default): per-sample exponential moving average of the minibatch estimates, in log space,
  ``Zbar_i <- momentum * Zbar_i + (1 - momentum) * Zhat_i`` (SogCLR-style; the first visit initializes it). Its
  variance is ``(1 - momentum) / (1 + momentum)`` times that of one minibatch estimate (a 9x smaller Jensen gap at
  the default ``momentum = 0.8``), at the price of staleness -- which vanishes at a fixed point of training, where
  ``Z_i`` no longer changes. The fresh estimate comes from ``estimate_negatives_*`` when given, else from the
  M-step's negatives; the updated average is used, so the current batch enters ``u_i`` with weight
  ``1 - momentum``. That small correlation is deliberate: when a heavy-tailed batch estimate ``Zhat_i`` spikes,
  ``u_i`` drops with it and damps the spike's gradient (variance control), at the cost of a bias of order
  ``(1 - momentum) * Var(Zhat_i)/Z_i^2`` towards the conventional gradient. ``momentum -> 0`` is the conventional
  loss; ``momentum -> 1`` (or the exact ``u_i = 1/Z_i``) is unbiased but lets every spike through. Which
  momentum is best depends on the noise, the batch size *and the step budget*: in the synthetic noise study
  (:mod:`contrastive_repro.synthetic`) at B = 64 and 3000 steps, 0.8 beat 0.7 and 0.9 under heavy noise and the
  exact ``1/Z_i`` did worse than all of them, but with 12k steps the exact ``1/Z_i`` reaches the optimum at
  noise 1024 -- so no value is a general recommendation; notebook 01 chooses it on a validation problem.
* ``"minibatch"``: ``Zbar_i = Zhat_i`` of the current batch only. Then ``u_i Zhat_i`` has gradient
  ``grad Zhat_i / Zhat_i``: this is *exactly the conventional (biased) InfoNCE gradient* (``e_step="mean"``), or
  that gradient with its negative part multiplied by an Exp(1) variable (``"sample"``). Useful as a control.
* ``"independent"``: ``Zbar_i`` from a separate set of negatives passed as ``estimate_negatives_*`` (no history).
  ``u_i`` is then independent of the M-step's negatives; the Jensen gap is that of one estimate.

``e_step`` -- ``"mean"`` (default) or ``"sample"``. The M-step gradient is linear in ``u_i``, so a sampled ``u_i``
gives the same expected update as its conditional mean ``a / Zbar_i``, plus variance (for ``a = 1`` the sampled
weight is exponential: coefficient of variation 1 on every anchor's uniformity gradient). Using the mean is the
exact EM expectation step (Rao-Blackwellized stochastic EM); ``"sample"`` is the stochastic-EM variant the paper's
public description names, kept for fidelity and for experiments.

Distributed training (torchrun)
-------------------------------
Negatives are gathered with gradient (``gather=True`` uses
:func:`contrastive_repro.distributed.all_gather_with_grad`): each rank contrasts its ``B`` local anchors with all
``W*B`` gathered candidates; the mean over ranks of the local losses is the loss of the concatenated batch and,
with DDP's gradient averaging, the parameter gradient is exactly the single-process one.

The per-sample state is **sharded by rank with full-size replicas**: every rank holds buffers for all
``num_samples`` rows but only writes the rows of its own local anchors (``indices`` are global dataset indices).
Each row remembers the step of its last update (``last_update``). :meth:`sync_state` merges the replicas with four
all-reduces -- for every row the most recent update wins (ties: lowest rank), rows nobody has seen stay unseen -- so
afterwards every rank holds the state a single process would hold. Call it before saving a checkpoint (then save on
rank 0) and at the end of every epoch when the sampler reshuffles samples across ranks (``DistributedSampler``
does), so that a rank meeting a sample for the first time reads its latest state. Keep this module out of the
DDP-wrapped model (or use ``broadcast_buffers=False``): DDP would otherwise overwrite the state with rank 0's.

The state (``log_z``, ``log_u``, ``last_update``, ``step``) is made of buffers, so it is in ``state_dict`` and in
checkpoints. ``log_z``/``log_u`` have shape ``[D, num_samples]`` with ``D = 2`` for the symmetric loss (one row per
direction: anchor->positive, positive->anchor) and ``D = 1`` otherwise.
"""
from __future__ import annotations

import math
import torch
import torch.nn as nn

from ..utils import NonFiniteError, check_finite
from .infonce import GatherArg, _prep, resolve_gather

__all__ = ["DecomposableContrastiveLoss", "conventional_contrastive_loss", "log_mean_exp", "sample_gamma",
           "e_step_log_u", "ema_log", "decomposable_terms", "conventional_terms", "pair_scores"]

Z_ESTIMATES = ("running", "minibatch", "independent")
E_STEPS = ("mean", "sample")


# ----------------------------------------------------------------------------------------------------------------
# functional pieces (work on any leading batch dimensions; the synthetic study uses them vectorized over seeds)
# ----------------------------------------------------------------------------------------------------------------
def log_mean_exp(logits: torch.Tensor, dim: int = -1, log_weights: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """``log( 1/n * sum_j w_j exp(logits_j) )`` over ``dim``; ``mask`` (True = excluded) shrinks ``n`` per row and
    ``log_weights`` (``log w_j``) reweights the terms (``n`` still counts them)."""
    if log_weights is not None:
        logits = logits + log_weights
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
        n = (~mask).sum(dim).to(logits.dtype)
        return torch.logsumexp(logits, dim) - torch.log(n)
    return torch.logsumexp(logits, dim) - math.log(logits.shape[dim])


def decomposable_terms(pos_logits: torch.Tensor, log_zhat: torch.Tensor, log_u: torch.Tensor) -> torch.Tensor:
    """Per-anchor M-step objective ``-s_ii+ + u_i * Zhat_i`` (inputs in log space: ``log Zhat_i``, ``log u_i``)."""
    return torch.exp(log_u + log_zhat) - pos_logits


def conventional_terms(pos_logits: torch.Tensor, log_zhat: torch.Tensor) -> torch.Tensor:
    """Per-anchor conventional minibatch objective ``-s_ii+ + log Zhat_i``."""
    return log_zhat - pos_logits


def sample_gamma(shape: float | torch.Tensor, rate: torch.Tensor | None = None, *,
                 log_rate: torch.Tensor | None = None, log: bool = False) -> torch.Tensor:
    """Draw ``u ~ Gamma(shape, rate)`` elementwise: mean ``shape/rate``, variance ``shape/rate^2``.

    Uses ``torch._standard_gamma`` (the sampler behind ``torch.distributions.Gamma``; the global RNG of the tensor's
    device). For ``shape < 1`` the draw is made in log space through the boost identity
    ``Gamma(a) = Gamma(a + 1) * U^(1/a)``, so tiny values do not underflow. Give ``rate`` or ``log_rate``;
    ``log=True`` returns ``log u``.
    """
    if (rate is None) == (log_rate is None):
        raise ValueError("give exactly one of rate and log_rate")
    ref = rate if rate is not None else log_rate
    log_rate = torch.log(rate) if rate is not None else log_rate
    conc = torch.as_tensor(shape, dtype=ref.dtype, device=ref.device).expand_as(ref).contiguous()
    if bool((conc <= 0).any()):
        raise ValueError("gamma shape must be > 0")
    boost = conc < 1
    g = torch._standard_gamma(torch.where(boost, conc + 1, conc))
    tiny = torch.finfo(g.dtype).tiny
    log_g = torch.log(g.clamp_min(tiny))
    if bool(boost.any()):
        log_g = log_g + torch.where(boost, torch.log(torch.rand_like(g).clamp_min(tiny)) / conc, 0.0)
    out = log_g - log_rate
    return out if log else torch.exp(out)


def e_step_log_u(log_z: torch.Tensor, shape: float = 1.0, mode: str = "mean") -> torch.Tensor:
    """``log u`` from ``log Zbar``: ``log(a) - log Zbar`` (``"mean"``) or a draw from ``Gamma(a, rate=Zbar)``."""
    if mode == "mean":
        return math.log(shape) - log_z
    if mode == "sample":
        return sample_gamma(shape, log_rate=log_z, log=True)
    raise ValueError(f"e_step must be one of {E_STEPS}, got {mode!r}")


def ema_log(log_old: torch.Tensor, log_new: torch.Tensor, momentum: float,
            seen: torch.Tensor | None = None) -> torch.Tensor:
    """``log( momentum * exp(log_old) + (1 - momentum) * exp(log_new) )``; rows with ``seen == False`` take
    ``log_new`` (first visit initializes the average, no bias towards an arbitrary start)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if momentum == 0.0:
        out = log_new
    elif momentum == 1.0:
        out = log_old
    else:
        out = torch.logaddexp(log_old + math.log(momentum), log_new + math.log1p(-momentum))
    if seen is not None:
        out = torch.where(seen, out, log_new)
    return out


class _InBatchLogMeanExp(torch.autograd.Function):
    """``log mean_{j != off+i} exp(L_ij)`` over the rows (and, with ``both``, over the columns, excluding the same
    entries) of ``L = x @ c.T``, with a hand-written backward that keeps one ``[B, G]`` logits matrix and one
    gradient buffer instead of autograd's per-op temporaries (about 1.6x less peak memory at large batch).
    Columns need ``G == B`` (no offset). First-order only."""

    @staticmethod
    def forward(ctx, x, c, offset: int, both: bool):
        logits = x @ c.T
        logits.diagonal(offset=offset).fill_(float("-inf"))
        n = c.shape[0] - 1
        lse_r = torch.logsumexp(logits, dim=1)
        lse_c = torch.logsumexp(logits, dim=0) if both else lse_r.new_empty(0)
        ctx.save_for_backward(x, c, logits, lse_r, lse_c)
        ctx.both = both
        return lse_r - math.log(n), lse_c - math.log(n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_r, g_c):
        x, c, logits, lse_r, lse_c = ctx.saved_tensors
        w = torch.exp(logits - lse_r.unsqueeze(1)).mul_(g_r.unsqueeze(1))      # softmax over rows * grad
        if ctx.both:
            w.add_(torch.exp(logits - lse_c.unsqueeze(0)).mul_(g_c.unsqueeze(0)))
        grad_x = w @ c if ctx.needs_input_grad[0] else None
        grad_c = w.T @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_c, None, None


def _in_batch_log_zhat(x_scaled: torch.Tensor, candidates: torch.Tensor, offset: int) -> torch.Tensor:
    """log-mean-exp of ``x_scaled @ candidates.T`` per row, leaving out column ``offset + i`` of row ``i``."""
    if candidates.shape[0] < 2:
        raise ValueError("in-batch negatives need at least 2 samples in the (global) batch")
    return _InBatchLogMeanExp.apply(x_scaled, candidates, offset, False)[0]


def pair_scores(anchor: torch.Tensor, positive: torch.Tensor, inv_tau, *, symmetric: bool = False,
                negatives_anchor: torch.Tensor | None = None, negatives_positive: torch.Tensor | None = None,
                gather=None, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(s_ii+, log Zhat_i)]`` per direction, with gradient, from already prepared (normalized) features.

    Direction 0 contrasts anchors with positives (negatives: the other samples' positives, gathered over ranks when
    ``gather`` is given, or ``negatives_anchor``); direction 1 (``symmetric``) contrasts positives with anchors
    (negatives: the other samples' anchors, or ``negatives_positive``).
    """
    a_s = anchor * inv_tau
    pos = (a_s * positive).sum(-1)
    in0 = negatives_anchor is None
    in1 = symmetric and negatives_positive is None
    if gather is None and in0 and in1 and anchor.shape[0] >= 2:      # one matmul serves both directions
        l0, l1 = _InBatchLogMeanExp.apply(a_s, positive, 0, True)
        return [(pos, l0), (pos, l1)]
    b = anchor.shape[0]
    off = rank * b
    if in0:
        cand = positive if gather is None else gather(positive)
        l0 = _in_batch_log_zhat(a_s, cand, off)
    else:
        l0 = log_mean_exp(a_s @ negatives_anchor.T, dim=1)
    out = [(pos, l0)]
    if symmetric:
        p_s = positive * inv_tau
        if in1:
            cand = anchor if gather is None else gather(anchor)
            l1 = _in_batch_log_zhat(p_s, cand, off)
        else:
            l1 = log_mean_exp(p_s @ negatives_positive.T, dim=1)
        out.append((pos, l1))
    return out


def _inv_tau(tau):
    if isinstance(tau, torch.Tensor):
        return 1.0 / tau
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return 1.0 / float(tau)


def conventional_contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, tau: float | torch.Tensor = 0.1, *,
                                  negatives_anchor: torch.Tensor | None = None,
                                  negatives_positive: torch.Tensor | None = None, symmetric: bool = False,
                                  normalize: bool = True, gather: GatherArg = None, rank: int | None = None,
                                  reduction: str = "mean") -> torch.Tensor:
    """The conventional minibatch loss in the generalized loss's form, ``mean_i[-s_ii+/tau + log Zhat_i]`` with
    ``Zhat_i`` the mean of ``exp(s/tau)`` over the same negatives the decomposable loss uses (positive excluded).

    Its gradient is what :class:`DecomposableContrastiveLoss` reproduces exactly when ``u_i = 1/Zhat_i``. With
    in-batch negatives it differs from the cross-entropy InfoNCE only by leaving the positive out of the
    denominator and by the constant ``log(n)``. ``symmetric`` averages the two directions. ``reduction="none"``
    returns ``[D, B]``.
    """
    gather, rank = resolve_gather(gather, rank)
    a, p = _prep(anchor, normalize), _prep(positive, normalize)
    na = None if negatives_anchor is None else _prep(negatives_anchor, normalize)
    npos = None if negatives_positive is None else _prep(negatives_positive, normalize)
    dirs = pair_scores(a, p, _inv_tau(tau), symmetric=symmetric, negatives_anchor=na, negatives_positive=npos,
                       gather=gather, rank=rank)
    terms = torch.stack([conventional_terms(s, lz) for s, lz in dirs])
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum(1).mean(0)
    if reduction == "mean":
        return terms.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ----------------------------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------------------------
class DecomposableContrastiveLoss(nn.Module):
    r"""Decomposable contrastive loss with per-sample auxiliary variables, optimized by stochastic EM.

    Per step: E-step (no grad) ``u_i = a / Zbar_i`` (or ``~ Gamma(a, rate=Zbar_i)``) from the per-sample estimate
    ``Zbar_i`` of ``Z_i = E_neg exp(s(x_i, x-)/tau)``; M-step loss ``mean_i[-s_ii+/tau + u_i * Zhat_i]`` with
    ``Zhat_i = mean_{j in N_i} exp(s_ij/tau)`` (gradient flows through it). See the module docstring for the
    derivation and for the choice of defaults.

    Args:
        num_samples: dataset size; ``indices`` passed to ``forward`` are in ``[0, num_samples)``.
        shape: gamma shape ``a`` (``1`` = InfoNCE; the fixed point is that of ``-s_ii+/tau + a log Z_i``).
        tau: temperature (float, or a tensor/parameter for a learnable one).
        z_estimate: ``"running"`` (default) | ``"minibatch"`` | ``"independent"``.
        e_step: ``"mean"`` (default) | ``"sample"``.
        momentum: weight of the old value in the running average of ``Z_i`` (``z_estimate="running"``).
        symmetric: two directions (image->text and text->image), with separate state per direction.
        normalize: L2-normalize features (cosine similarity).
        gather: gather-with-grad callable for in-batch negatives across ranks (``True``: the library's).
        rank: position of this rank in the gathered batch (default: the process-group rank).
        check_finite: raise :class:`~contrastive_repro.utils.NonFiniteError` on a non-finite loss or state (the
            state is not modified by a step that fails the check). Costs one host sync per step.
        state_dtype: dtype of the ``log_z``/``log_u`` buffers (``module.double()`` also converts them).

    ``forward(anchor, positive, indices, ...)`` returns the scalar M-step loss (mean over anchors, and over the two
    directions when symmetric). ``last_stats`` then holds detached diagnostics: ``"conventional"`` (the value of
    :func:`conventional_contrastive_loss` on the same batch), ``"log_u"`` and ``"log_zbar"`` (``[D, B]``).
    """

    def __init__(self, num_samples: int, shape: float = 1.0, tau: float | torch.Tensor = 0.1,
                 z_estimate: str = "running", e_step: str = "mean", momentum: float = 0.8, symmetric: bool = False,
                 normalize: bool = True, gather: GatherArg = None, rank: int | None = None,
                 check_finite: bool = True, state_dtype: torch.dtype = torch.float32):
        super().__init__()
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not shape > 0:
            raise ValueError(f"shape must be > 0, got {shape}")
        if z_estimate not in Z_ESTIMATES:
            raise ValueError(f"z_estimate must be one of {Z_ESTIMATES}, got {z_estimate!r}")
        if e_step not in E_STEPS:
            raise ValueError(f"e_step must be one of {E_STEPS}, got {e_step!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        _inv_tau(tau)
        self.num_samples = int(num_samples)
        self.shape = float(shape)
        self.tau = tau
        self.z_estimate = z_estimate
        self.e_step = e_step
        self.momentum = float(momentum)
        self.symmetric = bool(symmetric)
        self.normalize = normalize
        self.gather = gather
        self.rank = rank
        self.check_finite = check_finite
        d = 2 if symmetric else 1
        self.register_buffer("log_z", torch.zeros(d, self.num_samples, dtype=state_dtype))
        self.register_buffer("log_u", torch.zeros(d, self.num_samples, dtype=state_dtype))
        self.register_buffer("last_update", torch.full((d, self.num_samples), -1, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._last = None

    # -- state views ------------------------------------------------------------------------------------------
    @property
    def num_directions(self) -> int:
        return 2 if self.symmetric else 1

    @property
    def u(self) -> torch.Tensor:
        """Current auxiliary variables ``u_i`` (``[D, N]``; meaningful where :attr:`seen`)."""
        return self.log_u.exp()

    @property
    def z(self) -> torch.Tensor:
        """Current estimates ``Zbar_i`` (``[D, N]``; meaningful where :attr:`seen`)."""
        return self.log_z.exp()

    @property
    def seen(self) -> torch.Tensor:
        return self.last_update >= 0

    @torch.no_grad()
    def reset_state(self) -> None:
        self.log_z.zero_()
        self.log_u.zero_()
        self.last_update.fill_(-1)
        self.step.zero_()

    def extra_repr(self) -> str:
        return (f"num_samples={self.num_samples}, shape={self.shape}, tau={self.tau}, z_estimate={self.z_estimate!r}, "
                f"e_step={self.e_step!r}, momentum={self.momentum}, symmetric={self.symmetric}")

    # -- forward ----------------------------------------------------------------------------------------------
    def _check_indices(self, indices, b: int) -> torch.Tensor:
        """``indices`` as a 1-D int64 tensor on the state's device: integers (not floats or booleans), one per
        sample of the batch, in ``[0, num_samples)``, without duplicates (a sample twice in one batch would make
        its state update depend on write order). Errors name the offending values."""
        t = torch.as_tensor(indices, device=self.log_z.device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"indices must be integer dataset indices, got dtype {t.dtype}")
        t = t.long().reshape(-1)
        if t.numel() != b:
            raise ValueError(f"indices has {t.numel()} entries for a batch of {b}")
        lo, hi = torch.aminmax(t)
        if lo.item() < 0 or hi.item() >= self.num_samples:
            bad = t[(t < 0) | (t >= self.num_samples)]
            raise IndexError(f"indices must lie in [0, {self.num_samples}), got {sorted(set(bad.tolist()))[:10]}")
        uniq, counts = torch.unique(t, return_counts=True)
        if uniq.numel() != b:
            raise ValueError(f"indices has duplicates in one batch: {uniq[counts > 1].tolist()[:10]}")
        return t

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, indices: torch.Tensor | None = None, *,
                negatives_anchor: torch.Tensor | None = None, negatives_positive: torch.Tensor | None = None,
                estimate_negatives_anchor: torch.Tensor | None = None,
                estimate_negatives_positive: torch.Tensor | None = None, u: torch.Tensor | None = None,
                z_estimate: str | None = None, e_step: str | None = None,
                update_state: bool | None = None) -> torch.Tensor:
        """One stochastic-EM step's loss.

        Args:
            anchor, positive: ``[B, d]`` (for the symmetric loss: image and text features).
            indices: ``[B]`` global dataset indices of the samples (needed by ``z_estimate="running"``).
            negatives_anchor: ``[M, d]`` explicit negatives for the anchor->positive direction instead of the
                in-batch ones (not gathered); ``negatives_positive`` likewise for positive->anchor.
            estimate_negatives_anchor / _positive: separate negatives for the E-step's estimate of ``Z_i``
                (required by ``"independent"``, optional for ``"running"``, rejected by ``"minibatch"``; used as
                given, not gathered).
            u: fix the auxiliary variables (``[B]`` or ``[D, B]``) and skip the E-step (no state change).
            z_estimate, e_step: override the constructor's choice for this call.
            update_state: write the E-step's results into the state (default: ``self.training``).
        """
        z_estimate = self.z_estimate if z_estimate is None else z_estimate
        e_step = self.e_step if e_step is None else e_step
        if z_estimate not in Z_ESTIMATES:
            raise ValueError(f"z_estimate must be one of {Z_ESTIMATES}, got {z_estimate!r}")
        if anchor.dim() != 2 or anchor.shape != positive.shape:
            raise ValueError(f"anchor and positive must both be [B, d] with the same shape, got "
                             f"{tuple(anchor.shape)} and {tuple(positive.shape)}")
        b, nd = anchor.shape[0], self.num_directions
        if b == 0:
            raise ValueError("empty batch: anchor and positive have 0 rows")
        for name, x in (("anchor", anchor), ("positive", positive)):
            if not x.is_floating_point():
                raise TypeError(f"{name} must be floating-point features, got dtype {x.dtype}")
        update_state = self.training if update_state is None else update_state
        if indices is not None:
            indices = self._check_indices(indices, b)
        est_negs = [estimate_negatives_anchor, estimate_negatives_positive][:nd]
        if u is None:
            if z_estimate == "running" and indices is None:
                raise ValueError("z_estimate='running' needs the samples' dataset indices")
            if z_estimate == "independent" and any(e is None for e in est_negs):
                raise ValueError("z_estimate='independent' needs estimate_negatives_anchor"
                                 + (" and estimate_negatives_positive" if nd == 2 else ""))
            if z_estimate == "minibatch" and any(e is not None for e in est_negs):
                raise ValueError("z_estimate='minibatch' uses the M-step's negatives; estimate_negatives were given")

        gather, rank = resolve_gather(self.gather, self.rank)
        inv_tau = _inv_tau(self.tau)
        a, p = _prep(anchor, self.normalize), _prep(positive, self.normalize)
        na = None if negatives_anchor is None else _prep(negatives_anchor, self.normalize)
        npos = None if negatives_positive is None else _prep(negatives_positive, self.normalize)
        dirs = pair_scores(a, p, inv_tau, symmetric=self.symmetric, negatives_anchor=na, negatives_positive=npos,
                           gather=gather, rank=rank)
        log_zhat = torch.stack([lz for _, lz in dirs])                      # [D, B], with grad
        pos = dirs[0][0]

        # ---- E-step (no grad) ----
        new_state = None
        with torch.no_grad():
            if u is not None:
                u = torch.as_tensor(u, dtype=log_zhat.dtype, device=log_zhat.device)
                log_u = torch.log(u).expand(nd, b) if u.dim() <= 1 else torch.log(u)
                log_zbar = math.log(self.shape) - log_u
            else:
                fresh = log_zhat.detach()
                if z_estimate != "minibatch" and any(e is not None for e in est_negs):
                    rows = []
                    for k, x in enumerate((a, p)[:nd]):
                        e = est_negs[k]
                        rows.append(fresh[k] if e is None else
                                    log_mean_exp((x * inv_tau) @ _prep(e, self.normalize).T, dim=1))
                    fresh = torch.stack(rows)
                if z_estimate == "running":
                    old = self.log_z[:, indices].to(fresh.dtype)
                    seen = self.last_update[:, indices] >= 0
                    log_zbar = ema_log(old, fresh, self.momentum, seen)
                else:
                    log_zbar = fresh
                log_u = e_step_log_u(log_zbar, self.shape, e_step)
                if update_state and indices is not None:
                    new_state = (log_zbar, log_u)

        # ---- M-step ----
        loss = decomposable_terms(pos.unsqueeze(0), log_zhat, log_u).mean()     # mean over [D, B]
        if self.check_finite:
            probe = loss.detach() if new_state is None else loss.detach() + new_state[0].sum()
            if not bool(torch.isfinite(probe)):                              # one host sync
                check_finite(loss, "decomposable contrastive loss")
                raise NonFiniteError("decomposable contrastive loss: the E-step's estimate of Z is not finite")
        if new_state is not None:
            with torch.no_grad():
                self.log_z[:, indices] = new_state[0].to(self.log_z.dtype)
                self.log_u[:, indices] = new_state[1].to(self.log_u.dtype)
                self.last_update[:, indices] = self.step
                self.step += 1
        self._last = (pos.detach(), log_zhat.detach(), log_u, log_zbar)
        return loss

    @property
    def last_stats(self) -> dict[str, torch.Tensor]:
        """Diagnostics of the last ``forward`` (detached): ``"conventional"`` (the value of
        :func:`conventional_contrastive_loss` on that batch), ``"log_u"`` and ``"log_zbar"`` (``[D, B]``)."""
        if self._last is None:
            return {}
        pos, log_zhat, log_u, log_zbar = self._last
        return {"conventional": conventional_terms(pos.unsqueeze(0), log_zhat).mean(), "log_u": log_u,
                "log_zbar": log_zbar}

    # -- distributed ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sync_state(self, group=None) -> None:
        """Merge the per-rank replicas of the state so that every rank holds the full, latest state.

        For each row the replica with the most recent ``last_update`` wins (ties go to the lowest rank); rows no
        rank has seen stay unseen. Four all-reduces (three over ``[D, N]`` tensors). A no-op without a process group.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        latest = self.last_update.clone()
        dist.all_reduce(latest, op=dist.ReduceOp.MAX, group=group)
        mine = (self.last_update == latest) & (latest >= 0)
        owner = torch.where(mine, torch.full_like(latest, rank), torch.full_like(latest, world))
        dist.all_reduce(owner, op=dist.ReduceOp.MIN, group=group)
        own = owner == rank
        vals = torch.stack([self.log_z, self.log_u]).to(torch.float64)
        vals = torch.where(own.unsqueeze(0), vals, torch.zeros_like(vals))
        dist.all_reduce(vals, op=dist.ReduceOp.SUM, group=group)
        self.log_z.copy_(vals[0])
        self.log_u.copy_(vals[1])
        self.last_update.copy_(latest)
        step = self.step.clone()
        dist.all_reduce(step, op=dist.ReduceOp.MAX, group=group)
        self.step.copy_(step)
