"""Deterministic train/test splits over integer labels.

* :func:`split_by_class` -- disjoint class sets (the deep-metric-learning protocol: test classes are unseen).
* :func:`split_by_item`  -- every class on both sides, a stratified share of each class's items held out.

Both return sorted int64 index tensors ``(train_idx, test_idx)`` and depend only on the labels and ``seed``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._common import as_label_tensor
from .errors import EmptyDatasetError

__all__ = ["split_by_class", "split_by_item"]


def _idx(a) -> torch.Tensor:
    return torch.as_tensor(np.sort(np.asarray(a, dtype=np.int64)), dtype=torch.int64)


def split_by_class(labels: Any, test_fraction: float = 0.5, *, n_test_classes: int | None = None,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the samples so that train and test hold disjoint sets of classes.

    The classes are shuffled with ``numpy.random.default_rng(seed)``; the first ``n_test_classes`` (default
    ``round(test_fraction * C)``, clipped to ``1 .. C-1``) become test classes.
    """
    lab = as_label_tensor(labels).numpy()
    classes = np.unique(lab)
    if len(classes) < 2:
        raise ValueError(f"split_by_class needs at least 2 classes, got {len(classes)}")
    if n_test_classes is None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        n_test_classes = int(round(test_fraction * len(classes)))
    n_test_classes = int(min(max(n_test_classes, 1), len(classes) - 1))
    perm = np.random.default_rng(seed).permutation(classes)
    test_classes = perm[:n_test_classes]
    is_test = np.isin(lab, test_classes)
    return _idx(np.flatnonzero(~is_test)), _idx(np.flatnonzero(is_test))


def split_by_item(labels: Any, test_fraction: float = 0.2, *, n_test_per_class: int | None = None,
                  min_train_per_class: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out items of every class (stratified): the same classes appear in train and test.

    A class with ``n`` items sends ``n_test_per_class`` (or ``round(test_fraction * n)``, but at least one) of them
    to test, while keeping at least ``min_train_per_class`` in train; a class too small for that stays in train.
    """
    lab = as_label_tensor(labels).numpy()
    if len(lab) == 0:
        raise EmptyDatasetError("split_by_item: no labels")
    if n_test_per_class is None and not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(lab):
        members = np.flatnonzero(lab == c)
        members = members[rng.permutation(len(members))]
        n = len(members)
        k = n_test_per_class if n_test_per_class is not None else max(1, int(round(test_fraction * n)))
        k = max(0, min(k, n - min_train_per_class))
        test.extend(members[:k])
        train.extend(members[k:])
    return _idx(train), _idx(test)
