r"""The synthetic noise study (notebook 01): a contrastive problem whose optimum is known exactly.

Problem
-------
``K`` classes sit on a "Fourier torus" in the unit sphere of ``R^(2m)``::

    mu_k = (1/sqrt(m)) [cos(2 pi l k / K), sin(2 pi l k / K)]_{l=1..m},     k = 0..K-1.

Their Gram matrix is circulant (``<mu_j, mu_k>`` depends on ``j - k mod K`` only). Pairs are drawn as
``x ~ Uniform(K)``, ``y | x ~ p(y | x) = softmax_y(<mu_x, mu_y> / tau)``; because every row of the circulant
``exp(Gram / tau)`` has the same sum, the marginal of ``y`` is uniform too, so the pointwise mutual information is
``log p(y|x)/p(y) = <mu_x, mu_y>/tau + c`` -- exactly what the model below can represent.

Model: two embedding tables ``F, G`` (``[K, 2m]``), scores ``s(x, y) = <F_x/|F_x|, G_y/|G_y|> / tau``.

Generalized (infinite-negative) loss and its optimum
----------------------------------------------------
Negatives are the other samples' ``y``, i.e. draws from the marginal ``p(y)``::

    L(F, G) = E_{p(x,y)}[-s(x, y)] + E_x log Z_x,    Z_x = E_{y ~ p(y)} exp(s(x, y)).

With ``q(y|x) = p(y) exp(s(x,y)) / Z_x`` (the model's conditional) one has ``L - L* = E_x KL(p(.|x) || q(.|x))``,
so ``L`` is minimized exactly when ``q = p``, e.g. at ``F = G = mu`` (and any common rotation of it).

Quality metric (1.0 exactly at the optimum)
-------------------------------------------
``metric = 1 - (L - L*) / I(X;Y) = 1 - E_x KL(p(.|x) || q(.|x)) / I(X;Y)``: the fraction of the mutual information
the embeddings capture. ``1`` at the optimum, ``0`` for embeddings that carry no information (``q = p(y)``),
negative when worse than that. It is computed exactly by enumerating the ``K x K`` table.

Noise (keeps the minibatch estimate of Z unbiased)
--------------------------------------------------
In a batch of ``B`` pairs, anchor ``i`` uses the other ``B - 1`` samples' ``y_j`` as negatives and the estimate
``Zhat_i = 1/(B-1) sum_{j != i} w_ij exp(s(x_i, y_j))``, where the ``w_ij`` are i.i.d. ``Gamma(k, rate=k)`` with
``k = 1/noise``: mean 1, variance ``noise``. So ``E[Zhat_i] = Z_{x_i}`` at every noise level (the negatives'
distribution is untouched: noise changing *which* negatives appear would bias both losses alike). As the variance
grows the weights become sparse spikes: the normalized weights ``w / sum w`` are Dirichlet(k, ..., k), so the
estimate rests on roughly ``n_eff = (B - 1) / (1 + noise)`` effective negatives (``noise = 0``: plain minibatch).

* conventional loss ``mean_i[-s_ii + log Zhat_i]``: its gradient ``grad Zhat / Zhat`` is biased (Jensen), and the
  bias grows with the noise / shrinks with ``B``: SGD converges to a fixed point that is *not* the optimum.
* decomposable loss ``mean_i[-s_ii + u_{x_i} Zhat_i]`` with ``u_x`` from the E-step
  (:mod:`contrastive_repro.losses.decomposable`): unbiased for fixed ``u``; at ``u_x = 1/Z_x`` its expected
  gradient is the exact ``grad L``.

The E-step needs ``1/Z_x`` and has a Jensen gap of its own: ``E[1/Zbar] > 1/Z``. With these gamma weights a single
batch's ``Zhat`` is bounded by gamma variables of total shape ``(B - 1)/noise``, so ``E[1/Zhat]`` is *infinite*
once ``noise >= B - 1`` (fewer than about one effective negative): ``u`` must come from an average over batches --
the per-class running average of ``train_run`` (classes are the data points here: ``Z`` depends on the anchor's
class only). Its momentum trades the Jensen gap (and staleness) against variance: with the current batch in the
average, ``u`` shrinks when ``Zhat`` spikes, which damps the heavy-tailed M-step gradient.

Runs are vectorized over seeds: every seed has its own initialization (the same for both losses), and for a given
list of seeds both losses see the same batches and noise (paired comparison).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .losses.decomposable import conventional_terms, decomposable_terms, e_step_log_u, ema_log
from .utils import check_finite

__all__ = ["SyntheticProblem", "make_problem", "noise_log_weights", "minibatch_scores", "train_run",
           "noise_study", "gradient_bias", "init_params", "effective_negatives"]

LOSSES = ("infonce", "decomposable")


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Temporarily use ``n`` intra-op threads. The study's tensors are tiny: one thread is fastest, and extra threads
    only add synchronization (tens of times slower on a machine whose cores are busy)."""
    if n is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@contextlib.contextmanager
def _flush_denormal():
    """Flush denormal floats to zero inside the block (arithmetic on them is tens of times slower); restored after."""
    on = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on:
            torch.set_flush_denormal(False)


@dataclass
class SyntheticProblem:
    """``K`` classes on a Fourier torus; see the module docstring. Tensors are float64 on CPU."""

    mu: torch.Tensor            # [K, d] true unit embeddings
    log_p_cond: torch.Tensor    # [K, K] log p(y | x)
    tau: float
    mutual_information: float   # I(X;Y) in nats
    optimal_loss: float         # L* = L(mu, mu)

    @property
    def num_classes(self) -> int:
        return self.mu.shape[0]

    @property
    def dim(self) -> int:
        return self.mu.shape[1]

    def scores(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``s(x, y)`` for all classes: ``[..., K, K]`` from tables ``[..., K, d]``."""
        return F.normalize(f, dim=-1) @ F.normalize(g, dim=-1).transpose(-1, -2) / self.tau

    def generalized_loss(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Exact ``L(F, G)`` (``[...]``), by enumeration of the ``K x K`` table."""
        s = self.scores(f, g)
        p_cond = self.log_p_cond.to(s).exp()
        k = self.num_classes
        return (-(p_cond * s).sum(-1) + torch.logsumexp(s, dim=-1) - math.log(k)).mean(-1)

    def metric(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``1 - E_x KL(p(.|x) || q(.|x)) / I(X;Y)``: 1.0 exactly at the optimum (``[...]``, float64)."""
        s = self.scores(f.double(), g.double())
        log_q = torch.log_softmax(s, dim=-1)                      # p(y) is uniform
        lp = self.log_p_cond.to(s)
        kl = (lp.exp() * (lp - log_q)).sum(-1).mean(-1)
        return 1.0 - kl / self.mutual_information

    def optimum(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu.clone(), self.mu.clone()

    def sample_pairs(self, n_runs: int, batch_size: int, generator: torch.Generator | None = None):
        """``x, y`` of shape ``[n_runs, batch_size]`` drawn i.i.d. from ``p(x, y)``."""
        k = self.num_classes
        x = torch.randint(0, k, (n_runs, batch_size), generator=generator)
        cdf = self.log_p_cond.exp().cumsum(-1)
        r = torch.rand(n_runs, batch_size, 1, generator=generator, dtype=cdf.dtype)
        y = torch.searchsorted(cdf[x], r * cdf[x][..., -1:]).squeeze(-1).clamp_max(k - 1)
        return x, y


def make_problem(num_classes: int = 32, num_frequencies: int = 2, tau: float = 0.5) -> SyntheticProblem:
    """The Fourier-torus problem: ``K = num_classes`` points in ``R^(2 * num_frequencies)``, temperature ``tau``."""
    if num_classes < 3 or num_frequencies < 1 or 2 * num_frequencies >= num_classes:
        raise ValueError("need num_classes >= 3 and 1 <= num_frequencies < num_classes / 2")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    k = torch.arange(num_classes, dtype=torch.float64)
    cols = []
    for l in range(1, num_frequencies + 1):
        cols += [torch.cos(2 * math.pi * l * k / num_classes), torch.sin(2 * math.pi * l * k / num_classes)]
    mu = torch.stack(cols, dim=1) / math.sqrt(num_frequencies)
    log_p_cond = torch.log_softmax(mu @ mu.T / tau, dim=1)
    mi = float((log_p_cond.exp() * (log_p_cond + math.log(num_classes))).sum(1).mean())
    prob = SyntheticProblem(mu=mu, log_p_cond=log_p_cond, tau=float(tau), mutual_information=mi, optimal_loss=0.0)
    prob.optimal_loss = float(prob.generalized_loss(mu, mu))
    return prob


def effective_negatives(batch_size: int, noise: float) -> float:
    """``n_eff = (B - 1) / (1 + noise)``: how many negatives the noisy estimate effectively rests on."""
    return (batch_size - 1) / (1.0 + noise)


def noise_log_weights(shape: Sequence[int], noise: float,
                      rng: np.random.Generator | int | None = None) -> torch.Tensor | None:
    """``log w`` (float64 tensor) with ``w ~ Gamma(1/noise, rate=1/noise)`` i.i.d.: mean 1, variance ``noise``;
    ``None`` for ``noise == 0``.

    Drawn in log space as ``log Gamma(k + 1) + log(U) / k - log k`` (``k = 1/noise``, ``U ~ Uniform(0, 1)``; the
    gamma "boost" identity), so the tiny weights of heavy noise do not underflow to 0. ``rng``: a NumPy generator
    or seed (NumPy's gamma sampler is several times faster than torch's for small shapes).
    """
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise == 0:
        return None
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    k = 1.0 / noise
    shape = tuple(int(n) for n in shape)
    g = torch.from_numpy(rng.standard_gamma(1.0 + k, shape))
    u = torch.from_numpy(rng.random(shape)).clamp_min(torch.finfo(torch.float64).tiny)
    return g.log() + u.log() / k - math.log(k)


def minibatch_scores(problem: SyntheticProblem, f: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                     y: torch.Tensor, log_w: torch.Tensor | None = None):
    """Positive scores ``s(x_i, y_i)`` and ``log Zhat_i`` (noisy, in-batch negatives ``j != i``), ``[R, B]`` each,
    for tables ``f, g`` of shape ``[R, K, d]`` (or ``[K, d]`` shared by all runs) and classes ``x, y`` ``[R, B]``."""
    d = f.shape[-1]
    if f.dim() == 2:                                                   # one table shared by all runs
        fx, gy = F.embedding(x, F.normalize(f, dim=-1)), F.embedding(y, F.normalize(g, dim=-1))
    else:
        fx = F.normalize(f, dim=-1).gather(1, x.unsqueeze(-1).expand(-1, -1, d))
        gy = F.normalize(g, dim=-1).gather(1, y.unsqueeze(-1).expand(-1, -1, d))
    logits = fx @ gy.transpose(1, 2) / problem.tau                    # [R, B, B]
    pos = logits.diagonal(dim1=1, dim2=2)
    if log_w is not None:
        logits = logits + log_w
    b = x.shape[1]
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    log_zhat = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=-1) - math.log(b - 1)
    return pos, log_zhat


def init_params(problem: SyntheticProblem, seeds: Sequence[int], scale: float = 1.0, dtype=torch.float64):
    """Random tables ``F, G`` (``[len(seeds), K, d]``), each seed's from its own generator."""
    fs, gs = [], []
    for s in seeds:
        gen = torch.Generator().manual_seed(int(s))
        fs.append(scale * torch.randn(problem.num_classes, problem.dim, generator=gen, dtype=dtype))
        gs.append(scale * torch.randn(problem.num_classes, problem.dim, generator=gen, dtype=dtype))
    return torch.stack(fs), torch.stack(gs)


def _class_mean_log(values: torch.Tensor, classes: torch.Tensor, num_classes: int):
    """Per-(run, class) ``log mean exp`` of ``values`` ``[R, B]`` over the batch entries of each class; and the
    mask of classes present."""
    r = values.shape[0]
    cnt = torch.zeros(r, num_classes, dtype=values.dtype).scatter_add_(1, classes, torch.ones_like(values))
    m = values.max()
    tot = torch.zeros(r, num_classes, dtype=values.dtype).scatter_add_(1, classes, torch.exp(values - m))
    present = cnt > 0
    out = torch.log(tot.clamp_min(torch.finfo(values.dtype).tiny)) + m - torch.log(cnt.clamp_min(1.0))
    return out, present


def train_run(loss: str = "infonce", noise: float = 0.0, seed: int | Sequence[int] = 0, steps: int = 3000,
              batch_size: int = 64, lr: float = 16.0, *, problem: SyntheticProblem | None = None,
              momentum: float = 0.8, e_step: str = "mean", z_estimate: str = "running",
              schedule: str = "cosine", log_every: int = 50, init_scale: float = 1.0,
              num_threads: int | None = 1) -> dict:
    """Train the embedding tables with SGD on the conventional (``"infonce"``) or decomposable loss.

    ``seed`` may be a list: the runs are vectorized over seeds (``[S, K, d]`` tables, one generator per seed for the
    initialization -- the same for both losses -- and one shared RNG stream for batches and noise, so both losses
    see identical data for identical ``seed`` lists). ``lr`` is the SGD step size on the per-batch mean loss
    (cosine-decayed to 0 with ``schedule="cosine"``).

    Decomposable loss: per-class state ``Zbar_x`` (classes are the data points: ``Z`` depends on the anchor's class
    only). E-step ``z_estimate="running"``: ``Zbar_x <- momentum Zbar_x + (1 - momentum) mean_{i: x_i = x} Zhat_i``
    (first visit initializes), ``"minibatch"``: ``u_i = 1/Zhat_i`` of this batch, per anchor (this *is* the
    conventional gradient; a control),
    ``"exact"``: the true ``Z_x`` of the current tables (an oracle, for analysis); then ``u = 1/Zbar`` (``"mean"``) or
    ``~ Gamma(1, Zbar)`` (``"sample"``). M-step: ``mean_i[-s_ii + u_{x_i} Zhat_i]``.

    ``num_threads``: torch intra-op threads during the run (restored afterwards; ``None`` leaves them alone).

    Defaults (``make_problem()``: K = 32, d = 4, tau = 0.5; B = 64, lr = 16 cosine, 3000 steps, momentum 0.8) were
    chosen so that both losses reach about 0.998 without noise; 10 seeds x 3000 steps take 20-80 s per
    (loss, noise) on one busy CPU core.

    Returns a dict with ``step`` (``[T]``), ``metric`` and ``loss`` (exact generalized loss) ``[S, T]`` numpy arrays,
    ``final_metric`` ``[S]``, ``seeds``, ``config``, ``seconds``, ``final_params`` (the tables ``F, G``).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if z_estimate not in ("running", "minibatch", "exact"):
        raise ValueError(f"z_estimate must be 'running', 'minibatch' or 'exact', got {z_estimate!r}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if batch_size < 2 or steps < 1:
        raise ValueError("need batch_size >= 2 and steps >= 1")
    problem = problem or make_problem()
    seeds = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    config = dict(loss=loss, noise=float(noise), steps=steps, batch_size=batch_size, lr=lr, momentum=momentum,
                  e_step=e_step, z_estimate=z_estimate, schedule=schedule, init_scale=init_scale,
                  num_classes=problem.num_classes, dim=problem.dim, tau=problem.tau)
    t0 = time.perf_counter()
    f, g = init_params(problem, seeds, init_scale)
    f.requires_grad_(True)
    g.requires_grad_(True)
    n_runs, k = len(seeds), problem.num_classes
    log_zbar = torch.zeros(n_runs, k, dtype=torch.float64)
    seen = torch.zeros(n_runs, k, dtype=torch.bool)
    hist_step, hist_metric, hist_loss = [], [], []

    def log(t):
        with torch.no_grad():
            hist_step.append(t)
            hist_metric.append(problem.metric(f, g))
            hist_loss.append(problem.generalized_loss(f, g))

    stream_seed = int(np.random.SeedSequence(seeds).generate_state(1)[0])
    data_gen = torch.Generator().manual_seed(stream_seed)
    noise_rng = np.random.default_rng(stream_seed)
    with torch.random.fork_rng(devices=[]), _torch_threads(num_threads):   # e_step="sample": global RNG
        torch.manual_seed(stream_seed)
        log(0)
        for t in range(steps):
            x, y = problem.sample_pairs(n_runs, batch_size, data_gen)
            log_w = noise_log_weights((n_runs, batch_size, batch_size), noise, noise_rng)
            pos, log_zhat = minibatch_scores(problem, f, g, x, y, log_w)
            if loss == "infonce":
                terms = conventional_terms(pos, log_zhat)
            else:
                with torch.no_grad():
                    if z_estimate == "minibatch":                 # per anchor: u_i = 1/Zhat_i (conventional)
                        log_zbar_x = log_zhat.detach()
                    elif z_estimate == "exact":                   # oracle: the true Z_x of the current tables
                        log_zbar = torch.logsumexp(problem.scores(f, g), dim=-1) - math.log(k)
                        log_zbar_x = log_zbar.gather(1, x)
                    else:                                         # running average per class (data point)
                        fresh, present = _class_mean_log(log_zhat.detach(), x, k)
                        upd = ema_log(log_zbar, fresh, momentum, seen)
                        log_zbar = torch.where(present, upd, log_zbar)
                        seen = seen | present
                        log_zbar_x = log_zbar.gather(1, x)
                    log_u = e_step_log_u(log_zbar_x, 1.0, e_step)
                terms = decomposable_terms(pos, log_zhat, log_u)
            total = terms.mean(dim=1).sum()                       # sum over runs of each run's batch mean
            gf, gg = torch.autograd.grad(total, (f, g))
            step_lr = lr * 0.5 * (1.0 + math.cos(math.pi * t / steps)) if schedule == "cosine" else lr
            with torch.no_grad():
                f -= step_lr * gf
                g -= step_lr * gg
            if (t + 1) % log_every == 0 or t + 1 == steps:
                log(t + 1)
                check_finite(hist_metric[-1], f"synthetic {loss} metric (noise={noise})")
    metric = torch.stack(hist_metric, dim=1).numpy()
    return {"step": np.asarray(hist_step), "metric": metric, "loss": torch.stack(hist_loss, dim=1).numpy(),
            "final_metric": metric[:, -1].copy(), "seeds": seeds, "config": config,
            "seconds": time.perf_counter() - t0,
            "final_params": (f.detach().clone(), g.detach().clone())}


def _study_job(args):
    loss, noise, kwargs, problem_kwargs = args
    return (loss, noise), train_run(loss, noise, problem=make_problem(**problem_kwargs), **kwargs)


def noise_study(noise_levels: Sequence[float] = (0.0, 64.0, 256.0, 1024.0),
                losses: Sequence[str] = LOSSES, seeds: Sequence[int] = tuple(range(10)), *,
                problem_kwargs: dict | None = None, workers: int = 1, **train_kwargs) -> dict:
    """Run :func:`train_run` for every (loss, noise level), each vectorized over ``seeds``.

    Returns ``{(loss, noise): history}``. ``workers > 1`` runs the configurations in that many processes (each
    single-threaded; on 2 cores ``workers=2`` halves the wall time). ``problem_kwargs`` go to :func:`make_problem`,
    the rest to :func:`train_run`.
    """
    problem_kwargs = dict(problem_kwargs or {})
    jobs = [(loss, float(noise), dict(train_kwargs, seed=list(seeds)), problem_kwargs)
            for noise in noise_levels for loss in losses]
    if workers <= 1:
        return dict(_study_job(j) for j in jobs)
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        return dict(pool.map(_study_job, jobs))


def gradient_bias(loss: str, batch_size: int, n_draws: int = 20000, noise: float = 0.0, *,
                  problem: SyntheticProblem | None = None, params: tuple[torch.Tensor, torch.Tensor] | None = None,
                  seed: int = 0, e_step_batches: int | None = None, chunk: int | None = None,
                  return_error: bool = False, num_threads: int | None = 1):
    """Relative bias ``||E[g_B] - g_full|| / ||g_full||`` of the minibatch gradient (w.r.t. the tables ``F, G``).

    ``g_full`` is the exact gradient of the generalized loss; ``E[g_B]`` is the mean over ``n_draws`` random noisy
    batches of size ``batch_size``. Only the negative (partition-function) part of the gradients is sampled: the
    positive part's expectation is exact in both losses, so ``E[g_B] - g_full`` equals the difference of the
    negative parts, which is estimated with less Monte Carlo noise. ``params``: the tables (``[K, d]`` each) to evaluate at; default a random
    initialization from ``seed``. Decomposable: ``u_x = 1/Z_x`` exact (``e_step_batches=None``; the M-step is then
    unbiased) or ``1/Zbar_x`` with ``Zbar_x`` the mean of ``e_step_batches`` independent noisy minibatch estimates
    (the E-step's Jensen gap; a fresh ``Zbar`` per draw). ``return_error=True`` also returns the Monte Carlo
    standard error of the estimate on the same relative scale (from 25 chunks of draws).
    """
    with _torch_threads(num_threads):
        return _gradient_bias(loss, batch_size, n_draws, noise, problem, params, seed, e_step_batches, chunk,
                              return_error)


def _gradient_bias(loss, batch_size, n_draws, noise, problem, params, seed, e_step_batches, chunk, return_error):
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    problem = problem or make_problem()
    k = problem.num_classes
    if params is None:
        f0, g0 = init_params(problem, [seed])
        f0, g0 = f0[0], g0[0]
    else:
        f0, g0 = (p.detach().double() for p in params)
    f = f0.clone().requires_grad_(True)
    g = g0.clone().requires_grad_(True)
    full = torch.autograd.grad(problem.generalized_loss(f, g), (f, g))
    g_full = torch.cat([t.reshape(-1) for t in full])
    # The positive term -s(x_i, y_i) has the same, exactly known expectation in every loss; only the negative part
    # can be biased. Comparing the negative parts gives the same bias with less Monte Carlo noise.
    full_neg = torch.autograd.grad((torch.logsumexp(problem.scores(f, g), dim=-1) - math.log(k)).mean(), (f, g))
    g_full_neg = torch.cat([t.reshape(-1) for t in full_neg])
    with torch.no_grad():
        log_z_true = torch.logsumexp(problem.scores(f0, g0), dim=-1) - math.log(k)
    n_chunks = 25
    chunk = chunk or max(1, min(4096, 2_000_000 // (batch_size * batch_size)))
    per_chunk = max(1, math.ceil(n_draws / n_chunks))
    chunk_means = []
    data_gen = torch.Generator().manual_seed(seed + 1)
    noise_rng = np.random.default_rng(seed + 1)
    for _ in range(n_chunks):
        acc, done = torch.zeros_like(g_full), 0
        while done < per_chunk:
            r = min(chunk, per_chunk - done)
            x, y = problem.sample_pairs(r, batch_size, data_gen)
            log_w = noise_log_weights((r, batch_size, batch_size), noise, noise_rng)
            pos, log_zhat = minibatch_scores(problem, f, g, x, y, log_w)
            pos = torch.zeros_like(pos)                          # negative part only (see above)
            if loss == "infonce":
                terms = conventional_terms(pos, log_zhat)
            else:
                with torch.no_grad():
                    if e_step_batches is None:
                        log_zbar = log_z_true.expand(r, -1)
                    else:
                        log_zbar = _independent_estimate(problem, f0, g0, r, batch_size, noise, e_step_batches,
                                                         data_gen, noise_rng)
                    log_u = -log_zbar.gather(1, x)
                terms = decomposable_terms(pos, log_zhat, log_u)
            gs = torch.autograd.grad(terms.mean(dim=1).sum(), (f, g))
            acc += torch.cat([t.reshape(-1) for t in gs])
            done += r
        chunk_means.append(acc / per_chunk)
    means = torch.stack(chunk_means)
    mean = means.mean(0)
    rel = float((mean - g_full_neg).norm() / g_full.norm())
    if not return_error:
        return rel
    se = float(math.sqrt(means.var(0).sum().item() / n_chunks) / g_full.norm())
    return rel, se


@torch.no_grad()
def _independent_estimate(problem, f0, g0, r, batch_size, noise, n_batches, data_gen, noise_rng):
    """``log Zbar_x`` per draw: mean over ``n_batches`` independent noisy estimates, each from ``B - 1`` negatives
    ``y ~ p(y)`` (every class gets its own; ``[r, K]``)."""
    k = problem.num_classes
    s = problem.scores(f0, g0)                                     # [K, K]
    n = batch_size - 1
    y = torch.randint(0, k, (r, n_batches, k, n), generator=data_gen)   # the marginal of y is uniform
    vals = s[torch.arange(k).view(1, 1, k, 1), y]                  # s(x, y) for anchor class x: [r, nb, K, n]
    log_w = noise_log_weights(vals.shape, noise, noise_rng)
    if log_w is not None:
        vals = vals + log_w
    est = torch.logsumexp(vals, dim=-1) - math.log(n)             # [r, n_batches, K]
    return torch.logsumexp(est, dim=1) - math.log(n_batches)


# ----------------------------------------------------------------------------------------------------------------
# Arms, tolerance criterion, flatness and the E-step momentum chosen on validation (notebook 01)
# ----------------------------------------------------------------------------------------------------------------
#: The study's arms: name -> (loss, extra train_run arguments). ``oracle``: u = 1/Z_x of the current tables, computed
#: from the full K x K table (no estimate); ``sampled``: the paper's stochastic-EM form, u drawn from its Gamma
#: conditional Gamma(1, rate=Zbar_x) with Zbar_x the running estimate.
ARMS = {
    "conventional": ("infonce", {}),
    "decomposable": ("decomposable", {"z_estimate": "running", "e_step": "mean"}),
    "sampled": ("decomposable", {"z_estimate": "running", "e_step": "sample"}),
    "oracle": ("decomposable", {"z_estimate": "exact", "e_step": "mean"}),
}


def arm_kwargs(arm: str) -> tuple[str, dict]:
    """``(loss, kwargs)`` of one of :data:`ARMS` (a ``ValueError`` naming the arm otherwise)."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {tuple(ARMS)}, got {arm!r}")
    loss, kw = ARMS[arm]
    return loss, dict(kw)


def distance_from_optimum(final_metric) -> np.ndarray:
    """``|metric - 1|`` per run (the optimum is exactly 1.0)."""
    return np.abs(np.asarray(final_metric, dtype=np.float64) - 1.0)


def within_tolerance(final_metric, tol: float) -> int:
    """How many runs end within ``tol`` of the optimum (``|metric - 1| <= tol``)."""
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    return int((distance_from_optimum(final_metric) <= tol).sum())


def curve_change(metric: np.ndarray, step: np.ndarray, frac: float = 0.25) -> np.ndarray:
    """Per run, ``|m(T) - m((1 - frac) T)|``: how much the curve still moved over its last ``frac`` of the steps
    (``metric`` ``[S, T_log]``, ``step`` ``[T_log]``; the logged step nearest to ``(1 - frac) T`` is used)."""
    if not 0 < frac < 1:
        raise ValueError(f"frac must be in (0, 1), got {frac!r}")
    metric, step = np.asarray(metric, dtype=np.float64), np.asarray(step, dtype=np.float64)
    if metric.ndim != 2 or metric.shape[1] != step.size:
        raise ValueError(f"metric must be [runs, {step.size}], got {metric.shape}")
    i = int(np.argmin(np.abs(step - (1.0 - frac) * step[-1])))
    return np.abs(metric[:, -1] - metric[:, i])


def arm_summary(finals: dict, tol: float, reference: str = "conventional", alpha: float = 0.05) -> list[dict]:
    """One row per arm of one noise level: runs within ``tol``, mean distance from 1.0, and the paired verdict of
    the arm against ``reference`` on the per-seed distance from 1.0 (paper direction: the decomposable arms are
    *closer* to 1.0, i.e. ``direction=-1`` on ``b - a`` with ``a`` the reference's distances).

    ``finals``: ``{arm: per-seed final metric}`` (same seeds, same order in every arm)."""
    from .stats import paired_verdict

    if reference not in finals:
        raise ValueError(f"reference arm {reference!r} is not among {sorted(finals)}")
    ref = distance_from_optimum(finals[reference])
    rows = []
    for arm, fm in finals.items():
        d = distance_from_optimum(fm)
        row = {"arm": arm, "runs": int(d.size), "within_tol": within_tolerance(fm, tol),
               "mean_distance": float(d.mean()), "median_distance": float(np.median(d)), "verdict": None}
        if arm != reference:
            row["verdict"] = paired_verdict(ref, d, direction=-1, alpha=alpha)
        rows.append(row)
    return rows


def choose_momentum(candidates: Sequence[float], noise: float, seeds: Sequence[int], *,
                    problem: SyntheticProblem | None = None, workers: int = 1, **train_kwargs) -> dict:
    """Pick the E-step momentum of the running estimate on a validation problem: the candidate whose decomposable
    runs end closest to the optimum (smallest mean ``|metric - 1|``; ties: the first) at noise level ``noise``.

    ``seeds`` must be disjoint from the study's (they set the initializations and the batch/noise stream, i.e. the
    validation problem is another draw of the generator). Returns ``{"chosen", "scores": {momentum: mean distance}}``.
    """
    if not candidates:
        raise ValueError("choose_momentum needs at least one candidate")
    for m in candidates:
        if not 0.0 <= float(m) < 1.0:
            raise ValueError(f"momentum candidates must be in [0, 1), got {m!r}")
    problem = problem or make_problem()
    pk = dict(num_classes=problem.num_classes, num_frequencies=problem.dim // 2, tau=problem.tau)
    jobs = [("decomposable", float(noise), dict(train_kwargs, seed=[int(s) for s in seeds], momentum=float(m)), pk)
            for m in candidates]
    if workers <= 1 or len(jobs) <= 1:
        results = [_arm_job(j)[1] for j in jobs]
    else:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as pool:
            results = [r for _, r in pool.map(_arm_job, jobs)]
    scores = {float(m): float(distance_from_optimum(r["final_metric"]).mean()) for m, r in zip(candidates, results)}
    chosen = min(scores, key=scores.get)
    return {"chosen": chosen, "scores": scores}


@torch.no_grad()
def one_batch_u_ratio(batch_size: int, noise: float, n_draws: int = 2000, *,
                      problem: SyntheticProblem | None = None, seed: int = 0,
                      quantiles: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 0.9)) -> dict:
    """Quantiles of ``u Z = Z / Zhat`` when ``u = 1/Zhat`` comes from a single noisy batch (``B - 1`` negatives),
    at a random initialization, pooled over classes and draws.

    ``u Z = 1`` is the exact E-step; the *mean* of ``Z / Zhat`` is infinite once ``noise >= B - 1`` (see the module
    docstring), so only quantiles are reported -- they are always finite. Returns ``{"q": [...], "value": [...]}``.
    """
    problem = problem or make_problem()
    k = problem.num_classes
    f0, g0 = init_params(problem, [seed])
    f0, g0 = f0[0], g0[0]
    log_z = torch.logsumexp(problem.scores(f0, g0), dim=-1) - math.log(k)
    gen = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 1)
    out = []
    left = int(n_draws)
    while left > 0:
        r = min(left, max(1, 200_000 // (k * batch_size)))
        est = _independent_estimate(problem, f0, g0, r, batch_size, noise, 1, gen, rng)   # [r, K]
        out.append((log_z.unsqueeze(0) - est).reshape(-1))
        left -= r
    log_ratio = torch.cat(out).numpy()
    qs = [float(q) for q in quantiles]
    return {"q": qs, "value": np.exp(np.quantile(log_ratio, qs)).tolist()}


def _arm_job(args):
    arm, noise, kwargs, problem_kwargs = args
    loss, extra = arm_kwargs(arm)
    r = train_run(loss, noise, problem=make_problem(**problem_kwargs), **extra, **kwargs)
    return (arm, noise), {"step": np.asarray(r["step"]).tolist(), "metric": np.asarray(r["metric"]).tolist(),
                          "final_metric": np.asarray(r["final_metric"]).tolist(), "seconds": r["seconds"]}


def arm_study(jobs: Sequence[tuple[str, float]], seeds: Sequence[int], *, problem_kwargs: dict | None = None,
              workers: int = 1, **train_kwargs) -> dict:
    """Train every ``(arm, noise)`` of ``jobs`` (arms of :data:`ARMS`), each vectorized over ``seeds``; JSON-ready
    histories ``{(arm, noise): {"step", "metric", "final_metric", "seconds"}}``. Every arm sees the same
    initializations, batches and noise for the same seeds (paired). ``workers > 1``: that many processes."""
    for arm, _ in jobs:
        arm_kwargs(arm)
    todo = [(arm, float(noise), dict(train_kwargs, seed=[int(s) for s in seeds]), dict(problem_kwargs or {}))
            for arm, noise in jobs]
    if workers <= 1 or len(todo) <= 1:
        return dict(_arm_job(j) for j in todo)
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn")) as pool:
        return dict(pool.map(_arm_job, todo))


# ----------------------------------------------------------------------------------------------------------------
# One batched computation for a whole grid of (arm, noise, momentum) x seeds (notebook 01's study)
# ----------------------------------------------------------------------------------------------------------------
def grid_forward(problem: SyntheticProblem, f: torch.Tensor, g: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                 log_w: torch.Tensor | None):
    """:func:`minibatch_scores` for tables ``[R, K, d]`` without autograd, keeping what :func:`grid_backward`
    needs. Returns ``pos, log_zhat`` (``[R, B]``) and the cache."""
    nf, ng = f.norm(dim=-1, keepdim=True), g.norm(dim=-1, keepdim=True)
    fn, gn = f / nf, g / ng
    d = f.shape[-1]
    fx = fn.gather(1, x.unsqueeze(-1).expand(-1, -1, d))
    gy = gn.gather(1, y.unsqueeze(-1).expand(-1, -1, d))
    a = torch.bmm(fx, gy.transpose(1, 2)).div_(problem.tau)          # [R, B, B]
    pos = a.diagonal(dim1=1, dim2=2).clone()
    if log_w is not None:
        a.add_(log_w)
    a.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    m = a.amax(dim=-1, keepdim=True)
    # Terms more than `floor` below the row's largest are far below the sum's rounding error; clamping them keeps
    # exp off its (tens of times slower) underflow path and the products off denormals, which heavy noise would
    # otherwise hit for most entries.
    floor = 30.0 if a.dtype == torch.float32 else 60.0
    e = a.sub_(m).clamp_min_(-floor).exp_()
    e.diagonal(dim1=1, dim2=2).zero_()
    tot = e.sum(-1)
    b = x.shape[1]
    log_zhat = m.squeeze(-1) + tot.log() - math.log(b - 1)
    return pos, log_zhat, (e, tot, fn, gn, nf, ng, fx, gy, x, y)


def grid_backward(problem: SyntheticProblem, cache, coef: torch.Tensor):
    """Gradients w.r.t. the tables of ``sum_runs mean_i[-pos_i + c_i(log Zhat_i)]`` given ``coef = dc/dlog Zhat``
    (``[R, B]``: 1 for the conventional loss, ``u_i Zhat_i`` for the decomposable one). By hand: the logits'
    gradient is ``(coef_i softmax_j - delta_ij) / B``, then the bilinear map, the gathers and the normalization."""
    e, tot, fn, gn, nf, ng, fx, gy, x, y = cache
    b, d = x.shape[1], fn.shape[-1]
    gl = e.mul_((coef / (tot * b * problem.tau)).unsqueeze(-1))       # reuses the forward's buffer
    gl.diagonal(dim1=1, dim2=2).fill_(-1.0 / (b * problem.tau))
    dfx, dgy = torch.bmm(gl, gy), torch.bmm(gl.transpose(1, 2), fx)
    dfn = torch.zeros_like(fn).scatter_add_(1, x.unsqueeze(-1).expand(-1, -1, d), dfx)
    dgn = torch.zeros_like(gn).scatter_add_(1, y.unsqueeze(-1).expand(-1, -1, d), dgy)
    df = (dfn - fn * (fn * dfn).sum(-1, keepdim=True)) / nf
    dg = (dgn - gn * (gn * dgn).sum(-1, keepdim=True)) / ng
    return df, dg


def train_grid(configs: Sequence[tuple[str, float, float]], seeds: Sequence[int], steps: int = 3000,
               batch_size: int = 64, lr: float = 16.0, *, problem: SyntheticProblem | None = None,
               schedule: str = "cosine", log_every: int = 50, init_scale: float = 1.0, dtype=torch.float64,
               num_threads: int | None = 1) -> dict:
    """Train every ``(arm, noise, momentum)`` of ``configs`` (arms of :data:`ARMS`) on every seed in **one** batched
    loop (``len(configs) * len(seeds)`` pairs of tables updated together; each run's gradient is its own, computed by
    hand: :func:`grid_forward` / :func:`grid_backward`).

    Pairing: every run with the same seed list starts from the same tables (:func:`init_params`) and sees the same
    batches and, per noise level, the same noise weights (the streams of :func:`train_run`, one NumPy noise stream per
    level). So the grid can be split into parts (e.g. by noise level, one process each) without changing any run,
    and a non-sampling config gives the history of ``train_run(loss, noise, seed=seeds, momentum=m,
    **ARMS[arm][1])`` to rounding. The ``sampled`` arm's Gamma draws come from
    one torch stream for the whole grid. The momentum is ignored by ``conventional`` and ``oracle``. ``dtype``:
    of the tables and batch computations (the metric is always float64).

    Returns ``{(arm, noise, momentum): {"step", "metric" [S][T], "final_metric" [S], "seconds"}}`` (JSON-ready
    lists; ``seconds`` is the whole grid's wall time).
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    if batch_size < 2 or steps < 1:
        raise ValueError("need batch_size >= 2 and steps >= 1")
    configs = [(str(a), float(n), float(m)) for a, n, m in configs]
    if not configs or len(set(configs)) != len(configs):
        raise ValueError(f"configs must be non-empty and distinct, got {configs}")
    for arm, noise, m in configs:
        arm_kwargs(arm)
        if noise < 0 or not 0.0 <= m < 1.0:
            raise ValueError(f"need noise >= 0 and momentum in [0, 1): got noise {noise}, momentum {m} ({arm})")
    problem = problem or make_problem()
    seeds = [int(s) for s in seeds]
    t0 = time.perf_counter()
    n_c, n_s, k, b = len(configs), len(seeds), problem.num_classes, batch_size
    f0, g0 = init_params(problem, seeds, init_scale)
    f = f0.repeat(n_c, 1, 1).to(dtype)                               # run r = config r // S, seed r % S
    g = g0.repeat(n_c, 1, 1).to(dtype)
    arm_of = [ARMS[a] for a, _, _ in configs]

    def per_run(v):
        return torch.tensor(v, dtype=dtype).repeat_interleave(n_s).unsqueeze(1)

    is_conv = per_run([lo == "infonce" for lo, _ in arm_of]).bool()
    is_exact = per_run([kw.get("z_estimate") == "exact" for _, kw in arm_of]).bool()
    is_sample = per_run([kw.get("e_step") == "sample" for _, kw in arm_of]).bool()
    log_m = per_run([m for _, _, m in configs]).log()
    log_1m = per_run([1.0 - m for _, _, m in configs]).log()
    levels = sorted({n for _, n, _ in configs})
    level_of = torch.tensor([levels.index(n) for _, n, _ in configs])
    stream_seed = int(np.random.SeedSequence(seeds).generate_state(1)[0])
    data_gen = torch.Generator().manual_seed(stream_seed)
    noise_rngs = {n: np.random.default_rng(stream_seed) for n in levels}
    sample_gen = torch.Generator().manual_seed(stream_seed + 2)
    log_zbar = torch.zeros(n_c * n_s, k, dtype=dtype)
    seen = torch.zeros(n_c * n_s, k, dtype=torch.bool)
    any_exact, any_running = bool(is_exact.any()), bool((~is_exact & ~is_conv).any())
    hist_step, hist_metric = [], []

    def log(t):
        hist_step.append(t)
        hist_metric.append(problem.metric(f, g))

    with _torch_threads(num_threads), torch.no_grad(), _flush_denormal():
        log(0)
        for t in range(steps):
            x, y = problem.sample_pairs(n_s, b, data_gen)
            if levels == [0.0]:
                log_w = None
            else:
                lw = torch.stack([noise_log_weights((n_s, b, b), n, noise_rngs[n]).to(dtype) if n > 0
                                  else torch.zeros(n_s, b, b, dtype=dtype) for n in levels])
                log_w = lw[level_of].reshape(n_c * n_s, b, b)
            xr, yr = x.repeat(n_c, 1), y.repeat(n_c, 1)
            pos, log_zhat, cache = grid_forward(problem, f, g, xr, yr, log_w)
            log_z_x = torch.zeros_like(log_zhat)
            if any_running:
                fresh, present = _class_mean_log(log_zhat, xr, k)
                upd = torch.logaddexp(log_zbar + log_m, fresh + log_1m)
                log_zbar = torch.where(present, torch.where(seen, upd, fresh), log_zbar)
                seen = seen | present
                log_z_x = log_zbar.gather(1, xr)
            if any_exact:
                log_exact = torch.logsumexp(problem.scores(f, g), dim=-1) - math.log(k)
                log_z_x = torch.where(is_exact, log_exact.gather(1, xr), log_z_x)
            log_u = -log_z_x
            if bool(is_sample.any()):
                e = torch.empty_like(log_z_x).exponential_(generator=sample_gen)     # Gamma(1, 1)
                log_u = torch.where(is_sample, log_u + e.log(), log_u)
            coef = torch.where(is_conv, torch.ones_like(log_u), torch.exp(log_u + log_zhat))
            gf, gg = grid_backward(problem, cache, coef)
            step_lr = lr * 0.5 * (1.0 + math.cos(math.pi * t / steps)) if schedule == "cosine" else lr
            f -= step_lr * gf
            g -= step_lr * gg
            if (t + 1) % log_every == 0 or t + 1 == steps:
                log(t + 1)
                check_finite(hist_metric[-1], "synthetic grid metric")
    metric = torch.stack(hist_metric, dim=1).reshape(n_c, n_s, -1).numpy()
    seconds = time.perf_counter() - t0
    return {c: {"step": list(map(int, hist_step)), "metric": metric[i].tolist(),
                "final_metric": metric[i, :, -1].tolist(), "seconds": seconds} for i, c in enumerate(configs)}


def _grid_job(args):
    configs, seeds, kwargs, problem_kwargs = args
    dtype = {"float32": torch.float32, "float64": torch.float64}[kwargs.pop("dtype", "float64")]
    return train_grid(configs, seeds, problem=make_problem(**problem_kwargs), dtype=dtype, **kwargs)


def grid_study(configs: Sequence[tuple[str, float, float]], seeds: Sequence[int], *,
               problem_kwargs: dict | None = None, workers: int = 1, dtype: str = "float64", **train_kwargs) -> dict:
    """:func:`train_grid` for ``configs``, split into ``workers`` processes by noise level (or by config when there
    are fewer levels than workers). The split changes no run except the ``sampled`` arm's Gamma draws: the batches
    and noise depend on the seeds and the noise level only. ``dtype``: ``"float32"`` or ``"float64"``.
    Returns ``{(arm, noise, momentum): history}``."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    configs = [(str(a), float(n), float(m)) for a, n, m in configs]
    levels = sorted({n for _, n, _ in configs}, reverse=True)        # heaviest noise first: the costliest draws
    w = max(1, int(workers))
    if len(levels) >= w:                                               # by noise level
        parts = [[c for c in configs if c[1] in levels[i::w]] for i in range(w)]
    else:                                                              # fewer levels than workers: by config
        parts = [configs[i::w] for i in range(w)]
    jobs = [(p, [int(s) for s in seeds], dict(train_kwargs, dtype=dtype), dict(problem_kwargs or {}))
            for p in parts if p]
    if len(jobs) <= 1:
        return _grid_job(jobs[0])
    import concurrent.futures as cf
    import multiprocessing as mp

    out = {}
    with cf.ProcessPoolExecutor(max_workers=len(jobs), mp_context=mp.get_context("spawn")) as pool:
        for r in pool.map(_grid_job, jobs):
            out |= r
    return out


def choose_momentum_grid(candidates: Sequence[float], noise: float, seeds: Sequence[int], **grid_kwargs) -> dict:
    """:func:`choose_momentum` on one batched grid: the candidate whose decomposable runs on the validation
    ``seeds`` end closest to 1.0 on average (ties: the first). Returns ``{"chosen", "scores"}``."""
    if not candidates:
        raise ValueError("choose_momentum_grid needs at least one candidate")
    for m in candidates:
        if not 0.0 <= float(m) < 1.0:
            raise ValueError(f"momentum candidates must be in [0, 1), got {m!r}")
    r = grid_study([("decomposable", float(noise), float(m)) for m in candidates], seeds, **grid_kwargs)
    scores = {float(m): float(distance_from_optimum(r[("decomposable", float(noise), float(m))]["final_metric"])
                              .mean()) for m in candidates}
    return {"chosen": min(scores, key=scores.get), "scores": scores}


def equivalence_verdict(a, b, margin: float, alpha: float = 0.05):
    """Paired equivalence of ``b`` and ``a`` within ``margin``: ``reproduced`` when the ``1 - alpha`` interval of
    ``mean(b - a)`` lies inside ``(-margin, margin)`` (two one-sided tests, each at ``alpha / 2``: conservative),
    ``opposite`` when it lies entirely outside (beyond ``+margin`` or below ``-margin``), ``inconclusive`` otherwise.
    A :class:`~contrastive_repro.stats.PairedVerdict` (``margin`` recorded, ``direction`` +1)."""
    import dataclasses

    from .stats import paired_verdict

    if not (margin > 0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number > 0, got {margin!r}")
    v = paired_verdict(a, b, direction=+1, alpha=alpha)
    if -margin < v.ci_low and v.ci_high < margin:
        verdict = "reproduced"
    elif v.ci_low >= margin or v.ci_high <= -margin:
        verdict = "opposite"
    else:
        verdict = "inconclusive"
    return dataclasses.replace(v, margin=float(margin), verdict=verdict)


def study_table(curves: dict, arms: Sequence[str], noise_levels: Sequence[float], *, tol: float, flat_tol: float,
                flat_frac: float, alpha: float = 0.05) -> list[dict]:
    """Per noise level and arm: runs within ``tol``, mean / median distance from 1.0, the largest change over the
    last ``flat_frac`` of the steps, ``flat``, and the paired test against ``conventional`` on the per-seed
    distance from 1.0 -- at noise 0 an equivalence test within ``tol`` (the claim there: both reach the optimum),
    above it a superiority test (the arm closer to 1.0). ``curves[(arm, noise)]``: ``{"step", "metric"}``.
    Rows carry the :class:`PairedVerdict` under ``"pv"`` (``None`` for the reference)."""
    rows = []
    for noise in noise_levels:
        finals = {a: np.asarray(curves[(a, noise)]["metric"])[:, -1] for a in arms}
        for r in arm_summary(finals, tol, alpha=alpha):
            c = curves[(r["arm"], noise)]
            change = curve_change(np.asarray(c["metric"]), np.asarray(c["step"]), flat_frac)
            v = r.pop("verdict")
            if v is not None and noise == 0:
                v = equivalence_verdict(distance_from_optimum(finals["conventional"]),
                                        distance_from_optimum(finals[r["arm"]]), tol, alpha)
            rows.append(r | {"noise": float(noise), "test": None if v is None else
                             ("equivalence" if noise == 0 else "superiority"),
                             "max_change_last": float(change.max()), "flat": bool(change.max() <= flat_tol),
                             "pv": v, "effect": None if v is None else v.effect,
                             "ci_low": None if v is None else v.ci_low, "ci_high": None if v is None else v.ci_high,
                             "verdict": None if v is None else v.verdict})
    return rows


def study_claims(rows: Sequence[dict], *, tol: float, momentum: float, batch_size: int, steps: int,
                 max_noise: float) -> tuple[list[dict], list[dict]]:
    """Claim rows (``decomposable`` and, above noise 0, ``oracle`` vs conventional; the oracle's mean distance
    within ``tol`` is the gate of the decomposable row) and summary rows, from :func:`study_table` rows."""
    from reproduce.claims import claim_row

    from .stats import gate

    claims, summary = [], []
    for noise in sorted({r["noise"] for r in rows}):
        t = {r["arm"]: r for r in rows if r["noise"] == noise}
        conv = t["conventional"]
        gates = [gate(t["oracle"]["mean_distance"], {"tolerance tol": tol}, higher_is_better=False)] \
            if "oracle" in t else []
        for arm in [a for a in t if a in ("decomposable", "oracle") and not (a == "oracle" and noise == 0)]:
            r = t[arm]
            flat = "flat" if r["flat"] and conv["flat"] else "NOT flat (budget too short)"
            note = (f"within {tol} of 1.0: {arm} {r['within_tol']}/{r['runs']}, conventional "
                    f"{conv['within_tol']}/{r['runs']}; mean distance {arm} {r['mean_distance']:.4f}, conventional "
                    f"{conv['mean_distance']:.4f}; curves {flat}; momentum {momentum} (validation); B={batch_size}, "
                    f"{steps} steps; our generator and metric (the paper's are not public)")
            if noise == 0:
                claim, metric = ("without noise both losses reach the optimum",
                                 f"distance from 1.0 (arm - conv.), equivalence within {tol}")
            elif arm == "decomposable":
                claim, metric = ("decomposable reaches the optimum where conventional does not",
                                 "distance from 1.0 (arm - conv.)")
            else:
                claim, metric = "reference: exact u = 1/Z (oracle) vs conventional", "distance from 1.0 (arm - conv.)"
            claims.append(claim_row(f"dcl.synthetic.noise{noise:g}.{arm}", "dcl", claim,
                                    f"synthetic noise {noise:g}, {r['runs']} paired inits, B={batch_size}", metric,
                                    r["pv"], gates=gates if arm == "decomposable" else [], note=note))
        for arm, r in t.items():
            key = {"conventional": "dcl.synthetic_heavy_conventional_converged",
                   "decomposable": "dcl.synthetic_heavy_decomposable_converged"}.get(arm)
            exp = f"synthetic, noise {noise:g}, B={batch_size}"
            summary.append({"experiment": exp, "metric": f"{arm}: runs within {tol} of 1.0",
                            "value": float(r["within_tol"]), "n": int(r["runs"]),
                            "note": "our generator and metric (the paper's are not public)"}
                           | ({"paper_key": key} if key and noise == max_noise else {}))
            summary.append({"experiment": exp, "metric": f"{arm}: mean distance from 1.0",
                            "value": float(r["mean_distance"]), "n": int(r["runs"])})
    return claims, summary
