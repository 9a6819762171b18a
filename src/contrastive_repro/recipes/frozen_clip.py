r"""CLIP-style two-tower training on *frozen* pretrained features: the paper's regularizers on small trainable heads.

The frozen encoders of :mod:`contrastive_repro.features` (EfficientNet-Lite0 for images, all-MiniLM-L6-v2 for text)
give fixed features; :class:`FrozenTowers` maps them to the joint space:

.. code-block:: text

    image feature -> LayerNorm -> Linear(d_v, width) --\                      /-> head_v -> z_V   (main)
                                                        >-> shared trunk --<
    text feature  -> LayerNorm -> Linear(d_t, width) --/  (GELU, Linear, GELU) \-> sep_v  -> z^i_V (separation)

The trunk is shared by both modalities and by the main and separation heads, so the separation loss acts on
trainable layers that the main embedding also uses (with separate heads only, :math:`L_{Ortho}` is satisfied by the
extra heads alone and the regularizer cannot change the main features).

Augmented views are the frozen encoders' views (``view_final`` crops/flips, ``view_sentence`` EDA texts): for each
item of a batch, two different renders are drawn among the clean feature and its ``K`` views, the first feeding
:math:`z`, the second :math:`z^a`. The objective is :class:`~contrastive_repro.recipes.clip_pretrain.CLIPObjective`
(the exact losses of :mod:`contrastive_repro.losses.modality`, plus the Fig. 2 alignment term).

:func:`train_towers` trains; :func:`evaluate_towers` scores zero-shot classification (top-1 and balanced), the
text-only ceiling, retrieval R@1/5/10, the modality geometry, linear and few-shot probes; :func:`sweep_and_train`
picks a regularizer's weight on a validation split of the training items and returns the chosen model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..stats import balanced_accuracy
from .clip_pretrain import (CLIPObjective, few_shot_eval, linear_probe_eval, modality_stats, pca_2d,
                            retrieval_eval)

__all__ = ["FeaturePairs", "FrozenTowers", "TowerConfig", "train_towers", "embed", "zero_shot_predict",
           "evaluate_towers", "sweep_and_train", "SELECT_METRICS"]

SELECT_METRICS = ("zs_mean", "zs_subgroup", "retrieval")


@dataclass
class FeaturePairs:
    """Frozen features of paired items: ``x_v`` [N, Dv], ``x_t`` [N, Dt] and optional views [N, K, D]."""

    x_v: torch.Tensor
    x_t: torch.Tensor
    v_views: torch.Tensor | None = None
    t_views: torch.Tensor | None = None

    def __post_init__(self):
        self.x_v, self.x_t = self.x_v.float(), self.x_t.float()
        if len(self.x_v) != len(self.x_t):
            raise ValueError(f"x_v and x_t must be paired, got {len(self.x_v)} and {len(self.x_t)} rows")
        for name in ("v_views", "t_views"):
            v = getattr(self, name)
            if v is not None:
                if v.ndim != 3 or len(v) != len(self.x_v):
                    raise ValueError(f"{name} must be [N, K, D] with N = {len(self.x_v)}, got {tuple(v.shape)}")
                setattr(self, name, v.float())

    def __len__(self) -> int:
        return len(self.x_v)

    def pca_images(self, fit_idx, dim: int) -> "FeaturePairs":
        """Image features (clean and views) projected on the top ``dim`` principal directions of the clean features
        of the items ``fit_idx`` (centred and scaled to unit total variance per item); text features unchanged.
        A fixed linear preprocessing step, fitted on training items only, that makes the input layer ~5x cheaper."""
        x = self.x_v[torch.as_tensor(fit_idx, dtype=torch.long)]
        mu = x.mean(0)
        _, s, vt = torch.linalg.svd(x - mu, full_matrices=False)
        p = vt[:dim].T / (s[:dim].square().sum() / len(x)).sqrt()
        proj = lambda t: (t - mu) @ p  # noqa: E731
        return FeaturePairs(proj(self.x_v), self.x_t, None if self.v_views is None else proj(self.v_views),
                            self.t_views)

    def subset(self, idx) -> "FeaturePairs":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return FeaturePairs(self.x_v[idx], self.x_t[idx], None if self.v_views is None else self.v_views[idx],
                            None if self.t_views is None else self.t_views[idx])


class FrozenTowers(nn.Module):
    """Per-modality input layer, a trunk shared by both modalities, main heads and separation heads (see the
    module docstring). ``forward`` returns the dict :class:`CLIPObjective` takes (normalised features)."""

    def __init__(self, d_v: int, d_t: int, width: int = 256, embed_dim: int = 64, init_temperature: float = 0.07):
        super().__init__()
        if width < 1 or embed_dim < 1:
            raise ValueError(f"width and embed_dim must be >= 1, got {width}, {embed_dim}")
        self.in_v = nn.Sequential(nn.LayerNorm(d_v), nn.Linear(d_v, width))
        self.in_t = nn.Sequential(nn.LayerNorm(d_t), nn.Linear(d_t, width))
        self.trunk = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU())
        self.head_v, self.head_t = nn.Linear(width, embed_dim), nn.Linear(width, embed_dim)
        self.sep_v, self.sep_t = nn.Linear(width, embed_dim), nn.Linear(width, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0)

    def _tower(self, x, modality: str, separation: bool = False):
        h = self.trunk((self.in_v if modality == "v" else self.in_t)(x))
        z = F.normalize((self.head_v if modality == "v" else self.head_t)(h), dim=-1)
        if not separation:
            return z, None
        return z, F.normalize((self.sep_v if modality == "v" else self.sep_t)(h), dim=-1)

    def encode(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in ("v", "t"):
            raise ValueError(f"modality must be 'v' or 't', got {modality!r}")
        return self._tower(x, modality)[0]

    def forward(self, x_v, x_t, x_v_aug=None, x_t_aug=None, separation: bool = False) -> dict:
        out = {"logit_scale": self.logit_scale()}
        for m, x, xa in (("v", x_v, x_v_aug), ("t", x_t, x_t_aug)):
            n = x.shape[0]
            z, zi = self._tower(x if xa is None else torch.cat([x, xa]), m, separation)
            out[f"z_{m}"], out[f"z_{m}_aug"] = (z, None) if xa is None else (z[:n], z[n:])
            if zi is not None:
                out[f"zi_{m}"], out[f"zi_{m}_aug"] = (zi, None) if xa is None else (zi[:n], zi[n:])
        return out


@dataclass
class TowerConfig:
    """Training settings of :func:`train_towers` (AdamW, linear warm-up then cosine decay, gradient clipping)."""

    width: int = 256
    embed_dim: int = 64
    steps: int = 300
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    base: str = "clip+inmodal"
    regularizers: dict = field(default_factory=dict)
    loss_options: dict = field(default_factory=dict)
    align_scale: float = 0.0
    align_eps: float = 0.1
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 2:
            raise ValueError(f"steps must be >= 0 and batch_size >= 2, got {self.steps}, {self.batch_size}")
        self.regularizers = {k: float(v) for k, v in self.regularizers.items()}


def _pick(n_renders: int, b: int, gen: torch.Generator):
    """Two different render indices per item (0 = the clean feature), or (0, 0) with a single render."""
    if n_renders < 2:
        z = torch.zeros(b, dtype=torch.long)
        return z, z
    first = torch.randint(0, n_renders, (b,), generator=gen)
    second = (first + 1 + torch.randint(0, n_renders - 1, (b,), generator=gen)) % n_renders
    return first, second


def _render(x: torch.Tensor, views: torch.Tensor | None, idx: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    if views is None:
        return x[idx]
    allr = torch.cat([x[idx, None], views[idx]], dim=1)  # [b, 1 + K, D]
    return allr[torch.arange(len(idx)), which]


def _stack_renders(x: torch.Tensor, views: torch.Tensor | None) -> torch.Tensor:
    """All renders of every item, flattened: row ``i * (1 + K) + r`` is render ``r`` of item ``i`` (0 = clean)."""
    if views is None:
        return x
    return torch.cat([x[:, None], views], dim=1).reshape(-1, x.shape[1])


def train_towers(data: FeaturePairs, cfg: TowerConfig) -> tuple[FrozenTowers, list[dict]]:
    """Train :class:`FrozenTowers` on ``data`` with ``cfg``; returns the model (eval mode) and the logged history
    (``step`` and the unweighted parts of the objective, every ``log_every`` steps and at the first step)."""
    torch.manual_seed(cfg.seed)
    model = FrozenTowers(data.x_v.shape[1], data.x_t.shape[1], cfg.width, cfg.embed_dim)
    objective = CLIPObjective(base=cfg.base, regularizers=cfg.regularizers, align_scale=cfg.align_scale,
                              align_eps=cfg.align_eps, **cfg.loss_options)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, foreach=True)

    def lr_at(s):
        if s < cfg.warmup_steps:
            return (s + 1) / max(1, cfg.warmup_steps)
        p = (s - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    n = len(data)
    b = min(cfg.batch_size, n)
    needs_aug = cfg.base == "clip+inmodal" or any(r in cfg.regularizers for r in ("bridge", "separation", "gc"))
    sep = "separation" in cfg.regularizers
    nv = 1 + (0 if data.v_views is None else data.v_views.shape[1])
    nt = 1 + (0 if data.t_views is None else data.t_views.shape[1])
    rv, rt = _stack_renders(data.x_v, data.v_views), _stack_renders(data.x_t, data.t_views)
    perm, pos = torch.randperm(n, generator=gen), 0
    history = []
    model.train()
    for step in range(cfg.steps):
        if pos + b > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + b]
        pos += b
        v1, v2 = _pick(nv, b, gen)
        t1, t2 = _pick(nt, b, gen)
        xv, xt = rv[idx * nv + v1], rt[idx * nt + t1]  # = _render(x, views, idx, which), one gather
        xva = rv[idx * nv + v2] if needs_aug else None
        xta = rt[idx * nt + t2] if needs_aug else None
        f = model(xv, xt, xva, xta, separation=sep)
        loss, parts = objective(f)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if step == 0 or (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            history.append({"step": step + 1, "loss": float(loss.detach()),
                            **{k: float(v) for k, v in parts.items()}})
    return model.eval(), history


@torch.no_grad()
def embed(model: FrozenTowers, x: torch.Tensor, modality: str, batch_size: int = 4096) -> torch.Tensor:
    """Normalised joint-space features of frozen features ``x`` (``modality`` "v" or "t")."""
    x = x.float()
    return torch.cat([model.encode(x[s:s + batch_size], modality) for s in range(0, len(x), batch_size)])


def zero_shot_predict(z_items: torch.Tensor, z_prompts: torch.Tensor, prompt_class: Sequence[int]) -> np.ndarray:
    """Class of each item: the class whose prompt ensemble (mean of its normalised prompt features, renormalised)
    has the largest cosine with the item. ``prompt_class[p]`` is the class of prompt ``p``."""
    pc = torch.as_tensor(list(prompt_class), dtype=torch.long)
    n_cls = int(pc.max()) + 1
    proto = torch.zeros(n_cls, z_prompts.shape[1]).index_add_(0, pc, F.normalize(z_prompts.float(), dim=-1))
    proto = F.normalize(proto, dim=-1)
    return (F.normalize(z_items.float(), dim=-1) @ proto.T).argmax(1).numpy()


def _zs_scores(pred, labels) -> dict:
    y = np.asarray(labels)
    return {"top1": float((pred == y).mean()), "balanced": balanced_accuracy(y, pred)}


def evaluate_towers(model: FrozenTowers, test: FeaturePairs, zero_shot: Mapping[str, dict], *,
                    probe: Mapping | None = None, few_shot: Sequence[int] = (), few_shot_draws: int = 3,
                    probe_Cs: Sequence[float] = (0.1, 1.0, 10.0), probe_max_iter: int = 100, seed: int = 0,
                    pca: bool = False, full: bool = True) -> dict:
    """Scores of ``model`` on the ``test`` items.

    ``zero_shot[name] = {"labels": [N], "prompts": frozen text features [P, Dt], "prompt_class": [P]}``: zero-shot
    top-1 and balanced accuracy of the test images (``zs/<name>/top1``, ``zs/<name>/balanced``) and, as the
    text-only ceiling, of the test *captions* through the text tower (``text/<name>/top1`` and ``.../balanced``).
    With ``full``: retrieval R@1/5/10 both ways (``ret/...``), the geometry of :func:`modality_stats`, and, with
    ``probe = {"train_x": frozen image features, "train_y", "test_y"}``, a linear probe (``probe``) and few-shot
    probes (``fewshot/<k>shot``) of the image embedding; ``pca`` adds a joint 2-D PCA.
    """
    zv, zt = embed(model, test.x_v, "v"), embed(model, test.x_t, "t")
    out: dict = {}
    for name, task in zero_shot.items():
        zp = embed(model, task["prompts"], "t")
        for k, v in _zs_scores(zero_shot_predict(zv, zp, task["prompt_class"]), task["labels"]).items():
            out[f"zs/{name}/{k}"] = v
        if full:
            for k, v in _zs_scores(zero_shot_predict(zt, zp, task["prompt_class"]), task["labels"]).items():
                out[f"text/{name}/{k}"] = v
    if not full:
        return out
    out.update({f"ret/{k}": v for k, v in retrieval_eval(zv, zt).items()})
    out.update(modality_stats(zv, zt))
    if probe is not None:
        out.update(probe_scores(embed(model, probe["train_x"], "v"), probe["train_y"], zv, probe["test_y"],
                                few_shot=few_shot, few_shot_draws=few_shot_draws, Cs=probe_Cs,
                                max_iter=probe_max_iter, seed=seed))
    if pca:
        out["pca"] = pca_2d(zv, zt, seed=seed)
    return out


def probe_scores(train_x, train_y, test_x, test_y, *, few_shot: Sequence[int] = (), few_shot_draws: int = 3,
                 Cs: Sequence[float] = (0.1, 1.0, 10.0), max_iter: int = 100, seed: int = 0) -> dict:
    """Linear probe (``probe``, C chosen on a split of the training items, recorded as ``probe_C``) and k-shot probes
    (``fewshot/<k>shot``)."""
    lp = linear_probe_eval(train_x, train_y, test_x, test_y, Cs=Cs, seed=seed, max_iter=max_iter)
    out = {"probe": lp["accuracy"], "probe_C": lp["C"]}
    if few_shot:
        fs = few_shot_eval(train_x, train_y, test_x, test_y, shots=tuple(few_shot), n_draws=few_shot_draws, seed=seed,
                           max_iter=max_iter)
        out.update({f"fewshot/{k}shot": fs[f"{k}shot"] for k in few_shot})
    return out


def select_score(res: Mapping, metric: str) -> float:
    """The validation score a sweep maximises (``metric`` one of :data:`SELECT_METRICS`)."""
    if metric == "zs_mean":
        return float(np.mean([v for k, v in res.items() if k.startswith("zs/") and k.endswith("/balanced")]))
    if metric == "zs_subgroup":
        return float(res["zs/subgroup/balanced"])
    if metric == "retrieval":
        return float(res["ret/mean_recall"])
    raise ValueError(f"select metric must be one of {SELECT_METRICS}, got {metric!r}")


def sweep_and_train(fit: FeaturePairs, val: FeaturePairs, val_zero_shot: Mapping[str, dict], cfg: TowerConfig,
                    regularizer: str, weights: Sequence[float], metric: str = "zs_mean"):
    """Train one model per weight of ``regularizer`` on ``fit``, score each on ``val`` (``metric``), and return
    ``(best_model, best_weight, {weight: val score}, best_history)``. Ties go to the first (smallest) weight."""
    if metric not in SELECT_METRICS:
        raise ValueError(f"select metric must be one of {SELECT_METRICS}, got {metric!r}")
    if not weights:
        raise ValueError("weights is empty")
    best = None
    scores = {}
    for w in weights:
        c = TowerConfig(**{**cfg.__dict__, "regularizers": {regularizer: float(w)}})
        model, hist = train_towers(fit, c)
        res = evaluate_towers(model, val, val_zero_shot, full=metric == "retrieval")
        scores[float(w)] = select_score(res, metric)
        if best is None or scores[float(w)] > best[2]:
            best = (model, float(w), scores[float(w)], hist)
    return best[0], best[1], scores, best[3]


def family_split(captions: Sequence[str], labels, test_fraction: float, seed: int):
    """Train / test item indices with whole *families* held out (an emoji and its skin-tone or hair variants share
    the caption before ``":"``), stratified by ``labels`` (a family takes the label of its first item), so no test
    item has a near-duplicate in training. Returns two sorted index tensors."""
    from ..data.splits import split_by_item

    fam_of = [c.split(":")[0].strip().lower() for c in captions]
    fams = list(dict.fromkeys(fam_of))
    fid = {f: i for i, f in enumerate(fams)}
    lab = np.asarray(labels)
    fam_label = np.zeros(len(fams), dtype=np.int64)
    for i in range(len(fam_of) - 1, -1, -1):
        fam_label[fid[fam_of[i]]] = lab[i]
    tr_f, te_f = split_by_item(torch.as_tensor(fam_label), test_fraction, seed=seed)
    is_test = np.isin(np.array([fid[f] for f in fam_of]), te_f.numpy())
    return torch.as_tensor(np.flatnonzero(~is_test)), torch.as_tensor(np.flatnonzero(is_test))


def _zs_tasks(idx, labels: Mapping[str, np.ndarray], prompts: Mapping[str, tuple]) -> dict:
    return {name: {"labels": np.asarray(labels[name])[np.asarray(idx)], "prompts": prompts[name][0],
                   "prompt_class": prompts[name][1]} for name in prompts}


def run_unit(feats: FeaturePairs, captions: Sequence[str], labels: Mapping[str, np.ndarray],
             prompts: Mapping[str, tuple], cfg: TowerConfig, seed: int, *, methods: Sequence[str],
             weight_grid: Mapping[str, Sequence[float]], random_init_x_v: torch.Tensor | None = None,
             test_fraction: float = 0.2, val_fraction: float = 0.2, select_metric: str = "zs_mean",
             probe_label: str = "subgroup", few_shot: Sequence[int] = (1, 5), few_shot_draws: int = 3,
             probe_Cs: Sequence[float] = (0.1, 1.0, 10.0), probe_max_iter: int = 100, pca: bool = False,
             pca_dim: int = 0, threads: int | None = None) -> dict:
    """One unit (seed = split seed = init seed) of the frozen-tower study.

    Families are split into train / test (:func:`family_split` on ``labels[probe_label]``), the training items into
    fit / validation. Every method trains on *fit* with ``cfg`` (``"clip"``: no regularizer; a regularizer: one
    model per weight of ``weight_grid[name]``, the best on the validation items by ``select_metric`` kept) and is
    scored on the test items by :func:`evaluate_towers` (probe trained on all training items). Gates on the same
    items: the untrained towers on the frozen features (``gate/random_projection``) and, given
    ``random_init_x_v``, on a random-init image encoder's features (``gate/random_init``).
    ``pca_dim > 0`` first projects the image features on their ``pca_dim`` principal directions among the *fit*
    items (:meth:`FeaturePairs.pca_images`); the linear probes and the random-projection gate see the same inputs.
    Returns ``{method: scores, ..., "chosen": {regularizer: weight}, "val_scores": {...}, "first_step": {...},
    "n": {"fit", "val", "test"}, "majority": {task: rate}}``.
    """
    from ..stats import majority_rate

    if threads:
        torch.set_num_threads(int(threads))
    tr, te = family_split(captions, labels[probe_label], test_fraction, seed)
    lab_tr = np.asarray(labels[probe_label])[tr.numpy()]
    fit_i, val_i = family_split([captions[i] for i in tr.tolist()], lab_tr, val_fraction, seed + 100_003)
    fit_idx, val_idx = tr[fit_i], tr[val_i]
    if pca_dim:
        feats = feats.pca_images(fit_idx, pca_dim)
    fit, val, test = feats.subset(fit_idx), feats.subset(val_idx), feats.subset(te)
    val_zs, test_zs = _zs_tasks(val_idx, labels, prompts), _zs_tasks(te, labels, prompts)
    plab = np.asarray(labels[probe_label])
    probe = {"train_x": feats.x_v[tr], "train_y": plab[tr.numpy()], "test_y": plab[te.numpy()]}
    ev = dict(probe=probe, few_shot=few_shot, few_shot_draws=few_shot_draws, probe_Cs=probe_Cs,
              probe_max_iter=probe_max_iter, seed=seed)
    out: dict = {"chosen": {}, "val_scores": {}, "first_step": {},
                 "n": {"fit": len(fit_idx), "val": len(val_idx), "test": len(te)},
                 "majority": {k: majority_rate(np.asarray(v)[te.numpy()], np.asarray(v)[tr.numpy()])
                              for k, v in labels.items()}}
    base_cfg = TowerConfig(**{**cfg.__dict__, "regularizers": {}, "seed": seed})
    clock = _Clock()
    for m in methods:
        with clock("train"):
            if m == "clip":
                model, hist = train_towers(fit, base_cfg)
            else:
                model, w, scores, hist = sweep_and_train(fit, val, val_zs, base_cfg, m, weight_grid[m], select_metric)
                out["chosen"][m], out["val_scores"][m] = w, scores
        out["first_step"][m] = hist[0] if hist else {}
        with clock("evaluate"):
            out[m] = evaluate_towers(model, test, test_zs, pca=pca, **ev)
    with clock("gates"):
        torch.manual_seed(seed)
        untrained = FrozenTowers(feats.x_v.shape[1], feats.x_t.shape[1], cfg.width, cfg.embed_dim).eval()
        out["gate/random_projection"] = evaluate_towers(untrained, test, test_zs, **ev)
        if random_init_x_v is not None:
            rx = random_init_x_v.float()
            px = _project(rx, cfg.width, cfg.embed_dim, seed)
            out["gate/random_init"] = probe_scores(px[tr], probe["train_y"], px[te], probe["test_y"],
                                                   few_shot=few_shot, few_shot_draws=few_shot_draws, Cs=probe_Cs,
                                                   max_iter=probe_max_iter, seed=seed)
    out["cpu_seconds"] = clock.seconds  # process CPU time per phase (the sweeps' validation scoring is in "train")
    return out


class _Clock:
    """Process CPU seconds per named phase: ``with clock("train"): ...``; ``clock.seconds`` = {phase: s}."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, phase: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def _timed():
            t = time.process_time()
            try:
                yield
            finally:
                self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.process_time() - t, 3)
        return _timed()


@torch.no_grad()
def _project(x: torch.Tensor, width: int, embed_dim: int, seed: int) -> torch.Tensor:
    """Features ``x`` through an untrained image tower (seeded by ``seed``) of matching input width."""
    torch.manual_seed(seed)
    return embed(FrozenTowers(x.shape[1], 8, width, embed_dim).eval(), x, "v")
