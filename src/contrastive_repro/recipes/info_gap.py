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
from .frozen_clip import FeaturePairs, FrozenTowers, TowerConfig, embed, train_towers

__all__ = ["train_supervised", "probe_targets", "collapse_stats", "run_gap_unit"]


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
                 probe_Cs=(0.1, 1.0, 10.0), probe_max_iter: int = 100, threads: int | None = None) -> dict:
    """One unit of the study (see the module docstring). ``x_v``: frozen image features [N, Dv] of all scenes;
    ``captions_by_gap[g]``: frozen caption features [N, Dt] at gap ``g``; ``targets[name]``: labels [N];
    ``pixels``: raw-pixel features [N, P]. A seeded permutation sends ``n_test`` scenes to test; the towers train on
    all the others, the probes on the first ``n_probe_train`` of them. Returns ``{"clip": {gap: {target: acc}},
    "supervised": {...}, "pixels": {...}, "random_init": {...}, "frozen": {...}, "align": {scale: stats}}``."""
    if threads:
        torch.set_num_threads(int(threads))
    perm = torch.randperm(len(x_v), generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test], perm[n_test:]
    ptr = tr[:n_probe_train]
    tt = {k: np.asarray(v)[ptr.numpy()] for k, v in targets.items()}
    et = {k: np.asarray(v)[te.numpy()] for k, v in targets.items()}
    pk = dict(Cs=probe_Cs, max_iter=probe_max_iter, seed=seed)
    c = TowerConfig(**{**cfg.__dict__, "seed": seed, "base": "clip", "regularizers": {}})
    out: dict = {"clip": {}, "align": {}}
    for g, xt in captions_by_gap.items():
        model, _ = train_towers(FeaturePairs(x_v[tr], xt[tr]), c)
        out["clip"][float(g)] = probe_targets(embed(model, x_v[ptr], "v"), embed(model, x_v[te], "v"), tt, et, **pk)
    sup = train_supervised(x_v[tr], {k: np.asarray(v)[tr.numpy()] for k, v in targets.items()}, c)
    out["supervised"] = probe_targets(embed(sup, x_v[ptr], "v"), embed(sup, x_v[te], "v"), tt, et, **pk)
    out["pixels"] = probe_targets(pixels[ptr], pixels[te], tt, et, **pk)
    torch.manual_seed(seed)
    rnd = FrozenTowers(random_init_x_v.shape[1], 8, cfg.width, cfg.embed_dim).eval()
    out["random_init"] = probe_targets(embed(rnd, random_init_x_v[ptr], "v"), embed(rnd, random_init_x_v[te], "v"),
                                       tt, et, **pk)
    torch.manual_seed(seed)
    rnd = FrozenTowers(x_v.shape[1], 8, cfg.width, cfg.embed_dim).eval()
    out["random_projection"] = probe_targets(embed(rnd, x_v[ptr], "v"), embed(rnd, x_v[te], "v"), tt, et, **pk)
    xt = captions_by_gap[align_gap]
    for s in align_scales:
        model, hist = train_towers(FeaturePairs(x_v[tr], xt[tr]),
                                   TowerConfig(**{**c.__dict__, "align_scale": float(s)}))
        zv, zt = embed(model, x_v[te], "v"), embed(model, xt[te], "t")
        res = {f"ret/{k}": v for k, v in retrieval_eval(zv, zt).items()}
        res.update(collapse_stats(zv, zt))
        res["align_term"] = hist[-1]["align"]
        out["align"][float(s)] = res
    return out
