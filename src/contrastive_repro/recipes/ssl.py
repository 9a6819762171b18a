r"""Self-supervised two-view contrastive training (SimCLR-style) with the conventional InfoNCE loss or the
decomposable loss of Chen et al. (NeurIPS 2022), evaluated by k-NN and linear-probe accuracy.

Used by ``notebooks/02_small_batch_contrastive`` ("does the decomposable loss need smaller batches?")::

    from contrastive_repro.recipes.ssl import SSLConfig, load_ssl_data, make_view_bank, train_ssl

    data = load_ssl_data("fashion_mnist", n_train=3000, n_test=2000, seed=0)
    make_view_bank(data, n_views=4, seed=0)            # optional: augmented views computed once, shared by runs
    res = train_ssl(data, SSLConfig(loss="decomposable", batch_size=64, epochs=5))
    res["knn"], res["linear_probe"], res["curve"]

Model and losses
----------------
An encoder (``small_cnn``: :class:`~contrastive_repro.models.SmallConvNet`; ``resnet50`` and the other names of
:data:`~contrastive_repro.models.BACKBONES`: :func:`~contrastive_repro.models.build_embedding_model` without its
embedding layer) followed by a :class:`~contrastive_repro.models.ProjectionHead`; the loss sees the head's output
``z``, the evaluation the encoder's features ``h`` (as in SimCLR). Both views of a batch go through the network as
one batch of ``2B`` images.

* ``loss="infonce"``, ``infonce_form="symmetric"`` (default): the symmetrized InfoNCE of MoCo v3 / CLIP,
  ``(CE(Z1 Z2^T / tau) + CE(Z2 Z1^T / tau)) / 2`` (:class:`~contrastive_repro.losses.SymmetricContrastiveLoss`
  with a fixed temperature): each view against the other view's ``B`` samples -- its positive and ``B - 1``
  negatives. This is the candidate set the decomposable loss below uses, so the two losses differ only in how they
  treat it. ``infonce_form="ntxent"``: SimCLR's NT-Xent (:class:`~contrastive_repro.losses.InfoNCELoss`), each of
  the ``2B`` views against the ``2B - 2`` other views of the batch (twice the negatives per anchor).
* ``loss="decomposable"``: :class:`~contrastive_repro.losses.DecomposableContrastiveLoss` with
  ``symmetric=True`` (view 1 -> view 2 and view 2 -> view 1, each against the other view's ``B - 1`` other samples,
  the MoCo-v3-style symmetrized loss), per-sample auxiliary variables indexed by the dataset index and optimized by
  stochastic EM (options ``dcl_shape``, ``dcl_z_estimate``, ``dcl_e_step``, ``dcl_momentum``; their meaning is in
  :mod:`contrastive_repro.losses.decomposable`). The loss module is passed to the training loop as a state object,
  so its per-sample state is in the checkpoints.

Both losses log ``conventional`` -- :func:`~contrastive_repro.losses.conventional_contrastive_loss` (symmetric) on
the same features -- so the training curves of the two losses can be read on one scale.

Training budget
---------------
``epochs`` (data passes; ``steps = round(epochs * (N // batch_size))``) or, when ``steps > 0``, a fixed number of
optimizer steps. AdamW with warmup + cosine; the learning rate is scaled with the batch size, ``lr * (B / lr_ref_batch)
** p`` with ``p = 1/2`` (``lr_scaling="sqrt"``, the square-root rule for adaptive optimizers), ``1`` (``"linear"``)
or ``0`` (``"none"``).

Views
-----
``view_mode="bank"`` (tensor data only): :func:`make_view_bank` applies the library's
:func:`~contrastive_repro.data.simclr_transform` ``n_views`` times to every training image once (per-sample random
parameters, :func:`~contrastive_repro.data.apply_per_sample`); each step then pairs two *different* views of every
sample, drawn by a generator seeded with ``(seed, epoch)``. With ``V`` views an image has ``V (V-1)`` ordered pairs,
plenty for a few epochs, and the (CPU-expensive) per-sample augmentation is paid once per notebook instead of once
per run. ``view_mode="online"``: fresh views every step (:class:`~contrastive_repro.data.TwoViewTransform`, or a
``DataLoader`` over :class:`~contrastive_repro.data.TwoViewDataset` for file datasets).

Evaluation (labels are used only here)
--------------------------------------
Features ``h`` of the clean training images (or of a random ``eval_n_train`` of them) and of the test images
(eval mode). ``knn``: cosine k-NN accuracy on
the test set with the training features as the memory (:func:`~contrastive_repro.metrics.knn_accuracy`).
``linear_probe``: logistic regression on standardized features; its inverse regularization ``C`` is chosen from
``probe_Cs`` on a validation split carved from the **training** features
(:func:`~contrastive_repro.metrics.linear_probe_accuracy`), then refit on all training features and scored on the
test set once.

Several processes (``torchrun``)
-------------------------------
Call :func:`contrastive_repro.distributed.init_distributed` first, then :func:`train_ssl` on every rank.
``batch_size`` is the *global* batch (a ``ValueError`` names it when the world size does not divide it): every rank
takes its contiguous slice of each global batch (the same permutation, and in bank mode the same view pairs, as one
process), the loss contrasts the rank's anchors with the candidates of all ranks gathered with gradient
(``gather=True``), the trainer's DDP averages the gradients -- so a step is the single-process step on the global
batch (``tests/test_recipes_ssl_distributed.py``: loss, gradients and decomposable state to 1e-6 with 2 gloo ranks).
The decomposable loss's per-sample state replicas are merged (``sync_state``) when every epoch opens, before
checkpoints and at the end. Exceptions: BatchNorm (the encoder's ``norm="batch"``, the head's) is converted to
``SyncBatchNorm`` on CUDA and normalizes per rank on CPU (a warning says so); ``view_mode="online"`` draws each
sample's two views under an RNG seeded by (seed, epoch, sample index) (:func:`view_seed`), so they do not depend on
the rank, the DataLoader worker or the batch position (2 gloo ranks = one process, also online). Every rank
evaluates the same model; write results on rank 0.

Paper-scale data: ``load_ssl_data("image_folder")`` reads ImageNet-style folders under ``DATA_ROOT`` and raises
:class:`~contrastive_repro.data.DatasetNotFoundError` naming ``DATA_ROOT`` when they are absent.

:func:`batch_to_reach` reads an accuracy-vs-batch curve as "the smallest batch at which a loss reaches a target"
(interpolated in log2 batch size): a description of mean curves. Claims are decided by paired tests on the same seeds
(:func:`contrastive_repro.stats.paired_verdict`), never by comparing mean curves.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["LOSSES", "VIEW_MODES", "LR_SCALINGS", "INFONCE_FORMS", "DATASETS", "FASHION_MNIST_MEAN",
           "FASHION_MNIST_STD", "IMAGENET_MEAN", "IMAGENET_STD", "PAPER_LAYOUT", "SSLConfig", "SSLData", "SSLModel",
           "load_ssl_data", "make_view_bank", "build_model", "build_loss", "scaled_lr", "num_steps", "embed",
           "evaluate_features", "evaluate_model", "train_ssl", "batch_to_reach"]

LOSSES = ("infonce", "decomposable")
VIEW_MODES = ("bank", "online")
LR_SCALINGS = ("sqrt", "linear", "none")
INFONCE_FORMS = ("symmetric", "ntxent")
DATASETS = ("fashion_mnist", "image_folder")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

PAPER_LAYOUT = """\
DATA_ROOT/
  imagenet/train/<class>/<image>.JPEG   ImageNet-style training folder (one sub-folder per class; labels are
                                        used only by the k-NN / linear-probe evaluation)
  imagenet/val/<class>/<image>.JPEG     evaluation folder with the same class sub-folders
(the sub-folder names are the notebook's ssl_folder_train / ssl_folder_test parameters)"""


# ---------------------------------------------------------------------------------------------------------- config
@dataclass
class SSLConfig:
    """Everything :func:`train_ssl` needs besides the data (see the module docstring)."""

    loss: str = "infonce"
    batch_size: int = 128
    epochs: float = 1.0
    steps: int = 0                      # > 0: a fixed number of optimizer steps instead of ``epochs``
    lr: float = 2e-3
    lr_scaling: str = "sqrt"
    lr_ref_batch: int = 256
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05
    grad_clip: float | None = None
    temperature: float = 0.2
    infonce_form: str = "symmetric"
    # decomposable loss options (DecomposableContrastiveLoss)
    dcl_shape: float = 1.0
    dcl_z_estimate: str = "running"
    dcl_e_step: str = "mean"
    dcl_momentum: float = 0.5
    # model
    backbone: str = "small_cnn"
    width: int = 8
    num_blocks: int = 3
    norm: str = "batch"
    proj_dim: int = 64
    proj_hidden: int | None = None
    # views
    view_mode: str = "bank"
    aug: dict = field(default_factory=dict)   # keyword arguments of simclr_transform (online mode)
    num_workers: int = 0
    # evaluation
    knn_k: int = 20
    eval_n_train: int = 0               # > 0: k-NN memory / probe training set = a random subset of the training set
    probe_Cs: tuple = (0.01, 0.1, 1.0, 10.0)
    probe_val_fraction: float = 0.2
    probe_max_iter: int = 300
    eval_batch: int = 512
    # loop
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    log_every: int = 0
    ckpt_every: int = 0
    curve_points: int = 60

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ValueError(f"lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
        if self.infonce_form not in INFONCE_FORMS:
            raise ValueError(f"infonce_form must be one of {INFONCE_FORMS}, got {self.infonce_form!r}")
        if self.view_mode not in VIEW_MODES:
            raise ValueError(f"view_mode must be one of {VIEW_MODES}, got {self.view_mode!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.steps < 0 or (self.steps == 0 and not self.epochs > 0):
            raise ValueError("give epochs > 0 or steps > 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.probe_Cs = tuple(float(c) for c in self.probe_Cs)
        self.aug = dict(self.aug)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A short hash of the config (names checkpoint folders, so a changed config never resumes a stale run)."""
        return hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------------------ data
@dataclass
class SSLData:
    """Training and test images with labels (labels are only used by the evaluation).

    ``train`` / ``test``: uint8 tensors ``[N, C, H, W]``, or datasets returning ``(PIL image, label)`` (file data).
    ``mean`` / ``std``: input normalization. ``view_bank``: float16 ``[N, V, C, H, W]`` augmented views in
    ``[0, 1]`` from :func:`make_view_bank` (tensor data, ``view_mode="bank"``). ``info``: what was loaded.
    """

    name: str
    train: Any
    y_train: torch.Tensor
    test: Any
    y_test: torch.Tensor
    channels: int
    image_size: int
    mean: tuple
    std: tuple
    info: dict = field(default_factory=dict)
    view_bank: torch.Tensor | None = None
    bank_info: dict = field(default_factory=dict)

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.train, torch.Tensor)

    def default_aug(self) -> dict:
        """simclr_transform arguments suited to the data (28 px grayscale: milder crops, no rotation / shift, which
        cost k-NN accuracy in short runs)."""
        if self.name == "fashion_mnist":
            return {"scale": (0.5, 1.0), "flip": True, "degrees": 0.0, "translate": 0.0, "jitter": 0.4}
        return {"scale": (0.2, 1.0), "flip": True, "degrees": 0.0, "translate": 0.0, "jitter": 0.4}


def _subset(n_total: int, n: int | None, gen: torch.Generator) -> torch.Tensor:
    perm = torch.randperm(n_total, generator=gen)
    return perm if n is None or n <= 0 or n >= n_total else perm[:n]


def load_ssl_data(dataset: str = "fashion_mnist", n_train: int | None = None, n_test: int | None = None,
                  seed: int = 0, *, root: str | Path | None = None, train_dir: str = "imagenet/train",
                  test_dir: str = "imagenet/val", image_size: int | None = None) -> SSLData:
    """The data of one SSL experiment; random subsets of ``n_train`` / ``n_test`` images (all when None or 0).

    ``"fashion_mnist"``: the Debian package's Fashion-MNIST (28x28 grayscale). ``"image_folder"``: ImageNet-style
    folders ``DATA_ROOT/<train_dir>`` and ``DATA_ROOT/<test_dir>`` (``root`` overrides ``$DATA_ROOT``), RGB at
    ``image_size`` (default 224); a missing folder raises :class:`~contrastive_repro.data.DatasetNotFoundError`
    naming ``DATA_ROOT`` and the expected layout.
    """
    gen = torch.Generator().manual_seed(int(seed))
    if dataset == "fashion_mnist":
        from ..data import load_fashion_mnist

        x_tr, y_tr = load_fashion_mnist("train")
        x_te, y_te = load_fashion_mnist("test")
        tr, te = _subset(len(x_tr), n_train, gen), _subset(len(x_te), n_test, gen)
        return SSLData("fashion_mnist", x_tr[tr].unsqueeze(1).contiguous(), y_tr[tr],
                       x_te[te].unsqueeze(1).contiguous(), y_te[te], channels=1, image_size=28,
                       mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                       info={"n_train": len(tr), "n_test": len(te), "classes": 10, "source": "Fashion-MNIST"})
    if dataset == "image_folder":
        from torch.utils.data import Subset

        from ..data import ImageFolderDataset
        from ..data.errors import DatasetNotFoundError, data_root

        base = data_root(root)
        folders = {"train": base / train_dir, "test": base / test_dir}
        for split, path in folders.items():
            if not path.is_dir():
                raise DatasetNotFoundError(
                    f"SSL image folder ({split})", path, PAPER_LAYOUT,
                    f"DATA_ROOT is {str(base)!r} (from {'the root argument' if root is not None else '$DATA_ROOT'}); "
                    "set DATA_ROOT (or the notebook's data_root parameter) to the folder holding it; nothing is "
                    "downloaded")
        ds_tr, ds_te = ImageFolderDataset(folders["train"]), ImageFolderDataset(folders["test"])
        tr, te = _subset(len(ds_tr), n_train, gen), _subset(len(ds_te), n_test, gen)
        return SSLData("image_folder", Subset(ds_tr, tr.tolist()), ds_tr.labels[tr], Subset(ds_te, te.tolist()),
                       ds_te.labels[te], channels=3, image_size=int(image_size or 224), mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, info={"n_train": len(tr), "n_test": len(te), "classes": ds_tr.num_classes,
                                               "source": str(folders["train"])})
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def _train_transform(data: SSLData, aug: dict | None):
    from ..data import simclr_transform

    kw = data.default_aug()
    kw.update(aug or {})
    return simclr_transform(data.image_size, data.channels, **kw)


def make_view_bank(data: SSLData, n_views: int = 4, seed: int = 0, aug: dict | None = None) -> torch.Tensor:
    """Compute ``n_views`` augmented views of every training image once (float16 ``[N, V, C, H, W]`` in [0, 1]),
    store them in ``data.view_bank`` and return them. Deterministic given ``seed`` (the global RNG is restored)."""
    from ..data import apply_per_sample

    if not data.is_tensor:
        raise ValueError("a view bank needs in-memory tensor data; use view_mode='online' for file datasets")
    if n_views < 2:
        raise ValueError(f"n_views must be >= 2 (two different views per pair), got {n_views}")
    t = _train_transform(data, aug)
    state = torch.get_rng_state()
    torch.manual_seed(int(seed) + 7_777)
    t0 = time.perf_counter()
    try:
        views = [apply_per_sample(t, data.train).to(torch.float16) for _ in range(n_views)]
    finally:
        torch.set_rng_state(state)
    data.view_bank = torch.stack(views, 1).contiguous()
    data.bank_info = {"n_views": int(n_views), "seed": int(seed), "aug": {**data.default_aug(), **(aug or {})},
                      "seconds": round(time.perf_counter() - t0, 2)}
    return data.view_bank


# ----------------------------------------------------------------------------------------------------------- model
class SSLModel(nn.Module):
    """``encoder`` (images -> features ``h``) + ``head`` (``h`` -> projection ``z``); input normalization inside.

    ``forward(x)`` returns ``z`` (what the loss sees); :meth:`features` returns ``h`` (what is evaluated).
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, proj_dim: int, proj_hidden: int | None,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        from ..models import ProjectionHead

        self.encoder = encoder
        self.head = ProjectionHead(feature_dim, proj_dim, hidden_dim=proj_hidden, num_layers=2)
        self.feature_dim = int(feature_dim)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return self.encoder((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(cfg: SSLConfig, data: SSLData) -> SSLModel:
    """The encoder of ``cfg.backbone`` (random init) with a projection head."""
    if cfg.backbone == "small_cnn":
        from ..models import SmallConvNet

        enc = SmallConvNet(in_channels=data.channels, embed_dim=None, width=cfg.width, num_blocks=cfg.num_blocks,
                           norm=cfg.norm)
        dim = enc.feature_dim
    else:
        from ..models import build_embedding_model

        enc = build_embedding_model(cfg.backbone, embed_dim=None)
        dim = enc.feature_dim
    return SSLModel(enc, dim, cfg.proj_dim, cfg.proj_hidden, data.mean, data.std)


def build_loss(cfg: SSLConfig, num_samples: int, gather: bool | None = None) -> nn.Module:
    """Symmetric InfoNCE (or NT-Xent) or a symmetric :class:`DecomposableContrastiveLoss` over ``num_samples``
    data points (see the module docstring). ``gather`` (default: when the process group has more than one rank):
    each rank's anchors are contrasted with the candidates of every rank, gathered with gradient."""
    from ..distributed import get_world_size
    from ..losses import DecomposableContrastiveLoss, InfoNCELoss, SymmetricContrastiveLoss

    kw = {"gather": True} if (get_world_size() > 1 if gather is None else gather) else {}
    if cfg.loss == "infonce":
        if cfg.infonce_form == "ntxent":
            return InfoNCELoss(temperature=cfg.temperature, **kw)
        return SymmetricContrastiveLoss(temperature=cfg.temperature, **kw)
    return DecomposableContrastiveLoss(num_samples, shape=cfg.dcl_shape, tau=cfg.temperature,
                                       z_estimate=cfg.dcl_z_estimate, e_step=cfg.dcl_e_step,
                                       momentum=cfg.dcl_momentum, symmetric=True, **kw)


def scaled_lr(cfg: SSLConfig) -> float:
    """``lr * (batch_size / lr_ref_batch) ** p``, ``p`` from ``cfg.lr_scaling`` (sqrt: 1/2, linear: 1, none: 0)."""
    p = {"sqrt": 0.5, "linear": 1.0, "none": 0.0}[cfg.lr_scaling]
    return float(cfg.lr * (cfg.batch_size / cfg.lr_ref_batch) ** p)


def num_steps(cfg: SSLConfig, n_train: int) -> int:
    """Optimizer steps: ``cfg.steps`` if > 0, else ``round(epochs * (n_train // batch_size))`` (at least 1)."""
    if cfg.steps > 0:
        return int(cfg.steps)
    per_epoch = n_train // cfg.batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n_train})")
    return max(1, int(round(cfg.epochs * per_epoch)))


# ------------------------------------------------------------------------------------------------------ batches
# Every maker yields this rank's contiguous slice of each *global* batch of ``cfg.batch_size`` samples (the same
# permutation on every rank, :func:`~contrastive_repro.training.epoch_index_batches`); in one process the slice is
# the whole batch.
def _shard(cfg: SSLConfig) -> tuple[int, int, int]:
    """``(rank, world_size, local batch)``; ``batch_size`` must be divisible by the world size."""
    from ..distributed import get_rank, get_world_size, local_batch_size

    world = get_world_size()
    return get_rank(), world, local_batch_size(cfg.batch_size, world, "batch_size")


def _bank_epoch(data: SSLData, cfg: SSLConfig):
    from ..training import epoch_index_batches

    bank = data.view_bank
    n, v = bank.shape[0], bank.shape[1]
    rank, world, bl = _shard(cfg)
    cols = slice(rank * bl, (rank + 1) * bl)

    def make_epoch(epoch: int, offset: int = 0):
        batches = epoch_index_batches(n, bl, epoch=epoch, seed=cfg.seed, rank=rank, world_size=world)
        g = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + int(epoch) + 99_991)
        a = torch.randint(0, v, (len(batches), cfg.batch_size), generator=g)          # view pair per position,
        b = (a + 1 + torch.randint(0, v - 1, a.shape, generator=g)) % v               # drawn for the whole epoch
        for k in range(offset, len(batches)):                                         # (and the global batch)
            idx = batches[k]
            yield bank[idx, a[k, cols]].float(), bank[idx, b[k, cols]].float(), idx
    return make_epoch


def _online_tensor_epoch(data: SSLData, cfg: SSLConfig):
    from ..data import TwoViewTransform
    from ..training import epoch_index_batches

    two = TwoViewTransform(_train_transform(data, cfg.aug))
    rank, world, bl = _shard(cfg)

    def make_epoch(epoch: int, offset: int = 0):
        for idx in epoch_index_batches(len(data.train), bl, epoch=epoch, seed=cfg.seed, rank=rank,
                                       world_size=world)[offset:]:
            v1, v2 = _keyed_views(lambda k: two(data.train[k]), idx, cfg.seed, epoch)
            yield v1, v2, idx
    return make_epoch


def view_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of sample ``index``'s two views in ``epoch``: the views depend on (seed, epoch, sample) only, not
    on which rank, worker or batch position draws them, so ``W`` ranks see the views of one process."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919_993 + int(index) * 104_729 + 4_242) % (2 ** 62)


def _keyed_views(draw, idx, seed: int, epoch: int):
    """``draw(i) -> (view1, view2)`` for every sample ``i`` of ``idx``, each under the global RNG seeded with
    :func:`view_seed` (the caller's RNG state is restored); stacked ``[B, ...]`` each."""
    state = torch.get_rng_state()
    try:
        pairs = []
        for i in torch.as_tensor(idx).tolist():
            torch.manual_seed(view_seed(seed, epoch, i))
            pairs.append(draw(i))
    finally:
        torch.set_rng_state(state)
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class _KeyedTwoViews:
    """``ds[i] -> (view1, view2, i)`` of a :class:`TwoViewDataset` with the views drawn under :func:`view_seed`
    (the same in any worker or rank)."""

    def __init__(self, ds, seed: int, epoch: int):
        self.ds, self.seed, self.epoch = ds, int(seed), int(epoch)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        state = torch.get_rng_state()
        try:
            torch.manual_seed(view_seed(self.seed, self.epoch, int(i)))
            return self.ds[i]
        finally:
            torch.set_rng_state(state)


def _online_dataset_epoch(data: SSLData, cfg: SSLConfig):
    from torch.utils.data import DataLoader

    from ..data import TwoViewDataset
    from ..training import epoch_index_batches

    ds = TwoViewDataset(data.train, _train_transform(data, cfg.aug))   # views in [0, 1]; the model normalizes
    rank, world, bl = _shard(cfg)

    def make_epoch(epoch: int, offset: int = 0):
        batches = [b.tolist() for b in epoch_index_batches(len(ds), bl, epoch=epoch, seed=cfg.seed, rank=rank,
                                                           world_size=world)]
        loader = DataLoader(_KeyedTwoViews(ds, cfg.seed, epoch), batch_sampler=batches[offset:],
                            num_workers=cfg.num_workers,
                            worker_init_fn=_WorkerSeed(cfg.seed, epoch, offset, rank), persistent_workers=False)
        for v1, v2, idx in loader:
            yield v1, v2, idx
    return make_epoch


class _WorkerSeed:
    def __init__(self, seed: int, epoch: int, offset: int = 0, rank: int = 0):
        self.base = int(seed) * 1_000_003 + int(epoch) * 1_009 + int(offset) * 7_919 + int(rank) * 104_729

    def __call__(self, worker_id: int) -> None:
        torch.manual_seed(self.base + worker_id)


# --------------------------------------------------------------------------------------------------- evaluation
def _eval_tensor(data: SSLData, images) -> torch.Tensor:
    """uint8 -> float in [0, 1] (tensor data); file datasets are handled by :func:`embed`."""
    return images.float().div(255.0)


@torch.no_grad()
def embed(model: SSLModel, images, data: SSLData, batch: int = 512, num_workers: int = 0) -> torch.Tensor:
    """Encoder features ``h`` of clean images (eval mode), float32 on CPU."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    try:
        if isinstance(images, torch.Tensor):
            for s in range(0, len(images), batch):
                out.append(model.features(_eval_tensor(data, images[s:s + batch]).to(device)).float().cpu())
        else:
            from torch.utils.data import DataLoader
            from torchvision.transforms import v2

            t = v2.Compose([v2.ToImage(), v2.Resize(data.image_size, antialias=True), v2.CenterCrop(data.image_size),
                            v2.ToDtype(torch.float32, scale=True), v2.ToPureTensor()])
            loader = DataLoader(_Mapped(images, t), batch_size=batch, num_workers=num_workers)
            for x, _ in loader:
                out.append(model.features(x.to(device)).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


class _Mapped(torch.utils.data.Dataset):
    def __init__(self, ds, transform):
        self.ds, self.transform = ds, transform

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return self.transform(x), y


def evaluate_features(h_train: torch.Tensor, y_train, h_test: torch.Tensor, y_test, cfg: SSLConfig) -> dict:
    """k-NN and linear-probe test accuracy; the probe's C is chosen on a validation split of the training set.
    (L-BFGS stops at ``cfg.probe_max_iter`` iterations; sklearn's convergence warnings are silenced.)"""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    from ..metrics import knn_accuracy, linear_probe_accuracy

    knn = knn_accuracy(h_train, y_train, h_test, y_test, k=cfg.knn_k)
    # one BLAS thread for the probe: small matrices, and multi-threaded BLAS spins on a shared CPU
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe = linear_probe_accuracy(h_train, y_train, h_test, y_test, Cs=cfg.probe_Cs,
                                      val_fraction=cfg.probe_val_fraction, seed=cfg.seed,
                                      max_iter=cfg.probe_max_iter, return_details=True)
    return {"knn": float(knn), "linear_probe": float(probe["accuracy"]), "probe_C": float(probe["C"]),
            "probe_val_accuracy": {str(k): float(v) for k, v in probe["val_accuracy"].items()},
            "probe_validated": bool(probe["validated"])}


def evaluate_model(model: SSLModel, data: SSLData, cfg: SSLConfig) -> dict:
    """:func:`evaluate_features` of ``model``'s encoder features: training images (a fixed random
    ``cfg.eval_n_train`` of them when > 0) as the k-NN memory / probe training set, the test images scored."""
    n_train = len(data.train)
    ev_train, ev_y = data.train, data.y_train
    if 0 < cfg.eval_n_train < n_train:
        keep = torch.randperm(n_train, generator=torch.Generator().manual_seed(12_345))[:cfg.eval_n_train]
        ev_y = data.y_train[keep]
        if data.is_tensor:
            ev_train = data.train[keep]
        else:
            from torch.utils.data import Subset

            ev_train = Subset(data.train, keep.tolist())
    h_tr = embed(model, ev_train, data, cfg.eval_batch, cfg.num_workers)
    h_te = embed(model, data.test, data, cfg.eval_batch, cfg.num_workers)
    return evaluate_features(h_tr, ev_y, h_te, data.y_test, cfg)


def _subsample_curve(history: list[dict], points: int) -> list[dict]:
    if not history:
        return []
    stride = max(1, len(history) // max(points, 1))
    rows = history[::stride]
    if rows[-1] is not history[-1]:
        rows.append(history[-1])
    keys = ("step", "loss", "conventional", "lr", "grad_norm")
    return [{k: (int(r[k]) if k == "step" else float(r[k])) for k in keys if k in r} for r in rows]


# ------------------------------------------------------------------------------------------------------- recipe
def _setup(data: SSLData, cfg: SSLConfig):
    """``(model, loss_fn, make_epoch, step_fn)`` of one run, for this process's rank (see :func:`train_ssl`)."""
    from ..distributed import all_gather_no_grad, get_dist_info, get_world_size
    from ..losses import conventional_contrastive_loss
    from ..utils import get_device, seed_everything

    if cfg.view_mode == "bank":
        if not data.is_tensor:
            raise ValueError("view_mode='bank' needs tensor data; use 'online' for file datasets")
        if data.view_bank is None:
            make_view_bank(data, n_views=4, seed=0, aug=cfg.aug)
        make_epoch = _bank_epoch(data, cfg)
    elif data.is_tensor:
        make_epoch = _online_tensor_epoch(data, cfg)
    else:
        make_epoch = _online_dataset_epoch(data, cfg)

    world = get_world_size()
    seed_everything(cfg.seed)
    model = build_model(cfg, data)
    loss_fn = build_loss(cfg, len(data.train))
    device = get_dist_info().device if world > 1 else get_device(cfg.device)
    if world > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)   # statistics over the global batch
        else:
            import warnings

            warnings.warn("BatchNorm statistics are per rank on CPU (SyncBatchNorm needs CUDA): the run is not the "
                          "single-process one; norm='group' avoids batch statistics in the encoder", RuntimeWarning,
                          stacklevel=3)
    loss_fn.to(device)
    tau = cfg.temperature
    decomposable = cfg.loss == "decomposable"
    conv_gather = all_gather_no_grad if world > 1 else None

    def step_fn(m, batch):
        v1, v2, idx = batch
        b = v1.shape[0]
        z = m(torch.cat([v1, v2]))
        z1, z2 = z[:b], z[b:]
        if decomposable:
            loss = loss_fn(z1, z2, idx)
            conv = loss_fn.last_stats["conventional"]
        else:
            loss = loss_fn(z1, z2)
            with torch.no_grad():
                conv = conventional_contrastive_loss(z1.detach(), z2.detach(), tau, symmetric=True,
                                                     gather=conv_gather)
        return loss, {"conventional": conv}

    return model, loss_fn, make_epoch, step_fn


def train_ssl(data: SSLData, cfg: SSLConfig, ckpt_dir: str | Path | None = None) -> dict:
    """Train ``cfg.loss`` on two views of ``data.train`` and evaluate k-NN / linear probe on ``data.test``.

    ``ckpt_dir``: checkpoints go to ``ckpt_dir/<config fingerprint>`` (resumable; a changed config starts afresh);
    ``cfg.ckpt_every`` sets their frequency (0: only the final one). Returns a JSON-friendly dict: ``knn``,
    ``linear_probe``, ``probe_C``, ``probe_val_accuracy``, ``curve`` (subsampled per-step ``loss``,
    ``conventional``, ``lr``), ``final_loss``, ``final_conventional``, ``steps``, ``epochs`` (data passes actually
    made), ``lr`` (after batch scaling), ``n_train``, ``n_test``, ``train_seconds``, ``seconds``, ``config``.
    """
    from ..distributed import sync_each_epoch
    from ..training import EpochBatches, TrainConfig, train

    t_start = time.perf_counter()
    n_train = len(data.train)
    steps = num_steps(cfg, n_train)
    model, loss_fn, make_epoch, step_fn = _setup(data, cfg)
    decomposable = cfg.loss == "decomposable"
    if decomposable:
        make_epoch = sync_each_epoch(make_epoch, loss_fn)   # merge the per-rank state replicas at every epoch

    lr = scaled_lr(cfg)
    run_dir = None if ckpt_dir is None else str(Path(ckpt_dir) / cfg.fingerprint())
    tcfg = TrainConfig(max_steps=steps, lr=lr, weight_decay=cfg.weight_decay,
                       warmup_steps=min(max(1, int(round(cfg.warmup_frac * steps))), max(steps - 1, 0)),
                       lr_schedule="cosine", grad_clip=cfg.grad_clip, amp=cfg.amp, log_every=cfg.log_every,
                       ckpt_dir=run_dir, ckpt_every=cfg.ckpt_every, seed=cfg.seed, device=cfg.device,
                       progress=False)
    t0 = time.perf_counter()
    history = train(model, step_fn, EpochBatches(make_epoch, seekable=True), tcfg, state_objects={"loss": loss_fn})
    if decomposable:
        loss_fn.sync_state()        # every rank holds the final state (a no-op in one process)
    train_seconds = time.perf_counter() - t0

    ev = evaluate_model(model, data, cfg)
    out = {"loss": cfg.loss, "batch_size": int(cfg.batch_size), **ev,
           "curve": _subsample_curve(history, cfg.curve_points),
           "final_loss": float(history[-1]["loss"]) if history else float("nan"),
           "final_conventional": float(history[-1].get("conventional", float("nan"))) if history else float("nan"),
           "steps": int(steps), "epochs": float(steps * cfg.batch_size / n_train), "lr": lr,
           "n_train": int(n_train), "n_test": int(len(data.test)), "feature_dim": int(model.feature_dim),
           "train_seconds": round(train_seconds, 2), "seconds": round(time.perf_counter() - t_start, 2),
           "config": cfg.to_dict()}
    if decomposable:
        seen = loss_fn.seen
        out["dcl_state"] = {"seen_fraction": float(seen.float().mean()),
                            "mean_log_z": float(loss_fn.log_z[seen].mean()) if bool(seen.any()) else float("nan")}
    return _finite_or_none(json.loads(json.dumps(out, default=_json_default)))


def _finite_or_none(obj):
    """NaN / inf -> None, recursively (results are stored as strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    return obj


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


# ------------------------------------------------------------------------------------------ batch-size analysis
def batch_to_reach(batch_sizes: Sequence[int], values: Sequence[float], target: float) -> dict:
    """The smallest batch at which ``values`` (e.g. mean accuracy per batch size) reach ``target``.

    Returns ``{"grid": smallest grid batch with value >= target (None if never), "interpolated": the crossing
    batch, linear in log2(batch) between the last grid point below the target and the first one at or above it
    (the grid value itself when the smallest batch already reaches it), "at_smallest": reached already at the
    smallest batch (then the true crossing may lie lower: ``interpolated`` is an upper bound)}``.
    """
    if len(batch_sizes) != len(values) or not batch_sizes:
        raise ValueError("batch_sizes and values must be non-empty and of equal length")
    order = np.argsort(np.asarray(batch_sizes, dtype=float))
    b = np.asarray(batch_sizes, dtype=float)[order]
    v = np.asarray(values, dtype=float)[order]
    hit = np.flatnonzero(v >= target)
    if len(hit) == 0:
        return {"grid": None, "interpolated": None, "at_smallest": False}
    i = int(hit[0])
    if i == 0:
        return {"grid": int(b[0]), "interpolated": float(b[0]), "at_smallest": True}
    lb0, lb1 = math.log2(b[i - 1]), math.log2(b[i])
    frac = (target - v[i - 1]) / (v[i] - v[i - 1]) if v[i] != v[i - 1] else 1.0
    return {"grid": int(b[i]), "interpolated": float(2 ** (lb0 + frac * (lb1 - lb0))), "at_smallest": False}
