"""Seeding, device selection and the non-finite guard shared by losses, metrics and the training loop."""
from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch

__all__ = ["seed_everything", "get_device", "NonFiniteError", "check_finite"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device)."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def get_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given ("cpu", "cuda", "cuda:1", "auto"/None); otherwise CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn("CUDA was requested but is not available; falling back to CPU", RuntimeWarning, stacklevel=2)
        return torch.device("cpu")
    return device


class NonFiniteError(FloatingPointError):
    """A loss, gradient or metric became NaN or infinite."""


def check_finite(value, name: str = "value") -> None:
    """Raise :class:`NonFiniteError` naming ``name`` if ``value`` (tensor or number) holds NaN or inf."""
    if isinstance(value, torch.Tensor):
        ok = bool(torch.isfinite(value.detach()).all())
    else:
        ok = bool(np.all(np.isfinite(np.asarray(value, dtype=float))))
    if not ok:
        raise NonFiniteError(f"{name} is not finite (NaN or inf): {value if not isinstance(value, torch.Tensor) or value.numel() == 1 else 'tensor'}")
