"""Two-view augmentation for self-supervised contrastive training on small grayscale / RGB images.

:func:`simclr_transform` builds one torchvision ``transforms.v2`` pipeline (random resized crop, horizontal flip,
small affine, colour jitter / random grayscale for RGB, brightness-contrast jitter for grayscale), mapping a uint8
or float ``[C,H,W]`` tensor (or PIL image) to a plain float32 tensor ``[C,size,size]`` in ``[0,1]`` (then ``Normalize`` if
``mean``/``std`` are given). :class:`TwoViewTransform` applies it twice; on a batch ``[B,C,H,W]`` it draws fresh
random parameters for every sample (a plain v2 transform would apply one draw to the whole batch).
:class:`TwoViewDataset` returns ``(view1, view2, index)`` -- the index lets a loss keep per-sample state.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .errors import EmptyDatasetError

__all__ = ["simclr_transform", "eval_transform", "TwoViewTransform", "TwoViewDataset", "apply_per_sample"]


def simclr_transform(size: int, channels: int = 3, *, scale: tuple[float, float] = (0.5, 1.0), flip: bool = True,
                     degrees: float = 10.0, translate: float = 0.1, jitter: float = 0.4, p_jitter: float = 0.8,
                     p_grayscale: float = 0.2, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> v2.Compose:
    """A SimCLR-style augmentation scaled down for 8-32 px images.

    Args:
        size: output side length.
        channels: 1 (grayscale: only brightness/contrast jitter) or 3 (RGB: brightness, contrast, saturation, hue
            jitter with strength ``jitter``, plus random grayscale with probability ``p_grayscale``).
        scale: area range of :class:`~torchvision.transforms.v2.RandomResizedCrop`.
        flip: horizontal flip with p=0.5 (turn off for digits, where a mirrored 2 is not a 2).
        degrees, translate: small random affine (rotation in degrees, translation as a fraction of the size).
        jitter, p_jitter: colour-jitter strength and the probability of applying it; ``jitter=0`` disables it.
        mean, std: optional normalisation after scaling to ``[0,1]``.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    ops: list[Any] = [v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if degrees or translate:
        ops.append(v2.RandomAffine(degrees=degrees, translate=(translate, translate)))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if jitter > 0 and p_jitter > 0:
        if channels == 3:
            cj = v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=min(0.5, jitter / 4))
        else:
            cj = v2.ColorJitter(brightness=jitter, contrast=jitter)
        ops.append(v2.RandomApply([cj], p=p_jitter))
    if channels == 3 and p_grayscale > 0:
        ops.append(v2.RandomGrayscale(p=p_grayscale))
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("give both mean and std, or neither")
        ops.append(v2.Normalize(mean=list(mean), std=list(std)))
    ops.append(v2.ToPureTensor())
    return v2.Compose(ops)


def eval_transform(size: int | None = None, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> v2.Compose:
    """The deterministic counterpart: (optional resize,) float32 in ``[0,1]``, optional normalisation."""
    ops: list[Any] = [v2.ToImage()]
    if size is not None:
        ops.append(v2.Resize((size, size), antialias=True))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None and std is not None:
        ops.append(v2.Normalize(mean=list(mean), std=list(std)))
    ops.append(v2.ToPureTensor())
    return v2.Compose(ops)


def _plain(x):
    # tv_tensors.Image -> plain tensor so downstream code (and default_collate) sees ordinary tensors
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


def apply_per_sample(transform: Callable, x: torch.Tensor) -> torch.Tensor:
    """Apply ``transform`` to one image ``[C,H,W]`` (or ``[H,W]``), or to every image of a batch ``[B,C,H,W]`` with
    independent random parameters, stacking the results."""
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim == 3:
        return _plain(transform(x))
    if x.ndim == 4:
        return torch.stack([_plain(transform(xi)) for xi in x])
    raise ValueError(f"expected [H,W], [C,H,W] or [B,C,H,W], got shape {tuple(x.shape)}")


class TwoViewTransform:
    """``x -> (t1(x), t2(x))`` with independent randomness; ``t2`` defaults to ``t1``. Handles PIL images, single
    tensors and batches (per-sample parameters)."""

    def __init__(self, transform: Callable, transform2: Callable | None = None):
        self.t1, self.t2 = transform, transform2 if transform2 is not None else transform

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            return apply_per_sample(self.t1, x), apply_per_sample(self.t2, x)
        return _plain(self.t1(x)), _plain(self.t2(x))

    def __repr__(self) -> str:
        return f"TwoViewTransform({self.t1!r})" if self.t1 is self.t2 else f"TwoViewTransform({self.t1!r}, {self.t2!r})"


class TwoViewDataset(Dataset):
    """``ds[i] -> (view1, view2, i)``: two augmentations of the same base image plus its index.

    ``base_images`` is a uint8/float tensor ``[N,H,W]`` or ``[N,C,H,W]``, a sequence of PIL images, or a dataset
    whose items are ``(image, ...)`` tuples (the first element is used, e.g. a dataset built without a transform).
    ``transform`` is a single-view transform (applied twice, independently) or a :class:`TwoViewTransform`.
    ``labels`` are optional and exposed as ``.labels`` (for evaluation only; they are not returned).
    """

    def __init__(self, base_images: Any, transform: Callable, labels: Any = None):
        if isinstance(base_images, torch.Tensor):
            if base_images.ndim == 3:
                base_images = base_images.unsqueeze(1)
            if base_images.ndim != 4:
                raise ValueError(f"base_images must be [N,H,W] or [N,C,H,W], got {tuple(base_images.shape)}")
        if len(base_images) == 0:
            raise EmptyDatasetError("TwoViewDataset: no base images")
        self.base = base_images
        self.transform = transform if isinstance(transform, TwoViewTransform) else TwoViewTransform(transform)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
        if self.labels is not None and len(self.labels) != len(base_images):
            raise ValueError(f"{len(base_images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x = self.base[i]
        if isinstance(x, tuple):
            x = x[0]
        v1, v2_ = self.transform(x)
        return v1, v2_, i
