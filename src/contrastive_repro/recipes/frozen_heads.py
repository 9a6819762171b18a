r"""Small trainable heads on cached frozen features: the batch-size study and the image-text study of notebook 02.

Self-supervised part (``train_ssl_heads``)
-----------------------------------------
Input: frozen features of ``K >= 2`` augmented views per image (``view_final`` of
:func:`contrastive_repro.features.image_features`), reduced once by a fixed PCA fitted on the training images
(part of the frozen encoder: it makes a step cheap). A linear head ``W`` (``[D, p]``, one per seed; all seeds are
trained at once as a batch of heads) maps a view to ``z = normalize(x W)``. Each step draws ``B`` training images and
two different views of each; ``s_ij = <z1_i, z2_j> / tau``; every loss is symmetric (both directions, mean).

Arms (each differs from the next in one thing):

* ``conventional``  ``-s_ii + log sum_j exp(s_ij)``: the positive is in the denominator (InfoNCE / CLIP form).
* ``control``       ``-s_ii + log mean_{j != i} exp(s_ij)``: positive left out, ``Z`` estimated from this batch
                    only (= the decomposable loss with a minibatch E-step; the same form as the two below).
* ``decomposable``  ``-s_ii + u_i Zhat_i`` with ``u_i = 1/Zbar_i``, ``Zbar_i`` a per-image, per-direction running
                    average of ``Zhat_i`` (momentum = weight of the old value; the first visit initializes it).
* ``sampled``       as ``decomposable`` with ``u_i ~ Gamma(1, rate=Zbar_i)`` (stochastic EM).

Optimizer: Adam with the step size ``lr * t0 / (t0 + t)`` (``t0 = lr_decay_steps``): it decays like ``1/t``, so the
iterates settle on the fixed point of the *expected* gradient (where a loss's gradient bias shows) instead of
hovering at a batch-size-dependent noise level, and it does not depend on the run's length, so the run of ``T``
steps is the prefix of the run of ``2T`` steps: the readouts at ``T`` and ``2T`` of one run give the convergence
check "doubling the steps moves the readout by less than a tolerance".

Readouts on held-out images: the full-data objective (the generalized loss with *all* held-out images as negatives,
``-s_ii + log mean_{j != i} exp(s_ij)``, symmetric, on two views) and a ridge linear probe on the head's output for
the clean images (regularization chosen on a validation split of the training images).

Image-text part (``train_clip_heads``)
-------------------------------------
Frozen image and text features, one linear head per tower (per seed), symmetric CLIP loss (positive in the
denominator) or the symmetric decomposable loss with running ``Zbar`` per item and direction; fixed temperature.
Evaluation helpers: zero-shot by prompts, few-shot ridge probes, retrieval recall.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..losses.decomposable import e_step_log_u, ema_log

__all__ = ["SSL_ARMS", "pca_fit", "pca_apply", "pair_losses", "full_data_objective", "ridge_probe",
           "train_ssl_heads", "non_inferior_batch", "CLIP_ARMS", "train_clip_heads", "recall_at_k",
           "zero_shot", "balanced_top1"]

SSL_ARMS = ("conventional", "control", "decomposable", "sampled")
CLIP_ARMS = ("clip", "decomposable")


# ------------------------------------------------------------------------------------------------- features
def pca_fit(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, components)`` of a PCA of ``x`` (``[N, D]``) with ``dim`` components, whitened (unit variance)."""
    x = x.double()
    if not 1 <= dim <= min(x.shape):
        raise ValueError(f"pca dim must be in [1, {min(x.shape)}], got {dim}")
    mean = x.mean(0)
    u, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:dim].T / (s[:dim] / math.sqrt(max(1, x.shape[0] - 1))).clamp_min(1e-8)
    return mean.float(), comps.float()


def pca_apply(x: torch.Tensor, pca: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mean, comps = pca
    return (x.float() - mean) @ comps


# ---------------------------------------------------------------------------------------------------- losses
def _off_diag_log_mean_exp(logits: torch.Tensor) -> torch.Tensor:
    """``log mean_{j != i} exp(logits_ij)`` over the last dim, ``[..., B, B] -> [..., B]``."""
    b = logits.shape[-1]
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    return torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=-1) - math.log(b - 1)


def pair_losses(logits: torch.Tensor, arm: str, log_u: torch.Tensor | None = None) -> torch.Tensor:
    """Per-anchor loss of one direction, ``logits`` ``[..., B, B]`` (row i: anchor i, column i: its positive).

    ``conventional``: ``-s_ii + logsumexp_j s_ij``; ``control``: ``-s_ii + log mean_{j!=i} exp s_ij``;
    ``decomposable`` / ``sampled``: ``-s_ii + exp(log_u_i) * mean_{j!=i} exp(s_ij)`` (``log_u`` ``[..., B]``)."""
    pos = logits.diagonal(dim1=-2, dim2=-1)
    if arm == "conventional" or arm == "clip":
        return torch.logsumexp(logits, dim=-1) - pos
    log_zhat = _off_diag_log_mean_exp(logits)
    if arm == "control":
        return log_zhat - pos
    if arm in ("decomposable", "sampled"):
        if log_u is None:
            raise ValueError(f"arm {arm!r} needs log_u")
        return torch.exp(log_u + log_zhat) - pos
    raise ValueError(f"arm must be one of {SSL_ARMS + CLIP_ARMS}, got {arm!r}")


def full_data_objective(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The generalized loss on held-out data, symmetric: ``mean_i [-s_ii + log mean_{j != i} exp(s_ij)]`` with all
    other held-out items as negatives; ``z1, z2`` ``[..., M, p]`` normalized -> ``[...]``."""
    logits = z1 @ z2.transpose(-1, -2) / tau
    a = (_off_diag_log_mean_exp(logits) - logits.diagonal(dim1=-2, dim2=-1)).mean(-1)
    lt = logits.transpose(-1, -2)
    b = (_off_diag_log_mean_exp(lt) - lt.diagonal(dim1=-2, dim2=-1)).mean(-1)
    return 0.5 * (a + b)


# ----------------------------------------------------------------------------------------------------- probe
def _ridge_fit(z: torch.Tensor, y1h: torch.Tensor, lam: float) -> torch.Tensor:
    zb = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1).double()
    a = zb.transpose(-1, -2) @ zb
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    eye[-1, -1] = 0.0                                                       # the bias is not penalized
    return torch.linalg.solve(a + lam * zb.shape[-2] * eye, zb.transpose(-1, -2) @ y1h.double())


def _ridge_predict(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    zb = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1).double()
    return (zb @ w).argmax(-1)


def ridge_probe(z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor, y_test: torch.Tensor,
                lams: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), val_fraction: float = 0.2,
                seed: int = 0) -> dict:
    """Ridge-regression classifier (one-hot targets, argmax) on ``[..., N, p]`` features (a batch of heads).

    The penalty (``lam`` times ``N``) is chosen per head on a validation split carved from the training rows, then
    the probe is refit on all training rows. Returns ``{"acc": [...] test accuracy, "lam": [...] chosen}``."""
    y_train, y_test = y_train.long(), y_test.long()
    c = int(max(y_train.max(), y_test.max())) + 1
    y1h = F.one_hot(y_train, c).float()
    squeeze = z_train.dim() == 2
    if squeeze:
        z_train, z_test = z_train.unsqueeze(0), z_test.unsqueeze(0)
    n = z_train.shape[-2]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * n)))
    va, tr = perm[:n_val], perm[n_val:]
    best = None
    for lam in lams:
        w = _ridge_fit(z_train[:, tr], y1h[tr], float(lam))
        acc = (_ridge_predict(z_train[:, va], w) == y_train[va]).double().mean(-1)   # [S]
        best = (acc, torch.full_like(acc, float(lam))) if best is None else \
            (torch.maximum(best[0], acc), torch.where(acc > best[0], torch.full_like(acc, float(lam)), best[1]))
    accs, chosen = [], best[1].tolist()
    for s in range(z_train.shape[0]):
        w = _ridge_fit(z_train[s], y1h, chosen[s])
        accs.append(float((_ridge_predict(z_test[s], w) == y_test).double().mean()))
    return {"acc": accs[0] if squeeze else accs, "lam": chosen[0] if squeeze else chosen}


# ---------------------------------------------------------------------------------------------- SSL training
def _adam(params, grads, state, lr, t, betas=(0.9, 0.999), eps=1e-8):
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state.setdefault(i, (torch.zeros_like(p), torch.zeros_like(p)))
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        mh, vh = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        p.sub_(lr * mh / (vh.sqrt() + eps))


def _e_step(log_zhat, state_log_z, seen, idx, momentum, e_step):
    """Running E-step for anchors ``idx`` (``[S, B]``): returns ``log u`` and updates the state in place."""
    old = state_log_z.gather(1, idx)
    was = seen.gather(1, idx)
    new = ema_log(old, log_zhat.detach(), momentum, was)
    state_log_z.scatter_(1, idx, new)
    seen.scatter_(1, idx, torch.ones_like(was))
    return e_step_log_u(new, 1.0, e_step)


def _readout(w, views, x, y, train_idx, test_idx, tau, lams):
    """Readouts of heads ``w`` ``[S, D, p]`` on each seed's split of the pool (``train_idx`` / ``test_idx``
    ``[S, N]`` / ``[S, M]``)."""
    with torch.no_grad():
        tv = views[test_idx]                                                   # [S, M, K, D]
        z1 = F.normalize(tv[:, :, 0] @ w, dim=-1)
        z2 = F.normalize(tv[:, :, 1] @ w, dim=-1)
        obj = full_data_objective(z1, z2, tau).tolist()
        ztr, zte = F.normalize(x[train_idx] @ w, dim=-1), F.normalize(x[test_idx] @ w, dim=-1)
        accs, lams_out = [], []
        for s in range(w.shape[0]):
            r = ridge_probe(ztr[s], y[train_idx[s]], zte[s], y[test_idx[s]], lams=lams, seed=s)
            accs.append(r["acc"])
            lams_out.append(r["lam"])
    return {"objective": obj, "probe": accs, "probe_lam": lams_out}


def split_pool(n_pool: int, n_test: int, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per seed, a random train/test partition of a pool of ``n_pool`` items: ``[S, n_pool - n_test]``,
    ``[S, n_test]`` (the split varies with the seed as well as the initialization)."""
    if not 0 < n_test < n_pool:
        raise ValueError(f"need 0 < n_test < n_pool, got n_test={n_test}, n_pool={n_pool}")
    perms = [torch.randperm(n_pool, generator=torch.Generator().manual_seed(5000 + int(s))) for s in seeds]
    return torch.stack([p[n_test:] for p in perms]), torch.stack([p[:n_test] for p in perms])


def _init_heads(seeds, d, proj_dim):
    return torch.stack([torch.randn(d, proj_dim, generator=torch.Generator().manual_seed(int(s))) / math.sqrt(d)
                        for s in seeds])


def train_ssl_heads(arm: str, views: torch.Tensor, x: torch.Tensor, y: torch.Tensor, train_idx: torch.Tensor,
                    test_idx: torch.Tensor, *, batch_size: int, steps: int, seeds: Sequence[int],
                    proj_dim: int = 64, tau: float = 0.2, lr: float = 1e-2, lr_decay_steps: float = 100.0,
                    momentum: float = 0.9, eval_at: Sequence[int] | None = None,
                    probe_lams: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1)) -> dict:
    """Train one linear head per seed (all at once) with ``arm``.

    ``views`` ``[P, K, D]`` (``K >= 2`` augmented views of the pool's images), ``x`` ``[P, D]`` clean features,
    ``y`` ``[P]`` labels (probe only), ``train_idx`` / ``test_idx`` per-seed splits (:func:`split_pool`). Per seed:
    its own head initialization and batch/view stream, the same for every arm (paired). The readout is taken at
    every step of ``eval_at`` (default ``steps/2`` and ``steps``: the doubling check).
    Returns ``{"eval": {step: {"objective", "probe", "probe_lam"}}, "seconds", ...}`` with per-seed lists."""
    if arm not in SSL_ARMS:
        raise ValueError(f"arm must be one of {SSL_ARMS}, got {arm!r}")
    p_n, k, d = views.shape
    seeds = [int(s) for s in seeds]
    s_n, n = len(seeds), train_idx.shape[1]
    if k < 2:
        raise ValueError(f"views needs >= 2 views per image, got {k}")
    if train_idx.shape[0] != s_n or test_idx.shape[0] != s_n:
        raise ValueError("train_idx / test_idx need one row per seed")
    if not 2 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [2, {n}], got {batch_size}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    eval_at = sorted({int(t) for t in (eval_at or (max(1, steps // 2), steps))})
    if eval_at[0] < 1 or eval_at[-1] > steps:
        raise ValueError(f"eval_at must lie in [1, {steps}], got {eval_at}")
    gens = [torch.Generator().manual_seed(1000 + s) for s in seeds]
    w = _init_heads(seeds, d, proj_dim)
    log_z = torch.zeros(s_n, 2, p_n)
    seen = torch.zeros(s_n, 2, p_n, dtype=torch.bool)
    state: dict = {}
    out, t0 = {}, time.perf_counter()
    with torch.random.fork_rng(devices=[]):                                   # e_step "sample": global RNG
        torch.manual_seed(seeds[0] + 7)
        for t in range(1, steps + 1):
            pos = torch.stack([torch.randperm(n, generator=g)[:batch_size] for g in gens])         # [S, B]
            idx = train_idx.gather(1, pos)                                                         # pool indices
            v1 = torch.stack([torch.randint(0, k, (batch_size,), generator=g) for g in gens])
            v2 = torch.stack([torch.randint(0, k - 1, (batch_size,), generator=g) for g in gens])
            v2 = v2 + (v2 >= v1).long()                                                            # v2 != v1
            x1, x2 = views[idx, v1], views[idx, v2]                                                # [S, B, D]
            w.requires_grad_(True)
            z1, z2 = F.normalize(x1 @ w, dim=-1), F.normalize(x2 @ w, dim=-1)
            logits = z1 @ z2.transpose(1, 2) / tau                                                 # [S, B, B]
            lt = logits.transpose(1, 2)
            if arm in ("decomposable", "sampled"):
                e = "mean" if arm == "decomposable" else "sample"
                with torch.no_grad():
                    lu1 = _e_step(_off_diag_log_mean_exp(logits), log_z[:, 0], seen[:, 0], idx, momentum, e)
                    lu2 = _e_step(_off_diag_log_mean_exp(lt), log_z[:, 1], seen[:, 1], idx, momentum, e)
                loss = 0.5 * (pair_losses(logits, arm, lu1) + pair_losses(lt, arm, lu2)).mean(-1)
            else:
                loss = 0.5 * (pair_losses(logits, arm) + pair_losses(lt, arm)).mean(-1)
            (g,) = torch.autograd.grad(loss.sum(), (w,))
            w = w.detach()
            with torch.no_grad():
                _adam([w], [g], state, lr * lr_decay_steps / (lr_decay_steps + t - 1), t)
            if t in eval_at:
                out[t] = _readout(w, views, x, y, train_idx, test_idx, tau, probe_lams)
    return {"arm": arm, "batch_size": int(batch_size), "steps": int(steps), "seeds": seeds, "eval": out,
            "seconds": round(time.perf_counter() - t0, 2)}


def untrained_readout(views, x, y, train_idx, test_idx, *, seeds, proj_dim=64, tau=0.2,
                      probe_lams=(1e-4, 1e-3, 1e-2, 1e-1)) -> dict:
    """The readout of the random-init heads (step 0)."""
    return _readout(_init_heads(seeds, x.shape[-1], proj_dim), views, x, y, train_idx, test_idx, tau, probe_lams)


def no_head_probe(x, y, train_idx, test_idx, probe_lams=(1e-4, 1e-3, 1e-2, 1e-1)) -> list[float]:
    """Per seed, the ridge probe on the (normalized) frozen features themselves, without a head."""
    z = F.normalize(x, dim=-1)
    return [ridge_probe(z[tr], y[tr], z[te], y[te], lams=probe_lams, seed=s)["acc"]
            for s, (tr, te) in enumerate(zip(train_idx, test_idx))]


# ------------------------------------------------------------------------------------------ the claim's test
def non_inferior_batch(results: dict, batch_sizes: Sequence[int], arm: str, reference: str = "conventional", *,
                       direction: int, margin: float, alpha: float = 0.05) -> dict:
    """The smallest batch ``B`` at which ``arm`` is not worse than ``reference`` at the largest batch, by a paired
    non-inferiority test (:func:`contrastive_repro.stats.paired_verdict` with ``margin``).

    ``results[(arm, B)]`` are per-seed readouts (same seeds, same order). ``direction`` +1 when higher is better.
    Returns ``{"batch": smallest B with verdict reproduced (None if none), "verdicts": {B: PairedVerdict}}``; the
    scan runs over all batch sizes, and the smallest B is reported only if every larger B also passes
    (a monotone reading: an isolated pass below a failure is not counted). A cell missing from ``results`` (e.g.
    one that did not converge) gets verdict ``None`` and stops the scan like a failure; a missing reference gives
    ``None`` everywhere."""
    from ..stats import paired_verdict

    bs = sorted(int(b) for b in batch_sizes)
    if (reference, bs[-1]) not in results:                          # the reference itself is not usable
        return {"batch": None, "verdicts": {b: None for b in bs}}
    ref = results[(reference, bs[-1])]
    verdicts = {b: paired_verdict(ref, results[(arm, b)], direction=direction, alpha=alpha, margin=margin)
                if (arm, b) in results else None for b in bs}
    smallest = None
    for b in reversed(bs):
        if verdicts[b] is None or verdicts[b].verdict != "reproduced":
            break
        smallest = b
    return {"batch": smallest, "verdicts": verdicts}


# ----------------------------------------------------------------------------------------------- image-text
def train_clip_heads(arm: str, img: torch.Tensor, txt: torch.Tensor, *, batch_size: int, steps: int,
                     seeds: Sequence[int], proj_dim: int = 64, tau: float = 0.07, lr: float = 1e-3,
                     lr_decay_steps: float = 100.0, momentum: float = 0.9) -> dict:
    """One linear head per tower and seed on frozen image (``[N, Di]``) / text (``[N, Dt]``) features of the
    training pairs; symmetric CLIP loss (``clip``) or symmetric decomposable loss (running ``Zbar`` per item and
    direction). Returns ``{"w_img": [S, Di, p], "w_txt": [S, Dt, p], "seconds"}``."""
    if arm not in CLIP_ARMS:
        raise ValueError(f"arm must be one of {CLIP_ARMS}, got {arm!r}")
    n = img.shape[0]
    if not 2 <= batch_size <= n or txt.shape[0] != n:
        raise ValueError(f"need img/txt with the same N >= batch_size >= 2, got {img.shape[0]}, {txt.shape[0]}, "
                         f"batch_size={batch_size}")
    seeds = [int(s) for s in seeds]
    s_n = len(seeds)
    gens = [torch.Generator().manual_seed(2000 + s) for s in seeds]

    def init(dim, off):
        return torch.stack([torch.randn(dim, proj_dim, generator=torch.Generator().manual_seed(s + off))
                            / math.sqrt(dim) for s in seeds])

    wi, wt = init(img.shape[1], 0), init(txt.shape[1], 10_000)
    log_z = torch.zeros(s_n, 2, n)
    seen = torch.zeros(s_n, 2, n, dtype=torch.bool)
    state: dict = {}
    t0 = time.perf_counter()
    for t in range(1, steps + 1):
        idx = torch.stack([torch.randperm(n, generator=g)[:batch_size] for g in gens])
        wi.requires_grad_(True)
        wt.requires_grad_(True)
        zi = F.normalize(img[idx] @ wi, dim=-1)
        zt = F.normalize(txt[idx] @ wt, dim=-1)
        logits = zi @ zt.transpose(1, 2) / tau
        lt = logits.transpose(1, 2)
        if arm == "decomposable":
            with torch.no_grad():
                lu1 = _e_step(_off_diag_log_mean_exp(logits), log_z[:, 0], seen[:, 0], idx, momentum, "mean")
                lu2 = _e_step(_off_diag_log_mean_exp(lt), log_z[:, 1], seen[:, 1], idx, momentum, "mean")
            loss = 0.5 * (pair_losses(logits, arm, lu1) + pair_losses(lt, arm, lu2)).mean(-1)
        else:
            loss = 0.5 * (pair_losses(logits, arm) + pair_losses(lt, arm)).mean(-1)
        gi, gt = torch.autograd.grad(loss.sum(), (wi, wt))
        wi, wt = wi.detach(), wt.detach()
        with torch.no_grad():
            _adam([wi, wt], [gi, gt], state, lr * lr_decay_steps / (lr_decay_steps + t - 1), t)
    return {"w_img": wi, "w_txt": wt, "seconds": round(time.perf_counter() - t0, 2)}


def recall_at_k(sim: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k of ``sim`` ``[..., Q, N]`` whose correct match of query ``i`` is item ``i`` -> ``{k: [...]}``."""
    correct = sim.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    rank = (sim > correct).sum(-1)                                          # 0 = top
    return {int(k): (rank < k).double().mean(-1) for k in ks}


def zero_shot(z_img: torch.Tensor, z_prompts: torch.Tensor) -> torch.Tensor:
    """Predicted class = the prompt embedding most similar to the image embedding (``[..., N]``)."""
    return (z_img @ z_prompts.transpose(-1, -2)).argmax(-1)


def balanced_top1(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in ``labels``."""
    pred, labels = pred.reshape(-1), labels.reshape(-1)
    return float(np.mean([float((pred[labels == c] == c).double().mean()) for c in labels.unique()]))


# ------------------------------------------------------------------------------------------ data and sweeps
def fashion_pool(n_pool: int, *, resolution: int = 32, views: int = 2, pca_dim: int = 128, pretrained: bool = True,
                 progress: bool = False, offset: int = 0) -> dict:
    """A fixed random pool of ``n_pool`` Fashion-MNIST training images (positions ``offset .. offset + n_pool`` of a
    random permutation with generator seed 0, so pools with disjoint ranges share no image) through the frozen
    EfficientNet-Lite0 (``pretrained=False``: the same network at random init -- a gate), ``views`` augmented views
    each, reduced by a whitened PCA fitted on the clean features of the pool (part of the frozen encoder; labels are
    never used). Returns ``{"views" [P, K, pca_dim], "x" [P, pca_dim], "y" [P], "raw_dim", "seconds"}``."""
    from ..data import load_fashion_mnist
    from ..features import image_features

    if views < 2:
        raise ValueError(f"views must be >= 2 (two views make a positive pair), got {views}")
    x, y = load_fashion_mnist("train")
    if not 2 <= n_pool <= len(x) - offset or offset < 0:
        raise ValueError(f"need 2 <= n_pool <= {len(x)} - offset and offset >= 0, got n_pool={n_pool}, "
                         f"offset={offset}")
    sel = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[offset:offset + n_pool]
    t0 = time.perf_counter()
    name = f"fashion-mnist-pool{n_pool}" + (f"-at{offset}" if offset else "")
    f = image_features(x[sel].unsqueeze(1).contiguous(), name, layers=("final",),
                       resolution=resolution, views=views, pretrained=pretrained, progress=progress)
    pca = pca_fit(f["final"], min(pca_dim, n_pool - 1, f["final"].shape[1]))
    return {"views": pca_apply(f["view_final"], pca), "x": pca_apply(f["final"], pca), "y": y[sel].clone(),
            "raw_dim": int(f["final"].shape[1]), "seconds": round(time.perf_counter() - t0, 2)}


def steps_for_batch(batch_size: int, largest: int, steps_at_largest: int) -> int:
    """``T(B) = steps_at_largest * sqrt(largest / B)``: smaller, noisier batches get more (cheaper) steps."""
    if batch_size < 1 or largest < batch_size:
        raise ValueError(f"need 1 <= batch_size <= largest, got {batch_size}, {largest}")
    return int(math.ceil(steps_at_largest * math.sqrt(largest / batch_size)))


def family_split(captions: Sequence[str], test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/test item indices with whole *families* on one side: a family is the caption before ``":"``
    (``"waving hand: medium skin tone"`` -> ``"waving hand"``), so skin-tone and other variants never straddle the
    split. A random ``test_fraction`` of the families (by ``seed``) is held out."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    fam = [c.split(":")[0].strip().lower() for c in captions]
    names = sorted(set(fam))
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(7000 + int(seed))).tolist()
    test_fams = {names[i] for i in perm[:max(1, int(round(test_fraction * len(names))))]}
    te = [i for i, f in enumerate(fam) if f in test_fams]
    tr = [i for i, f in enumerate(fam) if f not in test_fams]
    return torch.tensor(tr), torch.tensor(te)


def few_shot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """``shots`` random items per class (classes with fewer items give all of theirs)."""
    g = torch.Generator().manual_seed(9000 + int(seed))
    out = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:shots]])
    return torch.cat(out)


def evaluate_clip_heads(w_img, w_txt, img_te, txt_te, sub_te, grp_te, prompts_sub, prompts_grp, img_tr, sub_tr, *,
                        shots: Sequence[int] = (1, 5), seed: int = 0, probe_lam: float = 1e-2) -> dict:
    """Held-out metrics of one pair of heads (``w_img`` ``[Di, p]``, ``w_txt`` ``[Dt, p]``).

    ``prompts_sub`` ``[C_sub, Dt]``: one prompt feature per sub-group; ``prompts_grp``: a list (one per group) of
    ``[n_g, Dt]`` prompt features whose normalized head embeddings are averaged (a prompt ensemble). Zero-shot
    top-1 and balanced accuracy for sub-groups and groups, few-shot ridge probes (``shots`` training items per
    sub-group, fixed ``probe_lam``), and i2t / t2i Recall@1/5/10 among the held-out pairs."""
    with torch.no_grad():
        zi = F.normalize(img_te @ w_img, dim=-1)
        zt = F.normalize(txt_te @ w_txt, dim=-1)
        zs = F.normalize(prompts_sub @ w_txt, dim=-1)
        zg = F.normalize(torch.stack([F.normalize(p @ w_txt, dim=-1).mean(0) for p in prompts_grp]), dim=-1)
        out = {}
        for name, zp, lab in (("subgroup", zs, sub_te), ("group", zg, grp_te)):
            pred = zero_shot(zi, zp)
            out[f"zs {name} top1"] = float((pred == lab).double().mean())
            out[f"zs {name} balanced"] = balanced_top1(pred, lab)
        ztr = F.normalize(img_tr @ w_img, dim=-1)
        for k in shots:
            pick = few_shot_indices(sub_tr, int(k), seed)
            r = ridge_probe(ztr[pick], sub_tr[pick], zi, sub_te, lams=(probe_lam,), val_fraction=0.0001)
            out[f"{k}-shot subgroup"] = float(r["acc"])
        sim = zi @ zt.T
        for k, v in recall_at_k(sim).items():
            out[f"i2t R@{k}"] = float(v)
        for k, v in recall_at_k(sim.T).items():
            out[f"t2i R@{k}"] = float(v)
    return out


# ---------------------------------------------------------------------------------------- multi-process form
def sharded_symmetric_loss(za: torch.Tensor, zb: torch.Tensor, arm: str, tau: float, *, gather=None,
                           rank: int | None = None, log_u: tuple[torch.Tensor, torch.Tensor] | None = None
                           ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The symmetric loss of this rank's ``B`` pairs (``za``, ``zb`` ``[B, p]``, normalized) against the whole
    global batch: candidates are gathered *with gradient* (``gather=True``:
    :func:`contrastive_repro.distributed.all_gather_with_grad`), row ``i`` of this rank is global row
    ``rank * B + i`` and its positive sits in that column. ``log_u``: ``(a->b, b->a)`` ``[B]`` for the decomposable
    arms. Returns ``(mean over this rank's anchors, (log Zhat a->b, log Zhat b->a))`` -- the ``log Zhat`` feed the
    E-step. The mean over ranks of the returned losses is the single-process loss of the concatenated batch, and
    with DDP's gradient averaging (or an all-reduce mean of the gradients) so is the gradient."""
    from ..losses.infonce import resolve_gather

    gather, rank = resolve_gather(gather, rank)
    b = za.shape[0]
    all_a, all_b = (za, zb) if gather is None else (gather(za), gather(zb))
    cols = torch.arange(b, device=za.device) + (0 if gather is None else rank * b)
    terms, zhats = [], []
    for k, (anc, cand) in enumerate(((za, all_b), (zb, all_a))):
        logits = anc @ cand.T / tau                                      # [B, W*B]
        pos = logits.gather(1, cols.unsqueeze(1)).squeeze(1)
        own = torch.zeros_like(logits, dtype=torch.bool)
        own[torch.arange(b), cols] = True
        log_zhat = torch.logsumexp(logits.masked_fill(own, float("-inf")), dim=1) - math.log(cand.shape[0] - 1)
        zhats.append(log_zhat.detach())
        if arm in ("conventional", "clip"):
            terms.append(torch.logsumexp(logits, dim=1) - pos)
        elif arm == "control":
            terms.append(log_zhat - pos)
        elif arm in ("decomposable", "sampled"):
            if log_u is None:
                raise ValueError(f"arm {arm!r} needs log_u")
            terms.append(torch.exp(log_u[k] + log_zhat) - pos)
        else:
            raise ValueError(f"arm must be one of {SSL_ARMS + CLIP_ARMS}, got {arm!r}")
    return 0.5 * (terms[0] + terms[1]).mean(), (zhats[0], zhats[1])


def choose_momentum(candidates: Sequence[float], pool: dict, n_test: int, seeds: Sequence[int], *, batch_size: int,
                    steps: int, **kw) -> dict:
    """The E-step momentum of the decomposable arm, chosen on a *validation pool* (other images than the study's):
    the candidate with the lowest mean held-out objective at ``batch_size`` over ``seeds`` (ties: the first).
    Returns ``{"chosen", "scores": {momentum: mean objective}}``."""
    if not candidates:
        raise ValueError("choose_momentum needs at least one candidate")
    tr, te = split_pool(pool["x"].shape[0], n_test, seeds)
    scores = {}
    for m in candidates:
        if not 0.0 <= float(m) < 1.0:
            raise ValueError(f"momentum candidates must be in [0, 1), got {m!r}")
        r = train_ssl_heads("decomposable", pool["views"], pool["x"], pool["y"], tr, te, batch_size=batch_size,
                            steps=steps, seeds=seeds, momentum=float(m), eval_at=[steps], **kw)
        scores[float(m)] = float(np.mean(r["eval"][steps]["objective"]))
    return {"chosen": min(scores, key=scores.get), "scores": scores}


# ------------------------------------------------------------------ every arm at once, trained to convergence
def _doubling_schedule(start: int, cap: int) -> list[int]:
    """Readout steps ``start/2, start, 2 start, 4 start, ...`` up to ``cap`` (``cap`` included when the doubling
    lands past it)."""
    if start < 2 or cap < start:
        raise ValueError(f"need 2 <= start <= cap, got start={start}, cap={cap}")
    out, t = [start // 2], start
    while t < cap:
        out.append(t)
        t *= 2
    out.append(min(t, cap))
    return sorted(set(out))


def train_ssl_heads_converged(arms: Sequence[str], views: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                              train_idx: torch.Tensor, test_idx: torch.Tensor, *, batch_size: int,
                              start_steps: int, max_steps: int, tol_objective: float, tol_probe: float,
                              seeds: Sequence[int], proj_dim: int = 64, tau: float = 0.2, lr: float = 1e-2,
                              lr_decay_steps: float = 100.0, momentum: float = 0.9,
                              probe_lams: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1)) -> dict:
    """Train every arm of ``arms`` at one batch size in one batched loop (heads ``[A, S, D, p]``; every arm sees the
    batches and views of :func:`train_ssl_heads` for the same seeds, so a non-sampling arm's run is the same run),
    doubling the steps until each arm has **converged**: readouts at ``start/2, start, 2 start, ...`` and an arm
    converges at the first ``T >= start`` where ``mean_seeds |r(T) - r(T/2)| <= tol`` for both readouts (the step
    size does not depend on the run's length, so ``T/2`` is the same run's prefix). Training stops when every arm has
    converged or at ``max_steps``; an arm that has not converged by then is ``capped`` (its last readout is kept
    but must not be used as converged).

    Returns ``{"arms": {arm: {"converged": bool, "steps": T used, "d_objective", "d_probe", "readout": {objective,
    probe, probe_lam} at T}}, "eval": {step: {arm: readout}}, "steps_run", "seconds"}`` (JSON-ready)."""
    arms = [str(a) for a in arms]
    for a in arms:
        if a not in SSL_ARMS:
            raise ValueError(f"arm must be one of {SSL_ARMS}, got {a!r}")
    if not arms or len(set(arms)) != len(arms):
        raise ValueError(f"arms must be non-empty and distinct, got {arms}")
    if not (tol_objective > 0 and tol_probe > 0):
        raise ValueError(f"tolerances must be > 0, got {tol_objective}, {tol_probe}")
    p_n, k, d = views.shape
    seeds = [int(s) for s in seeds]
    s_n, n, a_n = len(seeds), train_idx.shape[1], len(arms)
    if k < 2 or not 2 <= batch_size <= n:
        raise ValueError(f"need >= 2 views and batch_size in [2, {n}], got {k} views, batch_size={batch_size}")
    sched = _doubling_schedule(int(start_steps), int(max_steps))
    gens = [torch.Generator().manual_seed(1000 + s) for s in seeds]
    w = _init_heads(seeds, d, proj_dim).unsqueeze(0).repeat(a_n, 1, 1, 1)       # [A, S, D, p]
    log_z = torch.zeros(a_n, s_n, 2, p_n)
    seen = torch.zeros(a_n, s_n, 2, p_n, dtype=torch.bool)
    state: dict = {}
    evals, done, t0 = {}, {}, time.perf_counter()
    eye = torch.eye(batch_size, dtype=torch.bool)
    log_b1 = math.log(batch_size - 1)
    t = 0
    with torch.random.fork_rng(devices=[]):                                   # e_step "sample": global RNG
        torch.manual_seed(seeds[0] + 7)
        for t in range(1, sched[-1] + 1):
            pos = torch.stack([torch.randperm(n, generator=g)[:batch_size] for g in gens])         # [S, B]
            idx = train_idx.gather(1, pos)
            v1 = torch.stack([torch.randint(0, k, (batch_size,), generator=g) for g in gens])
            v2 = torch.stack([torch.randint(0, k - 1, (batch_size,), generator=g) for g in gens])
            v2 = v2 + (v2 >= v1).long()
            x1, x2 = views[idx, v1], views[idx, v2]                                                # [S, B, D]
            g = _heads_grad(w, x1, x2, arms, tau, eye, log_b1,
                            lambda i, j, lz: _e_step(lz, log_z[i, :, j], seen[i, :, j], idx, momentum,
                                                     "mean" if arms[i] == "decomposable" else "sample"))
            with torch.no_grad():
                _adam([w], [g], state, lr * lr_decay_steps / (lr_decay_steps + t - 1), t)
            if t in sched:
                evals[t] = {arm: _readout(w[i], views, x, y, train_idx, test_idx, tau, probe_lams)
                            for i, arm in enumerate(arms) if arm not in done}
                half = [s for s in sched if s < t]
                if t >= start_steps and half:
                    prev = evals[half[-1]]
                    for arm in list(evals[t]):
                        d_o = float(np.mean(np.abs(np.subtract(evals[t][arm]["objective"], prev[arm]["objective"]))))
                        d_p = float(np.mean(np.abs(np.subtract(evals[t][arm]["probe"], prev[arm]["probe"]))))
                        ok = d_o <= tol_objective and d_p <= tol_probe
                        if ok or t == sched[-1]:
                            done[arm] = {"converged": ok, "steps": t, "d_objective": d_o, "d_probe": d_p,
                                         "readout": evals[t][arm]}
                if len(done) == a_n:
                    break
    return {"arms": {a: done[a] for a in arms}, "eval": {str(s): v for s, v in evals.items()}, "steps_run": t,
            "batch_size": int(batch_size), "seeds": seeds, "seconds": round(time.perf_counter() - t0, 2)}


@torch.no_grad()
def _heads_grad(w, x1, x2, arms, tau, eye, log_b1, e_step):
    """Gradient w.r.t. the heads ``w`` ``[A, S, D, p]`` of ``sum_{arms, seeds}`` of each arm's symmetric batch loss
    (:func:`pair_losses` in both directions, halved, mean over anchors), by hand. ``e_step(arm_index, direction,
    log_zhat)`` returns the arm's ``log u`` (and updates its running state). Rows: anchors of view 1 against
    candidates of view 2 (direction 0); columns: the other direction (1). Per direction and anchor, the loss
    depends on the logits through ``log Zhat`` (coefficient ``c``: 1 for the control, ``u Zhat`` for the
    decomposable arms, ``sigmoid(log(sum_neg) - s_ii)`` for the conventional one) and the positive."""
    h1, h2 = x1 @ w, x2 @ w                                                    # [A, S, B, p]
    n1, n2 = h1.norm(dim=-1, keepdim=True), h2.norm(dim=-1, keepdim=True)
    z1, z2 = h1 / n1, h2 / n2
    logits = z1 @ z2.transpose(-1, -2) / tau                                   # [A, S, B, B]
    pos = logits.diagonal(dim1=-2, dim2=-1).clone()
    off = logits.masked_fill_(eye, float("-inf"))
    lse = [torch.logsumexp(off, dim=-1), torch.logsumexp(off, dim=-2)]        # rows, columns
    coef = [torch.empty_like(pos), torch.empty_like(pos)]
    dpos = torch.zeros_like(pos)
    for i, arm in enumerate(arms):
        for j in (0, 1):
            if arm == "conventional":
                sig = torch.sigmoid(lse[j][i] - pos[i])
                coef[j][i], dpos[i] = sig, dpos[i] - sig
            elif arm == "control":
                coef[j][i], dpos[i] = 1.0, dpos[i] - 1.0
            else:
                lz = lse[j][i] - log_b1
                coef[j][i], dpos[i] = torch.exp(e_step(i, j, lz) + lz), dpos[i] - 1.0
    b = pos.shape[-1]
    scale = 0.5 / b
    p_r = torch.exp(off - lse[0].unsqueeze(-1)).mul_((coef[0] * scale).unsqueeze(-1))
    p_r.add_(torch.exp(off - lse[1].unsqueeze(-2)).mul_((coef[1] * scale).unsqueeze(-2)))
    dl = p_r
    dl.diagonal(dim1=-2, dim2=-1).copy_(dpos * scale)
    dl.div_(tau)
    dz1, dz2 = dl @ z2, dl.transpose(-1, -2) @ z1
    dh1 = (dz1 - z1 * (z1 * dz1).sum(-1, keepdim=True)) / n1
    dh2 = (dz2 - z2 * (z2 * dz2).sum(-1, keepdim=True)) / n2
    return x1.transpose(-1, -2) @ dh1 + x2.transpose(-1, -2) @ dh2           # [A, S, D, p]


def _converged_job(args):
    arms, b, pool, train_idx, test_idx, kw = args
    torch.set_num_threads(1)
    return b, train_ssl_heads_converged(arms, pool["views"], pool["x"], pool["y"], train_idx, test_idx,
                                        batch_size=b, **kw)


def converged_sweep(arms: Sequence[str], batch_sizes: Sequence[int], pool: dict, train_idx, test_idx, *,
                    steps_at_largest: int, max_factor: int, workers: int = 1, on_result=None, **kw) -> dict:
    """:func:`train_ssl_heads_converged` at every batch size (all arms at once), starting at
    ``T(B) = steps_for_batch(B, max(batch_sizes), steps_at_largest)`` and capped at ``max_factor * T(B)``;
    ``{B: result}``. ``workers > 1``: that many processes, the longest jobs first. ``on_result(B, result)`` is
    called as each finishes (to store it)."""
    if max_factor < 1:
        raise ValueError(f"max_factor must be >= 1, got {max_factor}")
    bs = sorted(int(b) for b in batch_sizes)
    todo = []
    for b in bs:
        t = steps_for_batch(b, bs[-1], steps_at_largest)
        todo.append((list(arms), b, pool, train_idx, test_idx, dict(kw, start_steps=t, max_steps=max_factor * t)))
    todo.sort(key=lambda j: -j[-1]["start_steps"])
    out = {}

    def done(b, r):
        out[b] = r
        if on_result is not None:
            on_result(b, r)

    if workers <= 1 or len(todo) <= 1:
        for j in todo:
            done(*_converged_job(j))
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn")) as ex:
        for fut in cf.as_completed([ex.submit(_converged_job, j) for j in todo]):
            done(*fut.result())
    return out
