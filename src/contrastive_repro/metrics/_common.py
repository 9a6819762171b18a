"""Input handling shared by the metric functions (not public API)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..utils import check_finite

__all__: list[str] = []


def as_tensor(x, name: str, *, device: torch.device | None = None) -> torch.Tensor:
    """``x`` (tensor, numpy array or nested sequence) as a tensor, on ``x``'s device unless ``device`` is given."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        t = torch.as_tensor(np.asarray(x))
    if device is not None:
        t = t.to(device)
    return t


def float_embeddings(x, name: str = "embeddings", *, dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
    """A 2-D floating tensor checked for NaN/inf. bf16/fp16 are upcast to float32 (float64 stays float64).

    Integer or boolean embeddings are refused (``TypeError``): they are almost always labels or indices passed by
    mistake, and cosine similarities of them are meaningless."""
    t = as_tensor(x, name, device=device)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating-point embeddings, got dtype {t.dtype} (indices or labels passed "
                        "as features? cast with .float() if this is intended)")
    if dtype is None:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    t = t.to(dtype)
    check_finite(t, name)
    return t


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (zero rows stay zero)."""
    return torch.nn.functional.normalize(x, p=2.0, dim=1, eps=1e-12)


def int_labels(labels, n: int, name: str = "labels", *, device: torch.device | None = None) -> torch.Tensor:
    """1-D int64 label tensor of length ``n`` (any integer-valued input)."""
    t = as_tensor(labels, name, device=device)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D of length {n}, got shape {tuple(t.shape)}")
    if t.is_floating_point() and not bool(torch.all(t == torch.round(t))):
        raise ValueError(f"{name} must be integers")
    return t.to(torch.int64)


def check_same_dim(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise ValueError naming both arguments when two ``[n, dim]`` feature tensors differ in ``dim``."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has feature size {a.shape[1]} but {name_b} has {b.shape[1]}: they must match")


def check_label_range(labels: torch.Tensor, n_classes: int, name: str = "labels") -> None:
    """Raise ValueError naming ``name`` and the offending values when a label is outside ``[0, n_classes)``."""
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if bad.numel():
        shown = sorted(set(bad.tolist()))[:10]
        raise ValueError(f"{name} must lie in [0, {n_classes}) (one per class), got {bad.numel()} out of range: "
                         f"{shown}")


def dense_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique label values, labels remapped to 0..C-1)."""
    uniq, inv = torch.unique(labels, return_inverse=True)
    return uniq, inv


def check_ks(ks: Sequence[int], name: str = "ks") -> tuple[int, ...]:
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"{name} must be positive integers, got {ks}")
    return ks


def default_chunk(n_cols: int, budget_elements: int = 1 << 24) -> int:
    """Rows per chunk so that a chunk x n_cols block holds about ``budget_elements`` entries."""
    return int(max(1, min(4096, budget_elements // max(1, n_cols))))
