r"""An ALBEF-style fusion model on *frozen* features (notebook 05): pre-training with ITC / ITM / MLM and a
modality-structure regularizer, then fine-tuning on VQA, SNLI-VE-style entailment and NLVR-style pairs.

Inputs are the frozen encoders' token features (:mod:`contrastive_repro.features`): the EfficientNet-Lite0 grid of
an image (``layers=("grid",)``, ``T`` tokens of 320) and the all-MiniLM-L6-v2 token states of a text
(``text_features(..., tokens=True)``, ``L`` tokens of 384). :class:`FeatureFusion` is trainable throughout:

.. code-block:: text

    grid [T,320]   -> LN, Linear, +pos -> image block (self-attn)  -> mean -> proj_v -> z_V   (sep_v -> z^i_V)
    tokens [L,384] -> LN, Linear, +pos -> text block (self-attn)   -> [CLS] -> proj_t -> z_T   (sep_t -> z^i_T)
    text states x image states -> fusion blocks (self-attn + cross-attn) -> fused [CLS] -> ITM / task heads
                                                                         -> fused tokens -> MLM head

Pre-training (:func:`pretrain`): ITC is the in-batch CLIP loss of :class:`~contrastive_repro.losses.modality.
ModalityStructureLoss` (``base="clip"``), to which the chosen regularizer is added exactly as in notebook 04; the
augmented features :math:`z^a` are those of an exponential-moving-average (momentum) copy of the encoders on the
augmented image view and the same text, as the paper does for ALBEF. ITM: the fused [CLS] of the B pairs and of 2B
hard negatives (ALBEF's sampling, ``sample_hard_negatives``). MLM: 15 % of the text positions have their input
feature replaced by a learned [MASK] vector and their MiniLM token id is predicted from the fused states. Caveat: the
frozen MiniLM states are contextual, so the neighbours of a masked position still carry some of its identity.

Fine-tuning (:func:`finetune`): the pre-trained model (or a fresh one: the *no-pre-training control*; or a fresh one
with the image tokens zeroed: the *image-blind* text-only model) with a task head, trained on the training scenes'
items, evaluated on validation items every ``eval_every`` steps; the best state on validation is scored on test.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses.modality import ModalityStructureLoss
from ..models.fusion import TransformerBlock, sample_hard_negatives

__all__ = ["FusionData", "FeatureFusion", "FusionConfig", "pretrain", "finetune", "run_fusion_unit", "TASKS",
           "fusion_splits", "sweep_point", "merge_parts", "choose_weights", "accuracy_table", "fusion_claims"]

TASKS = ("vqa", "ve", "nlvr")


@dataclass
class FusionData:
    """Frozen features of one world. ``grid`` [S, T, Dv] (``grid_view``: one augmented view, or None); text rows
    ``tok`` [M, L, Dt], ``mask`` [M, L] bool, ``ids`` [M, L] compact token ids (0 = padding); ``caption`` [S]: the
    text row of each scene's caption; ``items[task]``: dict of index tensors -- vqa: ``scene, text, label, qtype``;
    ve: ``scene, text, label``; nlvr: ``scene, scene_b, text, label``."""

    grid: torch.Tensor
    grid_view: torch.Tensor | None
    tok: torch.Tensor
    mask: torch.Tensor
    ids: torch.Tensor
    caption: torch.Tensor
    items: dict
    n_classes: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.ids.max()) + 1


class FeatureFusion(nn.Module):
    """See the module docstring. ``forward_*`` methods take feature tensors (float) and boolean text masks."""

    def __init__(self, d_v: int, d_t: int, n_img_tokens: int, max_len: int, vocab_size: int, width: int = 64,
                 embed_dim: int = 32, heads: int = 4, fusion_depth: int = 1):
        super().__init__()
        self.v_in = nn.Sequential(nn.LayerNorm(d_v), nn.Linear(d_v, width))
        self.t_in = nn.Sequential(nn.LayerNorm(d_t), nn.Linear(d_t, width))
        self.v_pos = nn.Parameter(0.02 * torch.randn(n_img_tokens, width))
        self.t_pos = nn.Parameter(0.02 * torch.randn(max_len, width))
        self.mask_vec = nn.Parameter(0.02 * torch.randn(width))
        self.v_block = TransformerBlock(width, heads)
        self.t_block = TransformerBlock(width, heads)
        self.v_norm, self.t_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.proj_v, self.proj_t = nn.Linear(width, embed_dim), nn.Linear(width, embed_dim)
        self.sep_v, self.sep_t = nn.Linear(width, embed_dim), nn.Linear(width, embed_dim)
        self.fusion = nn.ModuleList(TransformerBlock(width, heads, cross_width=width) for _ in range(fusion_depth))
        self.f_norm = nn.LayerNorm(width)
        self.itm_head = nn.Linear(width, 2)
        self.mlm_head = nn.Linear(width, vocab_size)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.width = width

    def image_states(self, grid: torch.Tensor) -> torch.Tensor:
        return self.v_norm(self.v_block(self.v_in(grid.float()) + self.v_pos))

    def text_states(self, tok: torch.Tensor, mask: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        x = self.t_in(tok.float())
        if masked is not None:
            x = torch.where(masked[..., None], self.mask_vec.expand_as(x), x)
        x = x + self.t_pos[: x.shape[1]]
        return self.t_norm(self.t_block(x, pad_mask=~mask))

    def embed(self, v_states, t_states, separation: bool = False) -> dict:
        hv, ht = v_states.mean(1), t_states[:, 0]
        out = {"z_v": F.normalize(self.proj_v(hv), dim=-1), "z_t": F.normalize(self.proj_t(ht), dim=-1)}
        if separation:
            out["zi_v"], out["zi_t"] = F.normalize(self.sep_v(hv), dim=-1), F.normalize(self.sep_t(ht), dim=-1)
        return out

    def fuse(self, t_states, mask, v_states) -> torch.Tensor:
        x = t_states
        for blk in self.fusion:
            x = blk(x, pad_mask=~mask, context=v_states)
        return self.f_norm(x)

    def logit_scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=100.0)


@dataclass
class FusionConfig:
    """Sizes and optimisation of pre-training and fine-tuning (AdamW, cosine decay, gradient clipping)."""

    width: int = 64
    embed_dim: int = 32
    heads: int = 4
    fusion_depth: int = 1
    pretrain_steps: int = 200
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    finetune_steps: int = 300
    finetune_batch: int = 64
    finetune_lr: float = 1e-3
    head_lr_mult: float = 1.0
    eval_every: int = 50
    weight_decay: float = 0.02
    momentum: float = 0.995
    mlm_prob: float = 0.15
    w_itc: float = 1.0
    w_itm: float = 1.0
    w_mlm: float = 1.0
    loss_options: dict = field(default_factory=dict)


def build(data: FusionData, cfg: FusionConfig, seed: int) -> FeatureFusion:
    torch.manual_seed(seed)
    return FeatureFusion(data.grid.shape[2], data.tok.shape[2], data.grid.shape[1], data.tok.shape[1],
                         data.vocab_size, cfg.width, cfg.embed_dim, cfg.heads, cfg.fusion_depth)


def _opt(params, lr, wd):
    params = list(params)
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)


def _cosine(opt, step, total, base):
    for g in opt.param_groups:
        g["lr"] = base * g.get("mult", 1.0) * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


def pretrain(data: FusionData, scenes: torch.Tensor, cfg: FusionConfig, regularizer: str | None, weight: float,
             seed: int) -> tuple[FeatureFusion, list[dict]]:
    """Pre-train on the captions of ``scenes`` (see the module docstring); ``regularizer`` None = plain ALBEF."""
    model = build(data, cfg, seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    loss_fn = ModalityStructureLoss(base="clip", regularizers={regularizer: weight} if regularizer else {},
                                    **cfg.loss_options)
    sep = regularizer == "separation"
    opt = _opt(model.parameters(), cfg.pretrain_lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed + 17)
    hist = []
    n = len(scenes)
    b = min(cfg.pretrain_batch, n)
    for step in range(cfg.pretrain_steps):
        _cosine(opt, step, cfg.pretrain_steps, cfg.pretrain_lr)
        s = scenes[torch.randint(0, n, (b,), generator=gen)]
        rows = data.caption[s]
        tok, mask, ids = _trim(data.tok[rows], data.mask[rows], data.ids[rows])
        vs, ts = model.image_states(data.grid[s]), model.text_states(tok, mask)
        f = model.embed(vs, ts, separation=sep)
        with torch.no_grad():
            gv = data.grid_view[s] if data.grid_view is not None else data.grid[s]
            fa = ema.embed(ema.image_states(gv), ema.text_states(tok, mask), separation=sep)
        itc, parts = loss_fn(f["z_v"], f["z_t"], model.logit_scale(), z_v_aug=fa["z_v"], z_t_aug=fa["z_t"],
                             zi_v=f.get("zi_v"), zi_v_aug=fa.get("zi_v"), zi_t=f.get("zi_t"), zi_t_aug=fa.get("zi_t"))
        # ITM: positives and one hard negative image per text and one hard negative text per image
        with torch.no_grad():
            sim = f["z_t"] @ f["z_v"].T
            same = data.caption[s][:, None] == data.caption[s][None, :]
            neg_v, ok_v = sample_hard_negatives(sim, same, generator=gen)
            neg_t, ok_t = sample_hard_negatives(sim.T, same, generator=gen)
        h = max(1, b // 2)  # ITM on half the batch: h positives, h hard-negative images, h hard-negative texts
        v_all = torch.cat([vs[:h], vs[neg_v[:h]], vs[:h]])
        t_all = torch.cat([ts[:h], ts[:h], ts[neg_t[:h]]])
        m_all = torch.cat([mask[:h], mask[:h], mask[neg_t[:h]]])
        logits = model.itm_head(model.fuse(t_all, m_all, v_all)[:, 0])
        y = torch.cat([torch.ones(h), torch.zeros(2 * h)]).long()
        y[h:2 * h][~ok_v[:h]], y[2 * h:][~ok_t[:h]] = -100, -100
        itm = F.cross_entropy(logits, y, ignore_index=-100)
        # MLM on masked input features (never the [CLS] at 0 nor padding)
        u = torch.rand(mask.shape, generator=gen)
        masked = (u < cfg.mlm_prob) & mask
        masked[:, 0] = False
        fused = model.fuse(model.text_states(tok, mask, masked), mask, vs)
        mlm = F.cross_entropy(model.mlm_head(fused[masked]), ids[masked]) if masked.any() else itc * 0
        loss = cfg.w_itc * itc + cfg.w_itm * itm + cfg.w_mlm * mlm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, po in zip(ema.parameters(), model.parameters()):
                pe.lerp_(po, 1 - cfg.momentum)
        if step == 0 or (step + 1) % 25 == 0 or step == cfg.pretrain_steps - 1:
            hist.append({"step": step + 1, "itc": float(parts["con"]), "itm": float(itm.detach()),
                         "mlm": float(mlm.detach()),
                         "total": float(loss.detach())})
    return model.eval(), hist


def _trim(tok, mask, ids=None):
    """Drop the padding columns that no row of the batch uses."""
    n = int(mask.sum(1).max())
    return tok[:, :n], mask[:, :n], (None if ids is None else ids[:, :n])


class _TaskHead(nn.Module):
    def __init__(self, width: int, n_out: int, pair: bool):
        super().__init__()
        self.pair = pair
        self.mlp = nn.Sequential(nn.Linear(width * (2 if pair else 1), width), nn.GELU(), nn.Linear(width, n_out))

    def forward(self, x):
        return self.mlp(x)


def _task_logits(model, head, data: FusionData, task: str, idx: torch.Tensor, image_blind: bool):
    it = data.items[task]
    rows = it["text"][idx]
    tok, mask, _ = _trim(data.tok[rows], data.mask[rows])
    ts = model.text_states(tok, mask)

    def cls(scenes):
        g = data.grid[scenes]
        vs = model.image_states(torch.zeros_like(g, dtype=torch.float32) if image_blind else g)
        return model.fuse(ts, mask, vs)[:, 0]

    if task == "nlvr":
        return head(torch.cat([cls(it["scene"][idx]), cls(it["scene_b"][idx])], 1))
    return head(cls(it["scene"][idx]))


@torch.no_grad()
def _predict(model, head, data, task, idx, image_blind, batch=512):
    model.eval(), head.eval()
    out = torch.cat([_task_logits(model, head, data, task, idx[s:s + batch], image_blind).argmax(1)
                     for s in range(0, len(idx), batch)])
    model.train(), head.train()
    return out


def finetune(model: FeatureFusion, data: FusionData, task: str, train_idx, val_idx, test_idx, cfg: FusionConfig,
             seed: int, image_blind: bool = False) -> dict:
    """Fine-tune ``model`` (in place) with a fresh task head; returns ``{"val", "test", "best_step",
    "test_pred"}`` at the best validation step (checked every ``cfg.eval_every`` steps; ``model`` is left in that
    state); ``test_idx`` None: no test scores (a validation-only run, e.g. a weight sweep)."""
    torch.manual_seed(seed + 3)
    head = _TaskHead(model.width, data.n_classes[task], task == "nlvr")
    opt = _opt(list(model.parameters()) + list(head.parameters()), cfg.finetune_lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed + 29)
    y = data.items[task]["label"]
    best = {"val": -1.0}
    model.train(), head.train()
    n, b = len(train_idx), min(cfg.finetune_batch, len(train_idx))
    for step in range(cfg.finetune_steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.finetune_steps:
            acc = float((_predict(model, head, data, task, val_idx, image_blind) == y[val_idx]).float().mean())
            if acc > best["val"]:  # keep the state; the test set is scored once, at the best state, at the end
                best = {"val": acc, "best_step": step}
                state = (copy.deepcopy(model.state_dict()), copy.deepcopy(head.state_dict()))
        if step == cfg.finetune_steps:
            break
        _cosine(opt, step, cfg.finetune_steps, cfg.finetune_lr)
        idx = train_idx[torch.randint(0, n, (b,), generator=gen)]
        loss = F.cross_entropy(_task_logits(model, head, data, task, idx, image_blind), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()), 1.0)
        opt.step()
    if test_idx is not None:
        model.load_state_dict(state[0]), head.load_state_dict(state[1])
        pred = _predict(model, head, data, task, test_idx, image_blind)
        best.update(test=float((pred == y[test_idx]).float().mean()), test_pred=pred.tolist())
    return best


def _split_items(data: FusionData, task: str, scene_split: Mapping[str, torch.Tensor]) -> dict:
    it = data.items[task]
    owner = it["scene"] if task != "nlvr" else it["scene"]
    out = {}
    for part, scenes in scene_split.items():
        keep = torch.isin(owner, scenes)
        if task == "nlvr":
            keep &= torch.isin(it["scene_b"], scenes)
        out[part] = torch.nonzero(keep).squeeze(1)
    return out


@torch.no_grad()
def _retrieval(model: FeatureFusion, data: FusionData, scenes: torch.Tensor) -> dict:
    from .clip_pretrain import modality_stats, retrieval_eval

    tok, mask, _ = _trim(data.tok[data.caption[scenes]], data.mask[data.caption[scenes]])
    f = model.embed(model.image_states(data.grid[scenes]), model.text_states(tok, mask))
    out = {f"ret/{k}": v for k, v in retrieval_eval(f["z_v"], f["z_t"]).items()}
    out.update(modality_stats(f["z_v"], f["z_t"]))
    return out


DEV_SEED = 20230601  # the fixed permutation that sets the development (weight-sweep) scenes apart


def fusion_splits(n_scenes: int, seed: int, dev_fraction: float = 0.0, test_fraction: float = 0.25,
                  val_fraction: float = 0.15, dev_val_fraction: float = 0.3) -> dict[str, torch.Tensor]:
    """Scene indices per part. A fixed development pool (``dev_fraction`` of the scenes, chosen by a permutation
    with :data:`DEV_SEED`, the same for every unit) is split into ``dev_train`` / ``dev_val`` for choosing
    hyperparameters; it is never a test scene. The other scenes are permuted by ``seed`` (the unit) into ``test``
    (``test_fraction`` of them), ``val`` (``val_fraction``) and ``train`` (the rest)."""
    if not (0 <= dev_fraction < 1 and 0 < test_fraction and 0 < val_fraction and test_fraction + val_fraction < 1
            and 0 < dev_val_fraction < 1):
        raise ValueError(f"bad split fractions: dev {dev_fraction}, test {test_fraction}, val {val_fraction}, "
                         f"dev_val {dev_val_fraction}")
    fixed = torch.randperm(n_scenes, generator=torch.Generator().manual_seed(DEV_SEED))
    n_dev = int(round(dev_fraction * n_scenes))
    dev, pool = fixed[:n_dev], fixed[n_dev:]
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(int(seed)))]
    n_te, n_va = int(round(test_fraction * len(pool))), int(round(val_fraction * len(pool)))
    n_dv = int(round(dev_val_fraction * n_dev))
    return {"test": pool[:n_te], "val": pool[n_te:n_te + n_va], "train": pool[n_te + n_va:],
            "dev_val": dev[:n_dv], "dev_train": dev[n_dv:]}


def _cap(idx: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """A random subset of ``n`` of the indices (all of them when ``n`` is None or not smaller)."""
    if n is None or len(idx) <= n:
        return idx
    return idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:n]].sort().values


def run_fusion_unit(data: FusionData, cfg: FusionConfig, seed: int, *, methods: Sequence[str],
                    weights: Mapping[str, float], tasks: Sequence[str] = TASKS, test_fraction: float = 0.25,
                    val_fraction: float = 0.15, threads: int | None = None, split: Mapping | None = None,
                    finetune_items: int | None = None, val_items: int | None = None,
                    controls: bool = True) -> dict:
    """One unit (seed = scene split = initialisation). Scenes: ``split`` (``train`` / ``val`` / ``test`` scene
    indices, e.g. from :func:`fusion_splits`; ``test`` None = a validation-only run) or, without it, a permutation
    by ``seed`` into test / val / train. Every method (``"albef"`` or a regularizer name) is pre-trained on the
    training scenes' captions and fine-tuned on each task with at most ``finetune_items`` training items (a
    low-data fine-tune; drawn by ``seed``) and scored on at most ``val_items`` validation items; with ``controls``
    the same model is also fine-tuned from a fresh initialisation (``no_pretrain``) and fresh with the image tokens
    zeroed (``text_only``). Returns ``{arm: {task: {"val", "test", "best_step"}, "retrieval": {...}}, "majority":
    {...}, "chance": {...}, "n_items": {...}, "pretrain_hist": {...}}``; ``majority[task]`` answers the most common
    training label (VQA: per question type) of all the training items; ``chance[task]``: a uniform guess (VQA: among
    the training answers of the question's type)."""
    if threads:
        torch.set_num_threads(int(threads))
    S = data.grid.shape[0]
    if split is None:
        perm = torch.randperm(S, generator=torch.Generator().manual_seed(seed))
        n_te, n_va = int(round(test_fraction * S)), int(round(val_fraction * S))
        split = {"test": perm[:n_te], "val": perm[n_te:n_te + n_va], "train": perm[n_te + n_va:]}
    has_test = split.get("test") is not None
    parts = {k: split[k] for k in ("train", "val", "test") if split.get(k) is not None}
    items = {t: _split_items(data, t, parts) for t in tasks}
    out: dict = {"majority": {}, "chance": {}, "pretrain_hist": {},
                 "n_items": {t: {k: len(v) for k, v in items[t].items()} for t in tasks}}
    for t in tasks:
        y = data.items[t]["label"]
        tr = items[t]["train"]
        te = items[t]["test"] if has_test else items[t]["val"]
        if t == "vqa":
            qt = data.items[t]["qtype"]
            pred = torch.empty_like(y[te])
            inv = torch.empty(len(te))
            for q in qt[te].unique():
                common = torch.mode(y[tr][qt[tr] == q]).values if (qt[tr] == q).any() else torch.mode(y[tr]).values
                pred[qt[te] == q] = common
                inv[qt[te] == q] = 1.0 / max(1, len(y[tr][qt[tr] == q].unique()))
            out["chance"][t] = float(inv.mean())  # a uniform guess among the answers of the question's type
        else:
            pred = torch.full_like(y[te], int(torch.mode(y[tr]).values))
            out["chance"][t] = 1.0 / data.n_classes[t]
        out["majority"][t] = float((pred == y[te]).float().mean())
        items[t]["train"] = _cap(tr, finetune_items, seed + 101)
        items[t]["val"] = _cap(items[t]["val"], val_items, seed + 103)
        out["n_items"][t]["finetune"], out["n_items"][t]["val_used"] = len(items[t]["train"]), len(items[t]["val"])
    arms = [(m, m) for m in methods] + ([("no_pretrain", None), ("text_only", None)] if controls else [])
    for arm, method in arms:
        res: dict = {}
        if method is not None:
            reg = None if method == "albef" else method
            pre, hist = pretrain(data, split["train"], cfg, reg, weights.get(method, 0.0), seed)
            out["pretrain_hist"][arm] = hist
            if has_test:
                res["retrieval"] = _retrieval(pre, data, split["test"])
        for t in tasks:
            model = copy.deepcopy(pre) if method is not None else build(data, cfg, seed)
            r = finetune(model, data, t, items[t]["train"], items[t]["val"], items[t]["test"] if has_test else None,
                         cfg, seed, image_blind=arm == "text_only")
            res[t] = {k: v for k, v in r.items() if k != "test_pred"}
        out[arm] = res
    return out


def merge_parts(parts: Sequence[Mapping]) -> dict:
    """One unit from its parts (:func:`run_fusion_unit` results of the same seed and split with different
    ``methods`` / ``controls``, e.g. run in parallel): the arms side by side, ``pretrain_hist`` merged; the
    split-level entries (``majority``, ``chance``, ``n_items``) must agree."""
    out: dict = {"pretrain_hist": {}}
    for p in parts:
        for k, v in p.items():
            if k == "pretrain_hist":
                out[k].update(v)
            elif k in ("majority", "chance", "n_items"):
                if k in out and out[k] != v:
                    raise ValueError(f"parts disagree on {k!r}: not the same split")
                out[k] = v
            elif k in out:
                raise ValueError(f"arm {k!r} occurs in two parts")
            else:
                out[k] = v
    return out


def sweep_point(data: FusionData, cfg: FusionConfig, seed: int, method: str, weight: float,
                split: Mapping[str, torch.Tensor], tasks: Sequence[str] = TASKS, finetune_items: int | None = None,
                val_items: int | None = None, threads: int | None = None) -> dict:
    """One point of a regularizer-weight sweep on the development scenes: ``method`` pre-trained with ``weight`` on
    ``split["dev_train"]`` and fine-tuned per task; returns ``{task: validation accuracy on split["dev_val"]}``
    (no test scene is touched)."""
    dev = {"train": split["dev_train"], "val": split["dev_val"], "test": None}
    out = run_fusion_unit(data, cfg, seed, methods=[method], weights={method: weight}, tasks=tasks, split=dev,
                          finetune_items=finetune_items, val_items=val_items, threads=threads, controls=False)
    return {t: out[method][t]["val"] for t in tasks}


def choose_weights(sweep: Mapping[str, Mapping[float, Mapping[str, float]]]) -> dict[str, float]:
    """``{method: {weight: {task: validation score}}}`` -> ``{method: the weight with the highest mean score over
    the tasks}`` (ties: the smaller weight)."""
    out = {}
    for m, pts in sweep.items():
        if not pts:
            raise ValueError(f"no sweep points for {m!r}")
        out[m] = max(sorted(pts, key=float), key=lambda w: (float(np.mean(list(pts[w].values()))), -float(w)))
    return out


def _acc(units, arm, task) -> np.ndarray:
    return np.array([100 * u[arm][task]["test"] for u in units])


def accuracy_table(units: Sequence[Mapping], arms: Sequence[str], tasks: Sequence[str]) -> list[dict]:
    """Rows ``{arm, task, mean, std, n}`` of test accuracy (%) over the units, the majority rule first."""
    rows = [{"arm": "majority" + (" per question type" if t == "vqa" else ""), "task": t,
             "mean": 100 * float(np.mean([u["majority"][t] for u in units])), "std": 0.0, "n": len(units)}
            for t in tasks]
    rows += [{"arm": a, "task": t, "mean": float(_acc(units, a, t).mean()),
              "std": float(_acc(units, a, t).std(ddof=1)) if len(units) > 1 else 0.0, "n": len(units)}
             for a in arms for t in tasks]
    return rows


PAPER_COLUMN = {"vqa": "vqa_std", "ve": "snlive_test", "nlvr": "nlvr2_testp"}


def fusion_claims(units: Sequence[Mapping], methods: Sequence[str], tasks: Sequence[str],
                  weights: Mapping[str, float], *, alpha: float, gate_margin: float, paper_value, test: str,
                  chance: Mapping[str, float] | None = None) -> dict:
    """Gates and verdicts of notebook 05. Per task the gate baselines are chance (``chance[task]`` in %, default the
    units' mean ``chance``), the majority rule,
    the image-blind ``text_only`` model and the ``no_pretrain`` control (mean test accuracy over the units); each
    pre-trained arm must beat all of them by ``gate_margin`` points. Returns ``{"claims": claim rows (each
    regularizer vs ALBEF, in the direction of Table 4's test column, via ``paper_value(key)``), "verdicts": a flat
    table, "pretraining": ALBEF vs the no-pre-training control and text_only vs chance per task, "summary": rows
    for run.finish}``."""
    from reproduce.claims import claim_row

    from ..stats import gate, paired_verdict

    claims, verdicts, pre, summary = [], [], [], []
    for t in tasks:
        ch = float(chance[t]) if chance is not None else 100 * float(np.mean([u["chance"][t] for u in units]))
        base = {"chance": ch, "majority": 100 * float(np.mean([u["majority"][t] for u in units])),
                "text_only": float(_acc(units, "text_only", t).mean()),
                "no_pretrain": float(_acc(units, "no_pretrain", t).mean())}
        gates = {m: gate(float(_acc(units, m, t).mean()), base, gate_margin) for m in methods}
        pv = paired_verdict(_acc(units, "no_pretrain", t), _acc(units, "albef", t), direction=1, alpha=alpha)
        blind = _acc(units, "text_only", t) - ch
        pre.append({"task": t, "albef - no_pretrain": pv.effect, "ci": f"[{pv.ci_low:+.2f}, {pv.ci_high:+.2f}]",
                    "verdict": pv.verdict, "text_only - chance": float(blind.mean()),
                    "text_only - chance (max over units)": float(blind.max())})
        col = PAPER_COLUMN[t]
        for m in methods:
            key = f"lms.table4.{m}.{col}"
            summary.append({"experiment": f"ALBEF-style fusion (world, frozen features): {m}",
                            "metric": f"{t} test acc. (%)", "value": float(_acc(units, m, t).mean()),
                            "std": float(_acc(units, m, t).std(ddof=1)) if len(units) > 1 else 0.0,
                            "n": len(units), "paper_key": key, "note": str(gates[m])})
            if m == "albef":
                continue
            d = 1 if paper_value(key) >= paper_value(f"lms.table4.albef.{col}") else -1
            v = paired_verdict(_acc(units, "albef", t), _acc(units, m, t), direction=d, alpha=alpha)
            row = claim_row(f"lms.albef.{m}.{t}", "lms", f"{m} {'raises' if d > 0 else 'lowers'} {t.upper()} "
                            "accuracy vs ALBEF (Table 4, test column)", f"{test}, weight {weights[m]:g} chosen on "
                            f"validation", f"{t} test acc. points ({m} - albef)", v, gates=[gates["albef"], gates[m]],
                            paper_key=key)
            claims.append(row)
            verdicts.append({"task": t, "method": m, "weight": weights[m], "paper": "up" if d > 0 else "down",
                             "effect": v.effect, "ci": f"[{v.ci_low:+.2f}, {v.ci_high:+.2f}]", "mde": v.mde,
                             "verdict": row["verdict"], "gates": "; ".join(str(gates[k]) for k in ("albef", m))})
    return {"claims": claims, "verdicts": verdicts, "pretraining": pre, "summary": summary}


def world_fusion_data(world, tok_feats: dict, text_ids: torch.Tensor, grid: torch.Tensor,
                      grid_view: torch.Tensor | None, texts_index: Mapping[str, int]) -> FusionData:
    """Assemble :class:`FusionData` from a generated ``world`` (its captions, ``vqa``, ``ve``, ``nlvr`` items), the
    token features of all its texts (``tok_feats`` from ``text_features(texts, tokens=True)``; ``texts_index[text]``
    = row), their raw MiniLM ids ``text_ids`` (remapped here to a compact vocabulary) and the grid features."""
    uniq, compact = torch.unique(text_ids, return_inverse=True)
    if int(uniq[0]) != 0:  # keep id 0 for padding
        compact = compact + 1
    caption = torch.tensor([texts_index[c] for c in world.captions])
    vqa = {"scene": torch.tensor([s for s, _, _ in world.vqa]), "text": torch.tensor([texts_index[q] for _, q, _ in
                                                                                      world.vqa]),
           "label": torch.tensor([a for _, _, a in world.vqa]),
           "qtype": torch.tensor([sorted(set(world.vqa_types)).index(t) for t in world.vqa_types])}
    ve = {"scene": torch.tensor([s for s, _, _ in world.ve]), "text": torch.tensor([texts_index[h] for _, h, _ in
                                                                                    world.ve]),
          "label": torch.tensor([y for _, _, y in world.ve])}
    nlvr = {"scene": torch.tensor([a for a, _, _, _ in world.nlvr]), "scene_b": torch.tensor([b for _, b, _, _ in
                                                                                             world.nlvr]),
            "text": torch.tensor([texts_index[s] for _, _, s, _ in world.nlvr]),
            "label": torch.tensor([int(y) for _, _, _, y in world.nlvr])}
    return FusionData(grid=grid, grid_view=grid_view, tok=tok_feats["tokens"], mask=tok_feats["mask"].bool(),
                      ids=compact * tok_feats["mask"].long(), caption=caption,
                      items={"vqa": vqa, "ve": ve, "nlvr": nlvr},
                      n_classes={"vqa": len(world.answer_vocab), "ve": len(world.ve_label_names), "nlvr": 2})
