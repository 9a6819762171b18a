r"""Two-tower (open_clip) image-text training with the symmetric conventional loss or the symmetric decomposable
loss of Chen et al. (NeurIPS 2022), and its zero-shot / few-shot / retrieval evaluation.

Used by ``notebooks/02_small_batch_contrastive`` part (b)::

    from contrastive_repro.recipes.clip_dcl import CLIPDCLConfig, load_emoji_data, run_clip_dcl

    data = load_emoji_data(size=32, test_fraction=0.2, split_seed=0)      # held-out emoji (split by item)
    res = run_clip_dcl(data, CLIPDCLConfig(loss="decomposable", preset="tiny", batch_size=64, epochs=5))
    res["zeroshot"]["subgroup"]["top1"], res["fewshot"]["subgroup"]["5"], res["retrieval"]["i2t_R@1"]

Objective (one batch of ``B`` pairs, L2-normalized image / text features ``v_i``, ``t_i``, logit scale
``s = 1 / tau``)

* ``loss="clip"``: CLIP's symmetric cross-entropy ``(CE(s V T^T) + CE(s T V^T)) / 2`` computed by open_clip's
  ``ClipLoss`` (:class:`~contrastive_repro.losses.SymmetricContrastiveLoss`).
* ``loss="decomposable"``: :class:`~contrastive_repro.losses.DecomposableContrastiveLoss` with ``symmetric=True``:
  image -> text and text -> image, each with per-sample auxiliary variables (a ``[2, N]`` state indexed by the
  dataset index), stochastic EM (``dcl_*`` options). Its negatives are the batch's other ``B - 1`` captions (images);
  the positive is not in the denominator (see :mod:`contrastive_repro.losses.decomposable`).

The temperature is learned (CLIP's ``logit_scale``, initialized at ``1 / temperature``, clamped at
``max_logit_scale``) when ``learn_temperature``, else fixed at ``temperature``; the decomposable loss then gets
``tau = 1 / s`` at every step, so both losses see the same scale. Both log ``conventional``
(:func:`~contrastive_repro.losses.conventional_contrastive_loss`, symmetric) for a common training curve.

Model: an open_clip ``CLIP`` from :data:`~contrastive_repro.models.CLIP_PRESETS` (``tiny`` / ``small`` on 32x32
images, ``paper-rn50`` = open_clip's RN50). ``compact_vocab`` shrinks the 49,408-row token table to the BPE ids
occurring in the training captions and the evaluation texts (:class:`CompactTokenizer`; the end-of-text id stays the
largest so open_clip's argmax pooling still finds it) -- a speed-up only on CPU. Training images get a random
resized crop (``crop_scale``; ``(1, 1)`` disables it).

Several processes (``torchrun``, after :func:`contrastive_repro.distributed.init_distributed`): ``batch_size`` is the
global batch (divisible by the world size, else a ``ValueError`` naming it); every rank trains on its contiguous slice
of each global batch, with the crops the whole batch would get in one process, both losses contrast the rank's pairs
with the features of all ranks gathered with gradient, DDP averages the gradients (the learned temperature's
included), and the decomposable state replicas are merged when every epoch opens and at the end: a step is the
single-process step (``tests/test_recipes_clip_distributed.py``, 2 gloo ranks, 1e-6).

Evaluation, on held-out data only (the emoji split is *by item*: every sub-group has emoji on both sides):

* zero-shot top-1 / top-5 by text prompts (``templates``, prompt ensembling) over the classes of every
  :class:`ZeroShotSet` (emoji: sub-groups and groups; paper: CIFAR-10 / CIFAR-100);
* few-shot linear probes on frozen image features: ``shots`` training images per class drawn from the training
  split, ``few_shot_draws`` draws, logistic regression with fixed ``few_shot_C`` (a 1-shot set cannot be split for
  validation), scored on the held-out images of the classes that have enough training images;
* image -> text and text -> image Recall@1/5/10 among the held-out pairs.

Paper-scale data: :func:`load_paper_data` (a CC3M-style TSV and CIFAR-10/100 under ``DATA_ROOT``) raises
:class:`~contrastive_repro.data.DatasetNotFoundError` naming ``DATA_ROOT`` when they are absent.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LOSSES", "SOURCES", "OPENAI_MEAN", "OPENAI_STD", "EMOJI_TEMPLATES", "CIFAR_TEMPLATES", "PAPER_LAYOUT",
           "CLIPDCLConfig", "CompactTokenizer", "TensorPairs", "FilePairs", "ZeroShotSet", "ProbeSet", "CLIPData",
           "load_emoji_data", "load_paper_data", "load_clip_data", "random_resized_crop", "to_model_input",
           "build_model", "train_clip_dcl", "embed_images", "embed_texts", "evaluate", "few_shot_probe",
           "run_clip_dcl"]

LOSSES = ("clip", "decomposable")
SOURCES = ("emoji", "paper")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
EMOJI_TEMPLATES = ("{}", "an emoji of {}", "a {} emoji")
CIFAR_TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a photo of the {}.",
                   "a low resolution photo of a {}.")

PAPER_LAYOUT = """\
DATA_ROOT/
  cc3m/train.tsv      CC3M training pairs, tab-separated with a header "filepath<TAB>title"
  cc3m/val.tsv        CC3M validation pairs (image-text retrieval), same columns
  cc3m/images/...     the image files the tables point to (paths relative to the table's folder)
  cifar-10-batches-py/    CIFAR-10 python batches (zero-shot, few-shot probes)
  cifar-100-python/       CIFAR-100 python files"""


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class CLIPDCLConfig:
    """Everything :func:`run_clip_dcl` needs besides the data (see the module docstring)."""

    loss: str = "clip"
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    compact_vocab: bool = True
    batch_size: int = 64
    epochs: float = 1.0
    steps: int = 0                      # > 0: a fixed number of steps instead of ``epochs``
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    grad_clip: float | None = 1.0
    learn_temperature: bool = True
    temperature: float = 0.07
    max_logit_scale: float = 100.0
    dcl_shape: float = 1.0
    dcl_z_estimate: str = "running"
    dcl_e_step: str = "mean"
    dcl_momentum: float = 0.5
    crop_scale: tuple = (0.7, 1.0)
    # evaluation
    shots: tuple = (1, 5, 10)
    few_shot_draws: int = 3
    few_shot_C: float = 1.0
    ks: tuple = (1, 5, 10)
    eval_batch: int = 256
    # loop
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    ckpt_every: int = 0
    curve_points: int = 60

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.steps < 0 or (self.steps == 0 and not self.epochs > 0):
            raise ValueError("give epochs > 0 or steps > 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.crop_scale = tuple(float(c) for c in self.crop_scale)
        self.shots = tuple(int(k) for k in self.shots)
        self.ks = tuple(int(k) for k in self.ks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=4)
def _simple_tokenizer(context_length: int):
    """open_clip's ``SimpleTokenizer`` (reading its BPE merges takes seconds on a small CPU: built once per
    context length; it is deterministic, so sharing it between runs changes nothing)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class CompactTokenizer:
    """open_clip's BPE tokenizer, optionally remapped to a compact vocabulary.

    Without ``texts``: exactly ``open_clip``'s ``SimpleTokenizer(context_length)`` (49,408 ids). With ``texts``:
    every BPE id occurring in them gets a compact id ``2..K+1`` (0 = padding, 1 = an id not seen in ``texts``),
    start-of-text becomes ``K+2`` and end-of-text ``K+3``, the largest, so that open_clip's argmax pooling still
    picks the end token. ``vocab_size`` is the token-table size to build. A lookup table does the remapping.
    """

    def __init__(self, context_length: int, texts: Sequence[str] | None = None):
        self.context_length = int(context_length)
        self.base = _simple_tokenizer(self.context_length)
        self.lookup = None
        self.vocab_size = int(self.base.vocab_size)
        if texts is not None:
            ids: set[int] = set()
            for t in dict.fromkeys(texts):
                ids.update(self.base.encode(t))
            sot, eot = self.base.sot_token_id, self.base.eot_token_id
            ids -= {sot, eot}
            ordered = sorted(ids)
            lookup = torch.ones(self.vocab_size, dtype=torch.long)       # unknown -> 1
            lookup[0] = 0
            lookup[torch.tensor(ordered, dtype=torch.long)] = torch.arange(2, len(ordered) + 2)
            lookup[sot], lookup[eot] = len(ordered) + 2, len(ordered) + 3
            self.lookup = lookup
            self.vocab_size = len(ordered) + 4

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        tokens = self.base(texts if isinstance(texts, str) else list(texts))
        return tokens if self.lookup is None else self.lookup[tokens]


# ------------------------------------------------------------------------------------------------------------ data
class TensorPairs:
    """In-memory images (uint8 ``[N, 3, H, W]``) with captions."""

    def __init__(self, images: torch.Tensor, captions: Sequence[str]):
        if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(captions) != len(images):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images, self.captions = images, list(captions)

    def __len__(self) -> int:
        return len(self.images)

    def get_images(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]


class FilePairs:
    """Image-caption pairs read from files (an :class:`~contrastive_repro.data.ImageTextDataset`); ``get_images``
    resizes the shorter side to ``image_size`` and center-crops (uint8). Sequential loading: a code path for
    paper-scale data, not a fast input pipeline."""

    def __init__(self, dataset, image_size: int):
        self.dataset, self.image_size = dataset, int(image_size)
        self.captions = list(dataset.captions)

    def __len__(self) -> int:
        return len(self.captions)

    def get_images(self, idx: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import v2

        t = v2.Compose([v2.ToImage(), v2.Resize(self.image_size, antialias=True), v2.CenterCrop(self.image_size),
                        v2.ToPureTensor()])
        return torch.stack([t(self.dataset.loader(self.dataset.paths[i])) for i in idx.tolist()])


def _get_images(src, idx: torch.Tensor) -> torch.Tensor:
    return src[idx] if isinstance(src, torch.Tensor) else src.get_images(idx)


@dataclass
class ZeroShotSet:
    """Held-out ``images`` (uint8 tensor or an object with ``get_images``) with ``labels`` indexing
    ``classnames``; ``templates`` are the prompts (``{}`` = the class name). ``class_prompts``, when given, lists
    every class's own prompts instead (the class embedding is the normalized mean of their embeddings)."""

    images: Any
    labels: torch.Tensor
    classnames: Sequence[str]
    templates: Sequence[str]
    class_prompts: list | None = None

    def prompts(self) -> list[list[str]]:
        if self.class_prompts is not None:
            return [list(p) for p in self.class_prompts]
        return [[t.format(c) for t in self.templates] for c in self.classnames]


@dataclass
class ProbeSet:
    """Few-shot probe: support images drawn from ``train_*``, scored on ``test_*``."""

    train_images: Any
    train_labels: torch.Tensor
    test_images: Any
    test_labels: torch.Tensor


@dataclass
class CLIPData:
    """Training pairs plus the evaluation sets (see the module docstring)."""

    name: str
    train: Any
    zeroshot: dict
    probes: dict
    retrieval: Any
    info: dict = field(default_factory=dict)

    def texts(self) -> list[str]:
        """Every text the model will read (captions, filled-in prompts): the compact vocabulary covers them."""
        out = list(self.train.captions)
        if self.retrieval is not None:
            out += list(self.retrieval.captions)
        for zs in self.zeroshot.values():
            out += [p for ps in zs.prompts() for p in ps]
        return out


def _pretty(name: str) -> str:
    return name.replace("-", " ").replace("_", " ").lower()


def load_emoji_data(size: int = 32, test_fraction: float = 0.2, split_seed: int = 0,
                    templates: Sequence[str] = EMOJI_TEMPLATES) -> CLIPData:
    """Emoji image-caption pairs (:func:`~contrastive_repro.data.load_emoji`) split **by item**, stratified by
    sub-group: held-out emoji of every sub-group. Zero-shot and few-shot sets at the ``subgroup`` level (99
    sub-group names as prompts, e.g. "an emoji of face smiling") and the ``group`` level (9 groups; a group's prompt
    ensemble fills the templates with the group's name *and* its sub-groups' names, since CLDR captions never contain
    group names); retrieval among the held-out emoji and their names."""
    from ..data import load_emoji

    ds = load_emoji(size)
    tr, te = ds.split(by="item", test_fraction=test_fraction, seed=split_seed)
    subs_of: dict[str, list[str]] = {}
    for g, sg in zip(ds.group_names, ds.subgroup_names):
        subs_of.setdefault(g, [])
        if sg not in subs_of[g]:
            subs_of[g].append(sg)
    zs, probes = {}, {}
    for level in ("subgroup", "group"):
        names = tr.subgroups if level == "subgroup" else tr.groups
        ytr = tr.subgroup_labels if level == "subgroup" else tr.group_labels
        yte = te.subgroup_labels if level == "subgroup" else te.group_labels
        prompts = None
        if level == "group":
            prompts = [[t.format(_pretty(x)) for x in [g] + subs_of.get(g, []) for t in templates] for g in names]
        zs[level] = ZeroShotSet(te.images, yte, [_pretty(n) for n in names], tuple(templates), prompts)
        probes[level] = ProbeSet(tr.images, ytr, te.images, yte)
    info = {"n_train": len(tr), "n_test": len(te), "subgroups": len(tr.subgroups), "groups": len(tr.groups),
            "split": "by item, stratified by sub-group", "test_fraction": test_fraction, "split_seed": split_seed,
            "image_size": size}
    return CLIPData("emoji", TensorPairs(tr.images, tr.captions), zs, probes, TensorPairs(te.images, te.captions),
                    info)


def load_paper_data(root: str | Path | None = None, train_table: str = "cc3m/train.tsv",
                    val_table: str = "cc3m/val.tsv", image_size: int = 224, n_probe_train: int = 10000,
                    n_retrieval: int = 5000, seed: int = 0, templates: Sequence[str] = CIFAR_TEMPLATES) -> CLIPData:
    """The paper-profile data under ``DATA_ROOT`` (``root`` overrides ``$DATA_ROOT``); nothing is downloaded.

    Training pairs: ``train_table`` (CC3M-style TSV, :class:`~contrastive_repro.data.ImageTextDataset`);
    retrieval: the first ``n_retrieval`` rows of ``val_table``; zero-shot: the CIFAR-10 / CIFAR-100 test sets;
    few-shot probes: support from the CIFAR training sets (a random ``n_probe_train`` subset), scored on the test
    sets. Every path is checked before anything is read: a missing one raises
    :class:`~contrastive_repro.data.DatasetNotFoundError` naming ``DATA_ROOT`` and :data:`PAPER_LAYOUT`.
    """
    from ..data import CIFAR10, CIFAR100, ImageTextDataset
    from ..data.errors import DatasetNotFoundError, data_root

    base = data_root(root)
    hint = (f"DATA_ROOT is {str(base)!r} (from {'the root argument' if root is not None else '$DATA_ROOT'}); set "
            "DATA_ROOT (or the notebook's data_root parameter) to the folder holding the data; nothing is downloaded")
    needed = {"CC3M train table": base / train_table, "CC3M val table": base / val_table,
              "CIFAR-10": base / "cifar-10-batches-py", "CIFAR-100": base / "cifar-100-python"}
    for name, path in needed.items():
        if not path.exists():
            raise DatasetNotFoundError(name, path, PAPER_LAYOUT, hint)
    gen = torch.Generator().manual_seed(int(seed))
    zs, probes = {}, {}
    for name, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        tr, te = cls("train", root=base), cls("test", root=base)
        tri = torch.from_numpy(np.ascontiguousarray(tr.data)).permute(0, 3, 1, 2).contiguous()
        tei = torch.from_numpy(np.ascontiguousarray(te.data)).permute(0, 3, 1, 2).contiguous()
        keep = torch.randperm(len(tri), generator=gen)[:n_probe_train]
        names = [_pretty(c) for c in te.classes]
        zs[name] = ZeroShotSet(tei, te.labels.clone(), names, tuple(templates))
        probes[name] = ProbeSet(tri[keep], tr.labels[keep], tei, te.labels.clone())
    train = FilePairs(ImageTextDataset(needed["CC3M train table"], check_files=False), image_size)
    val_ds = ImageTextDataset(needed["CC3M val table"], check_files=False)
    val = FilePairs(val_ds, image_size)
    if n_retrieval and len(val) > n_retrieval:
        val.captions = val.captions[:n_retrieval]
    info = {"n_train": len(train), "n_test": len(val), "source": str(base), "image_size": image_size}
    return CLIPData("paper", train, zs, probes, val, info)


def load_clip_data(source: str = "emoji", **kwargs) -> CLIPData:
    """``"emoji"`` -> :func:`load_emoji_data`, ``"paper"`` -> :func:`load_paper_data` (``kwargs`` passed on)."""
    if source == "emoji":
        return load_emoji_data(**kwargs)
    if source == "paper":
        return load_paper_data(**kwargs)
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


# ------------------------------------------------------------------------------------------------------ images
def random_resized_crop(x: torch.Tensor, generator: torch.Generator | None = None,
                        scale: tuple[float, float] = (0.7, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), *, total: int | None = None,
                        start: int = 0) -> torch.Tensor:
    """Batched random resized crop (independent per image) by one ``affine_grid`` + ``grid_sample`` call.

    ``x``: float ``[B, C, H, W]``. Each crop covers an area fraction ``U(scale)`` with a log-uniform aspect ratio in
    ``ratio`` (clipped to the image) at a uniform position, resampled bilinearly to ``H x W``. ``total`` / ``start``:
    ``x`` is rows ``start:start + B`` of a batch of ``total`` images (a rank's shard): the crops of all ``total``
    are drawn and those rows used, so the shards get the crops the whole batch would get in one process.
    """
    b = x.shape[0]
    if scale[0] >= 1.0 and scale[1] >= 1.0:
        return x
    if total is None:
        u = torch.rand(b, 4, generator=generator)
    else:
        if not 0 <= start <= total - b:
            raise ValueError(f"rows {start}:{start + b} are not inside a batch of total={total}")
        u = torch.rand(total, 4, generator=generator)[start:start + b]
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * (2 * u[:, 2] - 1)
    cy = (1 - h) * (2 * u[:, 3] - 1)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_model_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` -> float, resized to ``image_size`` when it differs, OpenAI-normalized."""
    x = images.float().div(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------------- model
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_model(cfg: CLIPDCLConfig, vocab_size: int | None = None) -> nn.Module:
    """An open_clip ``CLIP`` from ``cfg.preset`` + ``cfg.model_overrides``, with a ``vocab_size``-row token table
    when given and ``logit_scale`` initialized at ``log(1 / cfg.temperature)`` (frozen unless learned)."""
    from ..models.clip import build_clip, clip_config

    conf = _merge(clip_config(cfg.preset), cfg.model_overrides)
    conf.pop("open_clip_model", None)
    if vocab_size is not None:
        conf["text_cfg"] = dict(conf["text_cfg"], vocab_size=int(vocab_size))
    conf["init_logit_scale"] = math.log(1.0 / cfg.temperature)
    model = build_clip(conf)
    model.logit_scale.requires_grad_(bool(cfg.learn_temperature))
    return model


def _image_size(model: nn.Module) -> int:
    s = getattr(model.visual, "image_size", 224)
    return int(s[0] if isinstance(s, (tuple, list)) else s)


def _subsample_curve(history: list[dict], points: int) -> list[dict]:
    if not history:
        return []
    stride = max(1, len(history) // max(points, 1))
    rows = history[::stride]
    if rows[-1] is not history[-1]:
        rows.append(history[-1])
    keys = ("step", "loss", "conventional", "logit_scale", "lr")
    return [{k: (int(r[k]) if k == "step" else float(r[k])) for k in keys if k in r} for r in rows]


def _setup(data: CLIPData, cfg: CLIPDCLConfig):
    """``(model, tokenizer, loss_fn, make_epoch, step_fn, steps)`` of one run, for this process's rank: each rank
    takes its contiguous slice of every global batch of ``cfg.batch_size`` pairs and, with more than one rank,
    contrasts it against the gathered (with gradient) features of the whole global batch (see
    :func:`train_clip_dcl`)."""
    from ..distributed import all_gather_no_grad, get_dist_info, get_rank, get_world_size, local_batch_size
    from ..losses import DecomposableContrastiveLoss, SymmetricContrastiveLoss, conventional_contrastive_loss
    from ..models.clip import clip_config
    from ..training import epoch_index_batches
    from ..utils import get_device, seed_everything

    pairs = data.train
    n = len(pairs)
    per_epoch = n // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n})")
    rank, world = get_rank(), get_world_size()
    bl = local_batch_size(cfg.batch_size, world, "batch_size")
    kw = {"gather": True} if world > 1 else {}
    steps = int(cfg.steps) if cfg.steps > 0 else max(1, int(round(cfg.epochs * per_epoch)))
    ctx = int(_merge(clip_config(cfg.preset), cfg.model_overrides)["text_cfg"].get("context_length", 77))
    tokenizer = CompactTokenizer(ctx, data.texts() if cfg.compact_vocab else None)
    seed_everything(cfg.seed)
    model = build_model(cfg, tokenizer.vocab_size if cfg.compact_vocab else None)
    size = _image_size(model)
    tokens_all = tokenizer(pairs.captions)
    device = get_dist_info().device if world > 1 else get_device(cfg.device)
    decomposable = cfg.loss == "decomposable"
    if decomposable:
        loss_fn = DecomposableContrastiveLoss(n, shape=cfg.dcl_shape, tau=cfg.temperature,
                                              z_estimate=cfg.dcl_z_estimate, e_step=cfg.dcl_e_step,
                                              momentum=cfg.dcl_momentum, symmetric=True, **kw)
    else:
        loss_fn = SymmetricContrastiveLoss(**kw)
    loss_fn.to(device)
    conv_gather = all_gather_no_grad if world > 1 else None
    crop_rows = {} if world == 1 else {"total": cfg.batch_size, "start": rank * bl}

    def make_epoch(epoch: int):
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + int(epoch) + 31_337)
        for idx in epoch_index_batches(n, bl, epoch=epoch, seed=cfg.seed, rank=rank, world_size=world):
            x = to_model_input(_get_images(pairs, idx), size)
            yield random_resized_crop(x, g, cfg.crop_scale, **crop_rows), tokens_all[idx], idx

    def step_fn(m, batch):
        x, tok, idx = batch
        out = m(x, tok)      # through forward (DistributedDataParallel's hooks): normalized features, exp(scale)
        if isinstance(out, dict):
            zi, zt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        else:
            zi, zt, scale = out[0], out[1], out[2]
        scale = scale.clamp(max=cfg.max_logit_scale)
        if decomposable:
            loss_fn.tau = 1.0 / scale
            loss = loss_fn(zi, zt, idx)
            conv = loss_fn.last_stats["conventional"]
        else:
            loss = loss_fn(zi, zt, scale)
            with torch.no_grad():
                conv = conventional_contrastive_loss(zi.detach(), zt.detach(), 1.0 / scale.detach(), symmetric=True,
                                                     gather=conv_gather)
        return loss, {"conventional": conv, "logit_scale": scale.detach()}

    return model, tokenizer, loss_fn, make_epoch, step_fn, steps


def train_clip_dcl(data: CLIPData, cfg: CLIPDCLConfig, ckpt_dir: str | Path | None = None):
    """Train the two-tower model on ``data.train`` with ``cfg.loss``. Returns ``(model, tokenizer, history)``
    (model in eval mode). ``ckpt_dir``: resumable checkpoints under ``ckpt_dir/<config fingerprint>``, the loss's
    per-sample state included."""
    from ..distributed import sync_each_epoch
    from ..training import EpochBatches, TrainConfig, train

    model, tokenizer, loss_fn, make_epoch, step_fn, steps = _setup(data, cfg)
    decomposable = cfg.loss == "decomposable"
    if decomposable:
        make_epoch = sync_each_epoch(make_epoch, loss_fn)   # merge the per-rank state replicas at every epoch
    run_dir = None if ckpt_dir is None else str(Path(ckpt_dir) / cfg.fingerprint())
    tcfg = TrainConfig(max_steps=steps, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98),
                       warmup_steps=min(max(1, int(round(cfg.warmup_frac * steps))), max(steps - 1, 0)),
                       lr_schedule="cosine", grad_clip=cfg.grad_clip, amp=cfg.amp, log_every=0, ckpt_dir=run_dir,
                       ckpt_every=cfg.ckpt_every, seed=cfg.seed, device=cfg.device, progress=False)
    history = train(model, step_fn, EpochBatches(make_epoch), tcfg, state_objects={"loss": loss_fn})
    if decomposable:
        loss_fn.sync_state()        # every rank holds the final state (a no-op in one process)
    model.eval()
    return model, tokenizer, history


# -------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def embed_images(model: nn.Module, images, batch: int = 256) -> torch.Tensor:
    """Normalized image features (float32, CPU) of uint8 images (tensor or ``get_images`` source), eval mode."""
    device = next(model.parameters()).device
    size = _image_size(model)
    n = len(images) if isinstance(images, torch.Tensor) else len(images.captions)
    out = []
    for s in range(0, n, batch):
        idx = torch.arange(s, min(s + batch, n))
        out.append(model.encode_image(to_model_input(_get_images(images, idx), size).to(device),
                                      normalize=True).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model: nn.Module, tokenizer: Callable, texts: Sequence[str], batch: int = 512) -> torch.Tensor:
    """Normalized text features (float32, CPU)."""
    device = next(model.parameters()).device
    texts = list(texts)
    return torch.cat([model.encode_text(tokenizer(texts[s:s + batch]).to(device), normalize=True).float().cpu()
                      for s in range(0, len(texts), batch)])


def few_shot_probe(train_x, train_y, test_x, test_y, shots: Sequence[int] = (1, 5, 10), n_draws: int = 3,
                   C: float = 1.0, seed: int = 0, max_iter: int = 300, tol: float = 1e-4) -> dict:
    """Few-shot linear probes: for every ``k`` in ``shots``, ``n_draws`` draws of ``k`` training items per class
    (:func:`~contrastive_repro.metrics.few_shot_splits` over the classes with at least ``k`` training items; the
    test items of those classes are scored), multinomial logistic regression (sklearn, L-BFGS) with fixed ``C`` on
    features standardized by the support set's mean / std -- what
    :func:`~contrastive_repro.metrics.linear_probe_accuracy` does with one ``C``, at sklearn's default tolerance
    ``tol=1e-4`` instead of 1e-6 (several times fewer iterations on 99 classes). Returns ``{"k": mean accuracy,
    "k_std": std over draws, "k_classes": number of classes, "k_chance": majority-class rate among the scored test
    items}`` (NaN where fewer than 2 classes have ``k`` training items)."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from ..metrics import few_shot_splits

    ty, ey = np.asarray(train_y).reshape(-1), np.asarray(test_y).reshape(-1)
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    out: dict[str, float] = {}
    for k in shots:
        classes, counts = np.unique(ty, return_counts=True)
        ok = classes[counts >= k]
        tr_idx = np.flatnonzero(np.isin(ty, ok))
        te_mask = np.isin(ey, ok)
        out[f"{k}_classes"] = int(len(ok))
        if len(ok) < 2 or not te_mask.any():
            out[f"{k}"], out[f"{k}_std"], out[f"{k}_chance"] = float("nan"), float("nan"), float("nan")
            continue
        accs = []
        for d in range(n_draws):
            sup, _ = few_shot_splits(ty[tr_idx], int(k), seed=int(seed) * 1000 + d)
            sel = tr_idx[sup]
            xs = train_x[sel]
            mu, sd = xs.mean(0), xs.std(0)
            sd[sd < 1e-12] = 1.0
            # one BLAS thread: these matrices are small, and multi-threaded BLAS spins on a shared CPU
            with warnings.catch_warnings(), threadpool_limits(1):
                warnings.simplefilter("ignore")       # 1-shot sets trip sklearn's "looks like regression" warning
                clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol).fit((xs - mu) / sd, ty[sel])
            accs.append(float((clf.predict((test_x[te_mask] - mu) / sd) == ey[te_mask]).mean()))
        out[f"{k}"] = float(np.mean(accs))
        out[f"{k}_std"] = float(np.std(accs))
        out[f"{k}_chance"] = float(np.bincount(ey[te_mask]).max() / te_mask.sum())
    return out


def evaluate(model: nn.Module, tokenizer: Callable, data: CLIPData, cfg: CLIPDCLConfig) -> dict:
    """Zero-shot, few-shot and retrieval metrics on ``data``'s held-out sets (fractions), plus chance levels."""
    from ..metrics import build_zeroshot_classifier, image_text_recall, zero_shot_accuracy

    device = next(model.parameters()).device
    cache: dict[int, torch.Tensor] = {}

    def feats(images):
        if isinstance(images, TensorPairs):
            images = images.images
        if id(images) not in cache:
            cache[id(images)] = embed_images(model, images, cfg.eval_batch)
        return cache[id(images)]

    out: dict[str, Any] = {"zeroshot": {}, "fewshot": {}, "retrieval": {}, "chance": {}}
    for name, zs in data.zeroshot.items():
        if zs.class_prompts is None:
            cls = build_zeroshot_classifier(lambda t: model.encode_text(t, normalize=True), tokenizer, zs.classnames,
                                            zs.templates, device=device).cpu()
        else:
            cls = torch.stack([F.normalize(embed_texts(model, tokenizer, ps).mean(0), dim=0) for ps in zs.prompts()])
        out["zeroshot"][name] = zero_shot_accuracy(feats(zs.images), cls, zs.labels, topk=(1, 5))
        y = np.asarray(zs.labels)
        out["chance"][f"zeroshot/{name}/uniform_top1"] = 1.0 / len(zs.classnames)
        out["chance"][f"zeroshot/{name}/majority_top1"] = float(np.bincount(y).max() / len(y))
    for name, p in data.probes.items():
        out["fewshot"][name] = few_shot_probe(feats(p.train_images).numpy(), p.train_labels,
                                              feats(p.test_images).numpy(), p.test_labels, cfg.shots,
                                              cfg.few_shot_draws, cfg.few_shot_C, cfg.seed)
    if data.retrieval is not None:
        r = data.retrieval
        zv = feats(r)
        zt = embed_texts(model, tokenizer, r.captions)
        out["retrieval"] = image_text_recall(zv, zt, torch.arange(len(zt)), ks=cfg.ks)
        for k in cfg.ks:
            out["chance"][f"retrieval/R@{k}"] = min(1.0, k / len(zt))
    return out


def run_clip_dcl(data: CLIPData, cfg: CLIPDCLConfig, ckpt_dir: str | Path | None = None) -> dict:
    """Train (:func:`train_clip_dcl`) and evaluate (:func:`evaluate`); a JSON-friendly dict with ``zeroshot``
    (``{set: {"top1", "top5"}}``), ``fewshot`` (``{set: {"1", "1_std", ...}}``), ``retrieval`` (``i2t_R@k``,
    ``t2i_R@k``, ``mean_recall``), ``chance``, ``curve`` (subsampled ``loss``, ``conventional``, ``logit_scale``),
    ``final_loss``, ``final_conventional``, ``logit_scale``, ``steps``, ``epochs``, ``vocab_size``, ``params``,
    ``n_train``, ``train_seconds``, ``seconds``, ``config``."""
    t0 = time.perf_counter()
    model, tokenizer, history = train_clip_dcl(data, cfg, ckpt_dir)
    t_train = time.perf_counter() - t0
    ev = evaluate(model, tokenizer, data, cfg)
    n = len(data.train)
    steps = len(history)
    out = {"loss": cfg.loss, **ev, "curve": _subsample_curve(history, cfg.curve_points),
           "final_loss": float(history[-1]["loss"]) if history else float("nan"),
           "final_conventional": float(history[-1]["conventional"]) if history else float("nan"),
           "logit_scale": float(model.logit_scale.detach().exp().clamp(max=cfg.max_logit_scale)),
           "steps": steps, "epochs": steps * cfg.batch_size / n, "vocab_size": int(tokenizer.vocab_size),
           "params": int(sum(p.numel() for p in model.parameters())), "n_train": n,
           "train_seconds": round(t_train, 2), "seconds": round(time.perf_counter() - t0, 2),
           "config": cfg.to_dict()}
    text = json.dumps(out, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return _finite_or_none(json.loads(text))


def _finite_or_none(obj):
    """NaN / inf -> None, recursively (results are stored as strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj
