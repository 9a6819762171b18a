"""Deep metric learning on cached frozen features: a trainable embedding head, +/- TCM, on class-disjoint splits.

The TCM notebooks (06-08; Zhang et al., "Threshold-Consistent Margin Loss for Open-World Deep Metric Learning",
ICLR 2024) need many paired runs (splits x seeds x arms). Training a small head on pre-computed features of a
frozen encoder (:func:`contrastive_repro.features.image_features`) makes one run take about a second on a CPU::

    from contrastive_repro.recipes.frozen_dml import HeadConfig, class_split, train_head, embed_head, evaluate_embeddings

    tr, te = class_split(labels, n_test_classes=50, seed=0)
    head = train_head(x[tr], labels[tr], HeadConfig(loss="smooth_ap", tcm=True), views=v[tr])
    evaluate_embeddings(embed_head(head, x[te]), labels[te])   # R@1, MAP@R, OPIS (two references), 10%-OPIS

Protocol
--------
* ``class_split``: train and test hold disjoint classes (open set); items labelled ``-1`` are left out.
* ``train_head``: inputs centred with the *training* mean and divided by one global scale (the RMS of the centred
  training features; per-dimension scaling would blow up dimensions that are constant on the training classes); a linear (``hidden=0``) or one-hidden-layer
  MLP head to ``embed_dim``; P x m class-balanced batches (``batch_size // samples_per_class`` distinct classes,
  ``samples_per_class`` items each, with replacement inside a class smaller than m); each item's input is its clean
  feature or one of its ``views`` (augmented crops), uniformly; AdamW with a cosine schedule; base loss from
  :func:`~contrastive_repro.losses.dml.build_dml_loss` plus ``tcm_weight * TCM(m+, m-)`` when ``tcm``.
  The same seed gives the same initialisation and the same batches with and without TCM (paired arms).
* ``select_tcm_margins``: TCM's margins are chosen on *validation classes* (held-out training classes), never on
  the test classes: among the candidates whose validation R@1 is within ``r1_tolerance`` of the base loss's, the
  one with the lowest validation OPIS.
* ``tcm_pair_unit``: one unit of the paired design (one class split): margin selection on that split's validation
  classes, then base and TCM heads for every seed, trained on all training classes and scored on the test classes.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HeadConfig", "class_split", "train_head", "embed_head", "evaluate_embeddings", "retrieval_chance",
           "recall_at_1", "select_lr", "select_tcm_margins", "tcm_pair_unit", "frozen_gates", "load_emoji_frozen", "EMOJI_LABEL_SETS", "TCM_DIRECTIONS",
           "paired_arms", "summarize_tcm_cell", "evaluate_any_size", "end_to_end_pair_unit",
           "tcm_active_pairs"]


# ---------------------------------------------------------------------------------------------------------- splits
def class_split(labels, n_test_classes: int | None = None, test_fraction: float = 0.5, seed: int = 0,
                min_class_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, test)`` of items whose classes are disjoint; items labelled ``< 0`` and classes with fewer
    than ``min_class_size`` items are left out. ``n_test_classes`` (default ``round(test_fraction * C)``) classes,
    drawn with ``numpy.random.default_rng(seed)``, go to the test side."""
    y = torch.as_tensor(labels).reshape(-1).long()
    valid = y >= 0
    cls, counts = torch.unique(y[valid], return_counts=True)
    cls = cls[counts >= int(min_class_size)].numpy()
    if len(cls) < 2:
        raise ValueError(f"class_split needs >= 2 classes with >= {min_class_size} items, got {len(cls)}")
    n_te = int(round(test_fraction * len(cls))) if n_test_classes is None else int(n_test_classes)
    if not 1 <= n_te <= len(cls) - 1:
        raise ValueError(f"n_test_classes must be in 1..{len(cls) - 1}, got {n_te}")
    perm = np.random.default_rng(int(seed)).permutation(cls)
    test_cls, train_cls = perm[:n_te], perm[n_te:]
    yn = y.numpy()
    return (torch.as_tensor(np.flatnonzero(np.isin(yn, train_cls))),
            torch.as_tensor(np.flatnonzero(np.isin(yn, test_cls))))


# ----------------------------------------------------------------------------------------------------------- head
@dataclass
class HeadConfig:
    """Training settings of :func:`train_head` (see the module docstring)."""

    loss: str = "smooth_ap"
    tcm: bool = False
    tcm_pos_margin: float = 0.9
    tcm_neg_margin: float = 0.5
    tcm_weight: float = 1.0
    loss_kwargs: dict = field(default_factory=dict)
    embed_dim: int = 128  # 0: the input dimension (required by init="identity")
    hidden: int = 0  # 0: linear head; > 0: Linear-ReLU-Linear with this width
    init: str = "identity"  # identity: residual head x + B A x (B = 0 at start) on the centred, scaled features
    rank: int = 64  # rank of the residual correction B A (init="identity")
    steps: int = 300
    batch_size: int = 64
    samples_per_class: int = 4
    lr: float = 1e-3
    loss_lr_mult: float | None = None  # class weights / proxies; None: 100 for proxy_anchor, 10 for arcface
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    use_views: bool = True
    seed: int = 0

    def __post_init__(self):
        from ..losses.dml import DML_LOSS_NAMES

        self.loss = str(self.loss).lower().replace("-", "_")
        if self.loss not in DML_LOSS_NAMES:
            raise ValueError(f"HeadConfig.loss: unknown loss {self.loss!r}; allowed: {', '.join(DML_LOSS_NAMES)}")
        if self.init not in ("identity", "random"):
            raise ValueError(f"HeadConfig.init must be 'identity' or 'random', got {self.init!r}")
        if self.init == "identity" and (self.hidden > 0 or self.embed_dim != 0 or self.rank < 1):
            raise ValueError("HeadConfig: init='identity' needs hidden=0, embed_dim=0 (the input dimension) and "
                             f"rank >= 1; got hidden={self.hidden}, embed_dim={self.embed_dim}, rank={self.rank}")
        if self.steps < 1 or self.embed_dim < 0 or self.hidden < 0:
            raise ValueError(f"HeadConfig: need steps >= 1, embed_dim >= 1, hidden >= 0; got steps={self.steps}, "
                             f"embed_dim={self.embed_dim}, hidden={self.hidden}")
        if self.samples_per_class < 2 or self.batch_size < 2 * self.samples_per_class:
            raise ValueError(f"HeadConfig: need samples_per_class >= 2 and batch_size >= 2 * samples_per_class; got "
                             f"batch_size={self.batch_size}, samples_per_class={self.samples_per_class}")
        if not (self.tcm_pos_margin > self.tcm_neg_margin):
            raise ValueError(f"HeadConfig: tcm_pos_margin ({self.tcm_pos_margin}) must exceed tcm_neg_margin "
                             f"({self.tcm_neg_margin})")

    def replace(self, **kw) -> "HeadConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Head(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, in_dim: int, cfg: HeadConfig):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        out = cfg.embed_dim or in_dim
        self.residual = cfg.init == "identity"
        if self.residual:  # z = x + B(A x): starts as the centred, scaled features
            self.net = nn.Sequential(nn.Linear(in_dim, min(cfg.rank, in_dim), bias=False),
                                     nn.Linear(min(cfg.rank, in_dim), in_dim))
            nn.init.zeros_(self.net[1].weight)
            nn.init.zeros_(self.net[1].bias)
        elif cfg.hidden > 0:
            self.net = nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, out))
        else:
            self.net = nn.Linear(in_dim, out)

    def forward(self, x):
        x = (x - self.mean) / self.std
        return x + self.net(x) if self.residual else self.net(x)


def _batches(y: np.ndarray, cfg: HeadConfig, rng: np.random.Generator):
    """P x m index batches forever: P distinct classes (reshuffled when exhausted), m items each."""
    classes = np.unique(y)
    members = {c: np.flatnonzero(y == c) for c in classes}
    m = int(cfg.samples_per_class)
    p = min(len(classes), cfg.batch_size // m)
    if p < 2:
        raise ValueError(f"need >= 2 classes per batch, got {p} (classes {len(classes)}, batch {cfg.batch_size})")
    order, pos = rng.permutation(classes), 0
    while True:
        if pos + p > len(order):
            order, pos = rng.permutation(classes), 0
        pick = order[pos:pos + p]
        pos += p
        idx = [rng.choice(members[c], m, replace=len(members[c]) < m) for c in pick]
        yield np.concatenate(idx)


def train_head(x, y, cfg: HeadConfig, views=None) -> nn.Module:
    """Train an embedding head on features ``x`` [N, D] with labels ``y`` [N] (``views`` [N, K, D] optional);
    returns the head in eval mode (input: raw features, output: ``cfg.embed_dim`` unnormalized embeddings)."""
    from ..losses.dml import build_dml_loss

    x = torch.as_tensor(x).float()
    y_raw = torch.as_tensor(y).reshape(-1).long()
    if x.ndim != 2 or len(x) != len(y_raw):
        raise ValueError(f"train_head: x must be [N, D] with N labels, got {tuple(x.shape)} and {len(y_raw)}")
    uniq, yd = torch.unique(y_raw, return_inverse=True)
    g = torch.Generator().manual_seed(int(cfg.seed))
    torch.manual_seed(int(cfg.seed))
    rng = np.random.default_rng(int(cfg.seed))
    # centre with the training mean and divide by one global scale (the RMS of the centred features): per-dimension
    # standardization blows up dimensions that are (almost) constant on the training classes but not on new ones
    mean = x.mean(0)
    std = ((x - mean) ** 2).mean().sqrt().clamp_min(1e-12).expand(x.shape[1]).clone()
    head = _Head(mean, std, x.shape[1], cfg)
    v = None
    if views is not None and cfg.use_views:
        v = torch.as_tensor(views).float()
        if v.ndim != 3 or v.shape[0] != len(x) or v.shape[2] != x.shape[1]:
            raise ValueError(f"train_head: views must be [N, K, D] matching x {tuple(x.shape)}, got {tuple(v.shape)}")
        v = v if v.shape[1] > 0 else None
    loss_fn = build_dml_loss(cfg.loss, num_classes=int(uniq.numel()), embedding_size=cfg.embed_dim or x.shape[1], tcm=cfg.tcm,
                             tcm_weight=cfg.tcm_weight,
                             tcm_kwargs=dict(pos_margin=cfg.tcm_pos_margin, neg_margin=cfg.tcm_neg_margin)
                             if cfg.tcm else None, check_finite=False, **cfg.loss_kwargs)
    mult = cfg.loss_lr_mult if cfg.loss_lr_mult is not None else {"proxy_anchor": 100.0, "arcface": 10.0}.get(
        cfg.loss, 1.0)
    groups = [{"params": list(head.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    lp = [p for p in loss_fn.parameters() if p.requires_grad]
    if lp:
        groups.append({"params": lp, "lr": cfg.lr * mult, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    base_lrs = [gr["lr"] for gr in opt.param_groups]
    batches = _batches(yd.numpy(), cfg, rng)
    n_views = 0 if v is None else int(v.shape[1])
    head.train()
    for step in range(int(cfg.steps)):
        f = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 0.5 * (
            1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
        for gr, lr0 in zip(opt.param_groups, base_lrs):
            gr["lr"] = lr0 * f
        idx = torch.as_tensor(next(batches))
        xb = x[idx]
        if n_views:
            pick = torch.randint(0, n_views + 1, (len(idx),), generator=g)
            sel = pick > 0
            if bool(sel.any()):
                xb = xb.clone()
                xb[sel] = v[idx[sel], pick[sel] - 1]
        loss = loss_fn(head(xb), yd[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_head: non-finite {cfg.loss} loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def embed_head(head: nn.Module | None, x) -> torch.Tensor:
    """L2-normalized embeddings of features ``x`` (``head=None``: the features themselves)."""
    x = torch.as_tensor(x).float()
    z = x if head is None else head(x)
    return F.normalize(z, dim=1)


# ---------------------------------------------------------------------------------------------------- evaluation
def recall_at_1(z, y) -> float:
    """Leave-one-out Recall@1 with cosine similarity (ties: the first index)."""
    z = F.normalize(torch.as_tensor(z, dtype=torch.float64), dim=1)
    y = torch.as_tensor(y).reshape(-1)
    s = z @ z.T
    s.fill_diagonal_(-math.inf)
    return float((y[s.argmax(1)] == y).double().mean())


def retrieval_chance(y) -> float:
    """Expected leave-one-out R@1 of a random neighbour: ``sum_c n_c (n_c - 1) / (N (N - 1))``."""
    y = torch.as_tensor(y).reshape(-1)
    n = len(y)
    if n < 2:
        raise ValueError("retrieval_chance needs >= 2 items")
    c = torch.bincount(torch.unique(y, return_inverse=True)[1]).double()
    return float((c * (c - 1)).sum() / (n * (n - 1)))


def evaluate_embeddings(z, y, epsilon: float = 0.1, far_range=(1e-2, 1e-1)) -> dict:
    """R@1, OPIS (``reference="class_mean"``), ``OPIS_global`` (``reference="global"``) and ``eps_OPIS``
    (exact, :mod:`contrastive_repro.metrics.opis` defaults), all on cosine distances."""
    from ..metrics import epsilon_opis, opis

    z = torch.as_tensor(z).double()
    y = torch.as_tensor(y).reshape(-1).long()
    d = epsilon_opis(z, y, epsilon=epsilon, far_range=far_range, return_details=True)
    return {"R@1": recall_at_1(z, y), "OPIS": float(d["opis"]),
            "OPIS_global": float(opis(z, y, far_range=far_range, reference="global")),
            "eps_OPIS": float(d["epsilon_opis"]), "n": int(len(y)), "n_classes": int(torch.unique(y).numel())}


def frozen_gates(x_test, y_test, x_random=None) -> dict:
    """Trivial baselines of a test split: ``chance`` (random neighbour), ``frozen`` (R@1 of the frozen features
    themselves, no head) and ``random_init`` (R@1 of a random-init encoder's features, when given)."""
    out = {"chance": retrieval_chance(y_test), "frozen": recall_at_1(x_test, y_test)}
    if x_random is not None:
        out["random_init"] = recall_at_1(x_random, y_test)
    return out


# -------------------------------------------------------------------------------------------- margins + paired unit
def select_tcm_margins(x, y, cfg: HeadConfig, candidates: Sequence[Sequence[float]], views=None,
                       n_val_classes: int | None = None, val_fraction: float = 0.2, split_seed: int = 0,
                       r1_tolerance: float = 0.01) -> dict:
    """Choose TCM's ``(m+, m-)`` on validation classes held out of the training data ``(x, y)``.

    The base head and one TCM head per candidate are trained on the remaining training classes (same seed) and
    scored on the validation classes. Chosen: the lowest validation OPIS among candidates whose validation R@1 is at
    least the base's minus ``r1_tolerance`` (if none qualifies, the one with the best R@1). Returns
    ``{"pos_margin", "neg_margin", "table": [...], "base": {...}}``.
    """
    if not candidates:
        raise ValueError("select_tcm_margins: no candidates")
    y = torch.as_tensor(y).reshape(-1).long()
    tr, va = class_split(y, n_test_classes=n_val_classes, test_fraction=val_fraction, seed=split_seed + 1000)
    vx = None if views is None else torch.as_tensor(views)[tr]
    base = evaluate_embeddings(embed_head(train_head(x[tr], y[tr], cfg.replace(tcm=False), vx), x[va]), y[va])
    table = []
    for mp, mn in candidates:
        c = cfg.replace(tcm=True, tcm_pos_margin=float(mp), tcm_neg_margin=float(mn))
        r = evaluate_embeddings(embed_head(train_head(x[tr], y[tr], c, vx), x[va]), y[va])
        table.append({"pos_margin": float(mp), "neg_margin": float(mn), "val_R@1": r["R@1"], "val_OPIS": r["OPIS"]})
    ok = [t for t in table if t["val_R@1"] >= base["R@1"] - r1_tolerance]
    best = min(ok, key=lambda t: t["val_OPIS"]) if ok else max(table, key=lambda t: t["val_R@1"])
    return {"pos_margin": best["pos_margin"], "neg_margin": best["neg_margin"], "table": table,
            "base": {"val_R@1": base["R@1"], "val_OPIS": base["OPIS"]}, "n_val_classes": int(
                torch.unique(y[va]).numel())}


def select_lr(x, y, cfg: HeadConfig, lrs: Sequence[float], views=None, val_fraction: float = 0.2,
              split_seed: int = 0) -> dict:
    """The base head's learning rate with the best R@1 on validation classes held out of ``(x, y)`` (the same
    validation classes as :func:`select_tcm_margins`; ties: the first). Returns ``{"lr", "table"}``."""
    y = torch.as_tensor(y).reshape(-1).long()
    tr, va = class_split(y, test_fraction=val_fraction, seed=split_seed + 1000)
    vx = None if views is None else torch.as_tensor(views)[tr]
    table = [{"lr": float(lr), "val_R@1": recall_at_1(embed_head(train_head(x[tr], y[tr], cfg.replace(
        tcm=False, lr=float(lr)), vx), x[va]), y[va])} for lr in lrs]
    return {"lr": max(table, key=lambda t: t["val_R@1"])["lr"], "table": table}


def tcm_pair_unit(x, y, cfg: HeadConfig, seeds: Sequence[int], split_seed: int, n_test_classes: int | None,
                  candidates: Sequence[Sequence[float]], views=None, x_random=None, val_fraction: float = 0.2,
                  r1_tolerance: float = 0.01, lr_candidates: Sequence[float] | None = None) -> dict:
    """One class split of the paired TCM design: the head's learning rate (``lr_candidates``, optional) and then
    TCM's margins chosen on validation classes of the training side, then for every seed a base head and a TCM head
    (same seed, initialisation and batches) trained on all training classes and scored on the test classes.
    Returns a JSON-able dict: ``lr`` / ``margins`` (the selection records), ``gates`` (:func:`frozen_gates` on the
    test classes), ``runs`` = ``[{seed, arm: base|tcm, R@1, OPIS, ...}]``."""
    t0 = time.time()
    x = torch.as_tensor(x).float()
    y = torch.as_tensor(y).reshape(-1).long()
    tr, te = class_split(y, n_test_classes=n_test_classes, seed=split_seed)
    v = None if views is None else torch.as_tensor(views).float()
    lr_sel = None
    if lr_candidates:
        lr_sel = select_lr(x[tr], y[tr], cfg.replace(seed=int(seeds[0])), lr_candidates,
                           None if v is None else v[tr], val_fraction=val_fraction, split_seed=split_seed)
        cfg = cfg.replace(lr=lr_sel["lr"])
    sel = select_tcm_margins(x[tr], y[tr], cfg.replace(seed=int(seeds[0])), candidates,
                             None if v is None else v[tr], val_fraction=val_fraction, split_seed=split_seed,
                             r1_tolerance=r1_tolerance)
    runs = []
    for s in seeds:
        for arm in ("base", "tcm"):
            c = cfg.replace(seed=int(s), tcm=arm == "tcm", tcm_pos_margin=sel["pos_margin"],
                            tcm_neg_margin=sel["neg_margin"])
            head = train_head(x[tr], y[tr], c, None if v is None else v[tr])
            runs.append({"seed": int(s), "arm": arm, **evaluate_embeddings(embed_head(head, x[te]), y[te])})
    gates = frozen_gates(x[te], y[te], None if x_random is None else torch.as_tensor(x_random)[te])
    return {"split": int(split_seed), "lr": lr_sel, "margins": sel, "gates": gates, "runs": runs,
            "n_train_classes": int(torch.unique(y[tr]).numel()), "n_test_classes": int(torch.unique(y[te]).numel()),
            "n_test": int(len(te)), "seconds": round(time.time() - t0, 2), "config": cfg.to_dict()}


# ---------------------------------------------------------------------------------------------------------- data
EMOJI_LABEL_SETS = ("emoji_subgroup", "emoji_family")


def load_emoji_frozen(label_sets: Sequence[str] = EMOJI_LABEL_SETS, layers: Sequence[str] = ("final", "mid"),
                      resolution: int = 64, views: int = 2, max_items: int | None = None, seed: int = 0,
                      random_init: bool = True) -> dict:
    """Frozen EfficientNet-Lite0 features of the emoji and their open-set label sets.

    ``emoji_subgroup``: the Unicode sub-group (99), keeping one emoji per family (the tone-less base), so that
    skin-tone near-duplicates cannot make retrieval trivial; ``emoji_family``: an emoji and its skin-tone variants
    (:mod:`contrastive_repro.data.emoji_families`; families with >= 2 members). Items outside a label set are -1.
    ``max_items``: a random subset of whole families (smoke runs, a cold cache), else every emoji with the project's
    standard cached call. ``random_init``: also the features of a random-init encoder (clean images only; the gate).
    Returns ``{"x": {layer: [N, D]}, "views": {layer: [N, K, D]}, "x_random": {layer: [N, D]} | None,
    "labels": {label_set: [N]}, "n": N}``.
    """
    from ..data.emoji import load_emoji
    from ..data.emoji_families import emoji_family_key, emoji_family_labels, emoji_family_representatives
    from ..features import image_features

    bad = [s for s in label_sets if s not in EMOJI_LABEL_SETS]
    if bad:
        raise ValueError(f"unknown label set(s) {bad}; allowed: {', '.join(EMOJI_LABEL_SETS)}")
    ds = load_emoji(size=64)
    idx = torch.arange(len(ds))
    name = "emoji-64px"
    if max_items is not None and int(max_items) < len(ds):
        keys = [emoji_family_key(c) for c in ds.codepoints]
        uniq = sorted(set(keys))
        order = np.random.default_rng(int(seed)).permutation(len(uniq))
        members: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            members.setdefault(k, []).append(i)
        # families with variants first, so that a small subset still holds many multi-member classes
        ranked = sorted((uniq[j] for j in order), key=lambda k: len(members[k]) < 2)
        pick: list[int] = []
        for k in ranked:
            if len(pick) + len(members[k]) > int(max_items):
                continue
            pick.extend(members[k])
        idx = torch.as_tensor(sorted(pick))
        name = f"emoji-64px-subset{len(idx)}-seed{int(seed)}"
    images = ds.images[idx]
    cps = [ds.codepoints[int(i)] for i in idx]
    f = image_features(images, name, layers=tuple(layers), resolution=resolution, views=views)
    fr = (image_features(images, name, layers=tuple(layers), resolution=resolution, views=0, pretrained=False)
          if random_init else None)
    labels = {}
    if "emoji_subgroup" in label_sets:
        sub = ds.subgroup_labels[idx].clone()
        sub[~emoji_family_representatives(cps)] = -1
        labels["emoji_subgroup"] = sub
    if "emoji_family" in label_sets:
        labels["emoji_family"] = emoji_family_labels(cps)
    return {"x": {l: f[l].float() for l in layers},
            "views": {l: f[f"view_{l}"].float() for l in layers} if views else {l: None for l in layers},
            "x_random": {l: fr[l].float() for l in layers} if fr is not None else None,
            "labels": labels, "n": int(len(idx))}


# ------------------------------------------------------------------------------------------------------ summary
#: metric -> the sign of (TCM - base) the paper claims (+1: higher with TCM)
TCM_DIRECTIONS = {"R@1": +1, "OPIS": -1, "OPIS_global": -1, "eps_OPIS": -1}


def paired_arms(units: Sequence[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per (split, seed) the base and TCM values of ``metric`` from :func:`tcm_pair_unit` results, aligned."""
    a, b = [], []
    for u in units:
        runs = {(r["seed"], r["arm"]): r for r in u["runs"]}
        for (seed, arm), r in sorted(runs.items()):
            if arm == "base" and (seed, "tcm") in runs:
                a.append(float(r[metric]))
                b.append(float(runs[(seed, "tcm")][metric]))
    return np.asarray(a), np.asarray(b)


def summarize_tcm_cell(units: Sequence[dict], alpha: float = 0.05, gate_margin: float = 0.0) -> dict:
    """One comparison (dataset x backbone x loss) over its units: per metric the paired verdict (TCM - base, in the
    paper's direction, :func:`contrastive_repro.stats.paired_verdict`) and the relative change of the means (%);
    the gates: each arm's mean test R@1 against the mean of chance / frozen features / random-init encoder over the
    same splits (:func:`contrastive_repro.stats.gate`)."""
    from ..stats import gate, paired_verdict

    if not units:
        raise ValueError("summarize_tcm_cell: no units")
    out = {"verdicts": {}, "rel_change_pct": {}}
    for m, direction in TCM_DIRECTIONS.items():
        a, b = paired_arms(units, m)
        v = paired_verdict(a, b, direction=direction, alpha=alpha)
        out["verdicts"][m] = v
        out["rel_change_pct"][m] = float(100 * (b.mean() - a.mean()) / a.mean()) if a.mean() != 0 else float("nan")
    names = sorted(set.intersection(*(set(u["gates"]) for u in units)))
    baselines = {k: float(np.mean([u["gates"][k] for u in units])) for k in names}
    a, b = paired_arms(units, "R@1")
    out["gates"] = [gate(float(a.mean()), baselines, gate_margin), gate(float(b.mean()), baselines, gate_margin)]
    out["margins"] = [(u["margins"]["pos_margin"], u["margins"]["neg_margin"]) for u in units]
    out["n_test_classes"] = [u["n_test_classes"] for u in units]
    return out


def evaluate_any_size(z, y, exact_max: int = 12000, epsilon: float = 0.1) -> dict:
    """:func:`evaluate_embeddings` up to ``exact_max`` items; above, the streaming evaluator (histogram OPIS under
    both references, :func:`contrastive_repro.metrics.evaluate_retrieval`)."""
    from ..metrics import evaluate_retrieval

    z = torch.as_tensor(z).float()
    y = torch.as_tensor(y).reshape(-1).long()
    if len(y) <= exact_max:
        return evaluate_embeddings(z, y, epsilon=epsilon)
    a = evaluate_retrieval(z, y, ks=(1,), compute_opis=True, epsilon=epsilon)
    b = evaluate_retrieval(z, y, ks=(1,), compute_opis=True, epsilon=None, reference="global")
    return {"R@1": float(a["R@1"]), "OPIS": float(a["OPIS"]), "OPIS_global": float(b["OPIS"]),
            "eps_OPIS": float(a["eps_OPIS"]), "n": int(len(y)), "n_classes": int(torch.unique(y).numel())}


def end_to_end_pair_unit(data, make_config, seeds: Sequence[int]) -> dict:
    """The ``paper`` profile's unit: for every seed, :func:`contrastive_repro.recipes.dml.train_dml` trains the whole
    backbone on ``data`` (a :class:`~contrastive_repro.recipes.dml.DMLData` with its fixed class split) without and
    with TCM (``make_config(tcm: bool, seed) -> DMLConfig``, margins as given: not selected here). Same record layout
    as :func:`tcm_pair_unit`; the only gate is chance."""
    from .dml import train_dml

    t0 = time.time()
    runs = []
    for s in seeds:
        for arm in ("base", "tcm"):
            cfg = make_config(arm == "tcm", int(s))
            r = train_dml(data, cfg, return_embeddings=True)
            runs.append({"seed": int(s), "arm": arm, **evaluate_any_size(r["embeddings"], r["labels"])})
            tcm_kw = cfg.tcm_kwargs
    y = torch.as_tensor(data.y_test)
    return {"split": 0, "margins": {"pos_margin": float(tcm_kw.get("pos_margin", 0.9)),
                                    "neg_margin": float(tcm_kw.get("neg_margin", 0.5)), "table": [], "base": {}},
            "gates": {"chance": retrieval_chance(y)}, "runs": runs, "n_test_classes": int(torch.unique(y).numel()),
            "n_test": int(len(y)), "seconds": round(time.time() - t0, 2)}


def tcm_active_pairs(z, y, pos_margin: float = 0.9, neg_margin: float = 0.5) -> dict:
    """Where TCM acts on an embedding: the share of positive pairs with cosine ``<= pos_margin`` and of negative pairs
    with cosine ``>= neg_margin`` (unordered pairs, i != j). Both near 0 means TCM's terms have (almost) vanished."""
    z = F.normalize(torch.as_tensor(z, dtype=torch.float64), dim=1)
    y = torch.as_tensor(y).reshape(-1)
    s = z @ z.T
    iu = torch.triu_indices(len(y), len(y), offset=1)
    sv, same = s[iu[0], iu[1]], (y[iu[0]] == y[iu[1]])
    pos, neg = sv[same], sv[~same]
    return {"hard_pos_share": float((pos <= pos_margin).double().mean()) if len(pos) else float("nan"),
            "hard_neg_share": float((neg >= neg_margin).double().mean()) if len(neg) else float("nan")}
