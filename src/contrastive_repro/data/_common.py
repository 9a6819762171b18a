"""Shared pieces of the dataset classes: the labelled-image base classes and small helpers.

Every dataset in :mod:`contrastive_repro.data` exposes

* ``labels``  -- an int64 tensor ``[N]`` with values in ``0 .. num_classes - 1``;
* ``targets`` -- the same as a list of Python ints (torchvision's name);
* ``classes`` -- the class names, ``classes[labels[i]]`` naming sample ``i``;
* ``num_classes``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import CorruptDatasetError, DatasetNotFoundError, EmptyDatasetError

__all__ = ["LabeledImageDataset", "TensorImageDataset", "pil_loader", "as_label_tensor", "relabel_contiguous"]


def pil_loader(path: str | os.PathLike) -> Image.Image:
    """Open an image file as an RGB PIL image (the file is closed before returning).

    A truncated or unreadable image raises :class:`~contrastive_repro.data.errors.CorruptDatasetError` naming the
    file (PIL's own message does not)."""
    with open(path, "rb") as f:
        try:
            img = Image.open(f)
            return img.convert("RGB")  # decodes the whole image: a truncated file fails here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptDatasetError("image", path, f"{type(e).__name__}: {e}") from e


def as_label_tensor(labels: Any) -> torch.Tensor:
    """Labels (list, numpy array or tensor) as a 1-D int64 CPU tensor."""
    if isinstance(labels, torch.Tensor):
        t = labels.detach().to("cpu")
    else:
        t = torch.as_tensor(np.asarray(labels))
    if t.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {t.dtype}")
    return t.to(torch.int64)


def relabel_contiguous(raw: Sequence[Any]) -> tuple[list[int], list[Any]]:
    """Map arbitrary sortable class keys to ``0..C-1`` in sorted key order. Returns ``(labels, sorted_keys)``."""
    keys = sorted(set(raw))
    index = {k: i for i, k in enumerate(keys)}
    return [index[k] for k in raw], keys


class _LabelsMixin:
    _labels: torch.Tensor
    classes: list[str]

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    @property
    def targets(self) -> list[int]:
        return self._labels.tolist()

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class LabeledImageDataset(_LabelsMixin, Dataset):
    """Images stored as files: ``dataset[i] -> (image, label)``.

    ``image`` is an RGB PIL image, or ``transform(image)`` when a transform is given; ``label`` is an int (or
    ``target_transform(label)``). Subclasses only build ``paths``, ``labels`` and ``classes``.
    """

    name = "dataset"

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Any, classes: Sequence[str],
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 loader: Callable[[str | os.PathLike], Any] = pil_loader, where: str | os.PathLike = ""):
        self.paths = [Path(p) for p in paths]
        self._labels = as_label_tensor(labels) if len(self.paths) else torch.zeros(0, dtype=torch.int64)
        self.classes = [str(c) for c in classes]
        self.transform, self.target_transform, self.loader = transform, target_transform, loader
        if len(self.paths) == 0:
            raise EmptyDatasetError(f"{self.name}: no samples found{f' in {where}' if where else ''}")
        if len(self._labels) != len(self.paths):
            raise ValueError(f"{self.name}: {len(self.paths)} paths but {len(self._labels)} labels")
        if int(self._labels.min()) < 0 or int(self._labels.max()) >= len(self.classes):
            raise ValueError(f"{self.name}: labels outside 0..{len(self.classes) - 1}")

    def check_files(self, max_report: int = 5) -> None:
        """Raise :class:`DatasetNotFoundError` naming the first missing image files, if any."""
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            shown = "\n".join(f"  {p}" for p in missing[:max_report])
            more = f"\n  ... and {len(missing) - max_report} more" if len(missing) > max_report else ""
            raise DatasetNotFoundError(self.name, missing[0],
                                       f"{len(missing)} of {len(self.paths)} listed image files are missing:\n"
                                       f"{shown}{more}\n\n{getattr(self, 'LAYOUT', '')}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        img = self.loader(self.paths[i])
        label = int(self._labels[i])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return img, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, classes={self.num_classes})"


class TensorImageDataset(_LabelsMixin, Dataset):
    """In-memory images: ``dataset[i] -> (image, label)``.

    ``images`` is uint8 ``[N,H,W]`` (grayscale) or ``[N,C,H,W]``. An item is the ``[C,H,W]`` uint8 tensor (a channel
    axis is added to grayscale images), passed through ``transform`` when given (torchvision v2 transforms accept
    uint8 tensors directly). With ``as_pil=True`` the item is a PIL image instead, for PIL-based transforms.
    """

    def __init__(self, images: torch.Tensor, labels: Any, classes: Sequence[str] | None = None,
                 transform: Callable | None = None, target_transform: Callable | None = None, as_pil: bool = False):
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4:
            raise ValueError(f"images must be [N,H,W] or [N,C,H,W], got shape {tuple(images.shape)}")
        self.images = images
        self._labels = as_label_tensor(labels)
        if len(self.images) == 0:
            raise EmptyDatasetError("TensorImageDataset: no images")
        if len(self._labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self._labels)} labels")
        if classes is None:
            classes = [str(c) for c in range(int(self._labels.max()) + 1)]
        self.classes = list(classes)
        self.transform, self.target_transform, self.as_pil = transform, target_transform, as_pil

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.as_pil:
            arr = img.permute(1, 2, 0).numpy()
            img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        label = int(self._labels[i])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return img, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, shape={tuple(self.images.shape[1:])}, classes={self.num_classes})"
