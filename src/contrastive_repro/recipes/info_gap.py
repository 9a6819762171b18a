r"""The information-gap study (CVPR 2023, Section 3 and Fig. 2) on frozen features of the generated world.

One unit (seed = scene split = initialisation), :func:`run_gap_unit`:

* **contrastive arms**: :class:`~.frozen_clip.FrozenTowers` trained with CLIP's loss on (frozen image feature,
  frozen caption feature) pairs, the captions written at information gap ``g`` (each attribute omitted with
  probability ``g``), one model per gap; downstream, linear probes of the image embedding :math:`z_V`;
* **single-modality arm** (what the theory compares with): the same image tower trained directly on the images'
  labels (:func:`train_supervised`, cross-entropy on every downstream target), probed the same way;
* **gates**: the same probe on raw pixels, and on a random-init image encoder through an untrained tower;
* **Fig. 2**: CLIP at one gap with the alignment term :math:`s \cdot \frac1N\sum_j 1/(\langle z_{Tj}, z_{Vj}
  \rangle^2 + \epsilon)` at each scale ``s``: retrieval R@1/5/10 on held-out scenes and the collapse diagnostics
  (mean cosine of unpaired pairs, mean paired cosine and the fraction of anti-aligned pairs).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .clip_pretrain import linear_probe_eval, modality_stats, retrieval_eval
from .frozen_clip import FeaturePairs, FrozenTowers, TowerConfig, _Clock, embed, train_towers

__all__ = ["train_supervised", "probe_targets", "collapse_stats", "run_gap_unit", "world_captions", "arm_values",
           "part1_rows", "gap_claims", "align_rows", "align_claims", "plot_probe_vs_gap", "plot_alignment",
           "GATES", "ALIGN_KEYS"]

#: The gates of the Part-1 claims (the random projection of the frozen features is shown beside them, not a gate).
GATES = ("pixels", "random_init")
#: The Fig. 2 columns: retrieval and the collapse diagnostics.
ALIGN_KEYS = ("ret/mean_recall", "ret/i2t_R@1", "ret/i2t_R@5", "ret/i2t_R@10", "ret/t2i_R@1", "paired_cosine",
              "unpaired_cosine", "anti_aligned", "modality_gap", "align_term")


def train_supervised(x_v: torch.Tensor, targets: Mapping[str, np.ndarray], cfg: TowerConfig,
                     d_t: int = 8) -> FrozenTowers:
    """The image tower of :class:`FrozenTowers` trained with a linear classifier per target on top of its
    (normalised, temperature-scaled) embedding and the summed cross-entropy, same optimiser, steps and batch as the
    contrastive arms. Returns the towers (only the image side trained)."""
    torch.manual_seed(cfg.seed)
    model = FrozenTowers(x_v.shape[1], d_t, cfg.width, cfg.embed_dim)
    ys = {k: torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in targets.items()}
    heads = nn.ModuleDict({k: nn.Linear(cfg.embed_dim, int(y.max()) + 1) for k, y in ys.items()})
    params = list(model.in_v.parameters()) + list(model.trunk.parameters()) + list(model.head_v.parameters())
    opt = torch.optim.AdamW(params + list(heads.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    n, b = len(x_v), min(cfg.batch_size, len(x_v))
    x_v = x_v.float()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.steps)))
        idx = torch.randint(0, n, (b,), generator=gen)
        z = model.encode(x_v[idx], "v") * 10.0
        loss = sum(F.cross_entropy(h(z), ys[k][idx]) for k, h in heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def probe_targets(train_x, test_x, train_t: Mapping, test_t: Mapping, Cs=(0.1, 1.0, 10.0), max_iter=100,
                  seed: int = 0) -> dict:
    """``{target: linear-probe accuracy}`` of features on every downstream target."""
    return {k: linear_probe_eval(train_x, train_t[k], test_x, test_t[k], Cs=Cs, seed=seed,
                                 max_iter=max_iter)["accuracy"] for k in train_t}


def collapse_stats(z_v: torch.Tensor, z_t: torch.Tensor) -> dict:
    """:func:`modality_stats` plus ``anti_aligned``: the fraction of pairs with a negative paired cosine."""
    out = modality_stats(z_v, z_t)
    out["anti_aligned"] = float(((F.normalize(z_v, dim=-1) * F.normalize(z_t, dim=-1)).sum(1) < 0).float().mean())
    return out


def run_gap_unit(x_v: torch.Tensor, captions_by_gap: Mapping[float, torch.Tensor], targets: Mapping[str, np.ndarray],
                 pixels: torch.Tensor, random_init_x_v: torch.Tensor, cfg: TowerConfig, seed: int, *,
                 n_test: int, n_probe_train: int, align_scales: Sequence[float] = (), align_gap: float = 0.0,
                 probe_Cs=(0.1, 1.0, 10.0), probe_max_iter: int = 100, pca_dim: int = 0,
                 threads: int | None = None) -> dict:
    """One unit of the study (see the module docstring). ``x_v``: frozen image features [N, Dv] of all scenes;
    ``captions_by_gap[g]``: frozen caption features [N, Dt] at gap ``g``; ``targets[name]``: labels [N];
    ``pixels``: raw-pixel features [N, P]. A seeded permutation sends ``n_test`` scenes to test; the towers train on
    all the others, the probes on the first ``n_probe_train`` of them. ``pca_dim > 0`` first projects the frozen image
    features on their top ``pca_dim`` principal directions among the training scenes (a fixed linear preprocessing
    step, :meth:`.FeaturePairs.pca_images`, seen by every arm that uses ``x_v``). The Fig. 2 model at scale 0 is the
    CLIP model at gap ``align_gap`` (same data, seed and objective), not trained twice. Returns ``{"clip": {gap: {target: acc}},
    "supervised": {...}, "pixels": {...}, "random_init": {...}, "frozen": {...}, "align": {scale: stats}}``."""
    if threads:
        torch.set_num_threads(int(threads))
    perm = torch.randperm(len(x_v), generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test], perm[n_test:]
    ptr = tr[:n_probe_train]
    if pca_dim:
        x_v = FeaturePairs(x_v, torch.zeros(len(x_v), 1)).pca_images(tr, pca_dim).x_v
    tt = {k: np.asarray(v)[ptr.numpy()] for k, v in targets.items()}
    et = {k: np.asarray(v)[te.numpy()] for k, v in targets.items()}
    pk = dict(Cs=probe_Cs, max_iter=probe_max_iter, seed=seed)
    c = TowerConfig(**{**cfg.__dict__, "seed": seed, "base": "clip", "regularizers": {}})
    out: dict = {"clip": {}, "align": {}}
    trained, clock = {}, _Clock()
    for g, xt in captions_by_gap.items():
        with clock("train"):
            trained[float(g)] = model, hist = train_towers(FeaturePairs(x_v[tr], xt[tr]), c)
        with clock("probe"):
            out["clip"][float(g)] = probe_targets(embed(model, x_v[ptr], "v"), embed(model, x_v[te], "v"), tt, et,
                                                  **pk)
    with clock("train"):
        sup = train_supervised(x_v[tr], {k: np.asarray(v)[tr.numpy()] for k, v in targets.items()}, c)
    with clock("probe"):
        out["supervised"] = probe_targets(embed(sup, x_v[ptr], "v"), embed(sup, x_v[te], "v"), tt, et, **pk)
        out["pixels"] = probe_targets(pixels[ptr], pixels[te], tt, et, **pk)
        torch.manual_seed(seed)
        rnd = FrozenTowers(random_init_x_v.shape[1], 8, cfg.width, cfg.embed_dim).eval()
        out["random_init"] = probe_targets(embed(rnd, random_init_x_v[ptr], "v"),
                                           embed(rnd, random_init_x_v[te], "v"), tt, et, **pk)
        torch.manual_seed(seed)
        rnd = FrozenTowers(x_v.shape[1], 8, cfg.width, cfg.embed_dim).eval()
        out["random_projection"] = probe_targets(embed(rnd, x_v[ptr], "v"), embed(rnd, x_v[te], "v"), tt, et, **pk)
    xt = captions_by_gap[align_gap]
    for s in align_scales:
        with clock("train"):
            if float(s) == 0.0 and float(align_gap) in trained and c.align_scale == 0:
                model, hist = trained[float(align_gap)]
            else:
                model, hist = train_towers(FeaturePairs(x_v[tr], xt[tr]),
                                           TowerConfig(**{**c.__dict__, "align_scale": float(s)}))
        zv, zt = embed(model, x_v[te], "v"), embed(model, xt[te], "t")
        res = {f"ret/{k}": v for k, v in retrieval_eval(zv, zt).items()}
        res.update(collapse_stats(zv, zt))
        res["align_term"] = hist[-1]["align"]
        out["align"][float(s)] = res
    out["cpu_seconds"] = clock.seconds  # process CPU time per phase
    return out


def world_captions(world, info_gap: float) -> list[str]:
    """The captions ``generate_world(n, seed=world.seed, info_gap=info_gap, ...)`` writes for ``world``'s scenes
    (the same caption stream, so the omissions are nested across gaps), without rendering the images again."""
    from ..data.world import _captions

    r_caption = np.random.default_rng(np.random.SeedSequence(int(world.seed)).spawn(6)[2])
    return _captions(world.scene_attrs, r_caption, float(info_gap), world.config.caption_templates)[0]


def arm_values(units: Sequence[Mapping], arm: str, task: str, gap: float | None = None) -> np.ndarray:
    """Per-unit probe accuracies in % of ``arm`` on ``task`` (the CLIP arm: at information gap ``gap``)."""
    return np.array([100 * float(u[arm][str(float(gap))][task] if gap is not None else u[arm][task])
                     for u in units])


def _mean_sd(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def part1_rows(units: Sequence[Mapping], targets: Mapping[str, np.ndarray], tasks: Sequence[str],
               info_gaps: Sequence[float]) -> list[dict]:
    """``{"task", "arm", "acc", "std"}`` rows (%, over units): CLIP at every gap, the supervised model, the random
    projection, the gates of :data:`GATES` and the majority class."""
    from ..stats import majority_rate

    rows = []
    for task in tasks:
        arms = [(f"CLIP, gap {g:g}", arm_values(units, "clip", task, g)) for g in info_gaps]
        arms += [(a, arm_values(units, a, task)) for a in ("supervised", "random_projection") + GATES]
        rows += [{"task": task, "arm": a, "acc": _mean_sd(v)[0], "std": _mean_sd(v)[1]} for a, v in arms]
        rows.append({"task": task, "arm": "majority", "acc": 100 * majority_rate(targets[task]), "std": 0.0})
    return rows


def gap_claims(units: Sequence[Mapping], targets: Mapping[str, np.ndarray], tasks: Mapping[str, str],
               claim_tasks: Sequence[str], info_gaps: Sequence[float], *, alpha: float,
               gate_margin: float) -> tuple[list[dict], list[dict], list[str]]:
    """Part 1 verdicts: on each of ``claim_tasks``, CLIP at the largest gap below CLIP at gap 0 (``gap``) and below
    the image-only supervised model (``vs_single``), paired over units. Gates: CLIP at gap 0 and the comparator must
    beat chance, the majority class, raw pixels and the random-init encoder by ``gate_margin`` points; CLIP at the
    largest gap must beat chance and majority. A failed gate is explained in words from the numbers.
    Returns ``(claim rows, summary rows, printed lines)``."""
    from reproduce.claims import claim_row

    from ..stats import chance_rate, gate, majority_rate, paired_verdict

    claims, summary, lines = [], [], []
    top = max(info_gaps)
    for task, title in tasks.items():
        base = {"chance": 100 * chance_rate(len(np.unique(targets[task]))),
                "majority": 100 * majority_rate(targets[task])}
        base.update({a: float(arm_values(units, a, task).mean()) for a in GATES})
        c0, ctop, sup = (arm_values(units, "clip", task, 0.0), arm_values(units, "clip", task, top),
                         arm_values(units, "supervised", task))
        g0, gs = gate(c0.mean(), base, gate_margin), gate(sup.mean(), base, gate_margin)
        gt = gate(ctop.mean(), {"chance": base["chance"], "majority": base["majority"]}, 0.0)
        if task in claim_tasks:
            for cid, a, gates_, what in (("gap", c0, [g0, gt], f"CLIP at gap {top:g} vs gap 0"),
                                         ("vs_single", sup, [g0, gs], f"CLIP at gap {top:g} vs the image-only "
                                                                     "supervised model")):
                v = paired_verdict(a, ctop, direction=-1, alpha=alpha)
                claims.append(claim_row(
                    f"lms.info_gap.{cid}.{task}", "lms", "with a large information gap, contrastive features lose to "
                    f"{'a small gap' if cid == 'gap' else 'a single-modality model'} ({title})",
                    f"world, frozen encoders + towers, {len(units)} units", f"{what}, probe accuracy points", v,
                    gates=gates_, note="gate: CLIP at gap 0 and the comparator beat raw pixels / a random-init "
                    "encoder / majority by gate_margin"))
                lines.append(f"{title:<24} {what:<52} {_verdict_text(claims[-1])}")
            failed = [g for g in (g0, gs) if not g.passed]
            if failed:
                lines.append(gate_explanation(title, c0.mean(), sup.mean(), base, gate_margin))
        for g in info_gaps:
            m, sd = _mean_sd(arm_values(units, "clip", task, g))
            summary.append({"experiment": "information gap (world)", "metric": f"{title} probe acc. (%), CLIP gap {g:g}",
                            "value": m, "std": sd, "n": len(units)})
        m, sd = _mean_sd(sup)
        summary.append({"experiment": "information gap (world)", "metric": f"{title} probe acc. (%), image-only "
                        "supervised", "value": m, "std": sd, "n": len(units)})
    return claims, summary, lines


def _verdict_text(row: Mapping) -> str:
    """``verdict: effect [95% CI] (n, MDE)`` of a claim row, in points."""
    return (f"{row['verdict']}: effect {row['effect']:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}] "
            f"(n={row['n']}, MDE {row['mde']:.2f})")


def gate_explanation(title: str, clip0: float, supervised: float, baselines: Mapping[str, float],
                     margin: float) -> str:
    """Why a Part-1 task is uninformative, in words from the numbers (accuracies in %)."""
    best = max(baselines, key=baselines.get)
    who = [n for n, v in (("CLIP at gap 0", clip0), ("the image-only supervised model", supervised))
           if v <= baselines[best] + margin]
    s = (f"  -> {title}: uninformative because {' and '.join(who)} ({clip0:.1f} / {supervised:.1f} %) do not beat "
         f"the {best.replace('_', '-')} gate ({baselines[best]:.1f} %) by {margin:g} points")
    if best == "pixels":
        s += ("; a linear read-out of the raw pixels already solves this task, so no learned representation can "
              "show on it what pre-training adds (the drop with the gap is shown, not scored)")
    elif best == "random_init":
        s += "; an untrained encoder already keeps what this task needs, so pre-training adds nothing measurable here"
    return s


def align_rows(units: Sequence[Mapping], scales: Sequence[float]) -> list[dict]:
    """Fig. 2 table: per alignment scale, the mean over units of :data:`ALIGN_KEYS`."""
    return [{"scale": float(s), **{k: float(np.mean([u["align"][str(float(s))][k] for u in units]))
                                   for k in ALIGN_KEYS}} for s in scales]


def align_claims(units: Sequence[Mapping], scales: Sequence[float], *, n_test: int, align_gap: float, alpha: float,
                 margin: float, gate_margin: float) -> tuple[list[dict], list[dict], list[str]]:
    """Fig. 2 verdicts: at every scale s > 0, mean R@1/5/10 at s vs scale 0, non-superiority with ``margin`` points
    (``reproduced`` = the alignment term does not raise retrieval by more than the margin). Gate: retrieval at scale
    0 beats random ranking of ``n_test`` captions by ``gate_margin`` points."""
    from reproduce.claims import claim_row

    from ..stats import gate, paired_verdict

    rec = {float(s): np.array([100 * u["align"][str(float(s))]["ret/mean_recall"] for u in units]) for s in scales}
    stats = {r["scale"]: r for r in align_rows(units, scales)}
    ret_gate = gate(rec[0.0].mean(), {"chance": 100 * (1 + 5 + 10) / 3 / n_test}, gate_margin)
    claims, summary, lines = [], [], []
    for s in scales:
        if float(s) == 0.0:
            continue
        v = paired_verdict(rec[0.0], rec[float(s)], direction=-1, alpha=alpha, margin=margin)
        claims.append(claim_row(
            f"lms.fig2.align_scale_{s:g}", "lms", "tighter alignment (1/<zT,zV>^2) does not improve zero-shot "
            "retrieval (Fig. 2)", f"world gap {align_gap:g}, {len(units)} units; non-superiority, margin {margin:g} "
            "points", f"mean R@1/5/10 points, scale {s:g} - scale 0", v, gates=[ret_gate],
            paper_key="lms.information_gap_claim"))
        lines.append(f"alignment scale {s:<6g} vs 0: retrieval {_verdict_text(claims[-1])}; unpaired cos "
                     f"{stats[float(s)]['unpaired_cosine']:.2f}, anti-aligned {stats[float(s)]['anti_aligned']:.2f}")
        m, sd = _mean_sd(rec[float(s)])
        summary.append({"experiment": "Fig. 2 alignment (world)", "metric": f"mean R@1/5/10 (%), scale {s:g}",
                        "value": m, "std": sd, "n": len(units)})
    return claims, summary, lines


def plot_probe_vs_gap(units: Sequence[Mapping], tasks: Mapping[str, str], info_gaps: Sequence[float]):
    """One panel per task: CLIP's probe accuracy vs the gap (mean ± sd over units), the supervised model, the random
    projection and the gates as horizontal lines. Returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.6), squeeze=False)
    for ax, (task, title) in zip(axes[0], tasks.items()):
        v = [arm_values(units, "clip", task, g) for g in info_gaps]
        ax.errorbar(info_gaps, [x.mean() for x in v], yerr=[x.std(ddof=1) if len(x) > 1 else 0 for x in v],
                    marker="o", capsize=3, label="CLIP (image–text)")
        for arm, color in zip(("supervised", "random_projection") + GATES, ("C1", "C4", "gray", "k")):
            ax.axhline(arm_values(units, arm, task).mean(), ls="-" if arm == "supervised" else ":", color=color,
                       label=arm)
        ax.set(xlabel="info_gap (P[attribute omitted])", title=title, ylabel="probe accuracy % (held-out)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_alignment(units: Sequence[Mapping], scales: Sequence[float]):
    """Fig. 2: retrieval per unit vs the alignment scale, and the collapse diagnostics. Returns the figure."""
    import matplotlib.pyplot as plt

    rows = align_rows(units, scales)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    xs = [max(float(s), 1e-3) for s in scales]
    for u in units:
        axes[0].plot(xs, [100 * u["align"][str(float(s))]["ret/mean_recall"] for s in scales], "o-", alpha=0.5)
    for k, style in (("paired_cosine", "o-"), ("unpaired_cosine", "s--"), ("anti_aligned", "^:")):
        axes[1].plot(xs, [r[k] for r in rows], style, label=k)
    axes[0].set(xscale="log", xlabel="alignment scale (0 drawn at 1e-3)", ylabel="mean R@1,5,10 % (per seed)")
    axes[1].set(xscale="log", xlabel="alignment scale", title="collapse diagnostics (held-out)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig
