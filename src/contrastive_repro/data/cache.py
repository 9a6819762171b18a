"""A small on-disk cache for processed datasets (e.g. rendered emoji), with a checksum over its contents.

Cache folder, first that applies:

1. the ``cache_dir`` argument;
2. ``$CONTRASTIVE_REPRO_CACHE``;
3. ``<git root of the current working directory>/.cache/contrastive_repro`` (``.cache/`` is git-ignored);
4. ``~/.cache/contrastive_repro``.

A cache file is a ``torch.save``'d dict ``{"format", "key", "payload", "checksum"}`` written atomically with
:func:`contrastive_repro.io.atomic_torch_save`. :func:`load_checked` returns ``None`` -- after a warning -- when the
file cannot be unpickled (truncated, corrupt bytes), its key differs from the expected one, or the checksum of the
payload does not match; the caller then rebuilds and overwrites it.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..io import atomic_torch_save

__all__ = ["CACHE_ENV", "CacheWarning", "default_cache_dir", "payload_checksum", "save_checked", "load_checked",
           "file_sha256"]

CACHE_ENV = "CONTRASTIVE_REPRO_CACHE"
_FORMAT = "contrastive_repro.cache/1"


class CacheWarning(UserWarning):
    """A cache file was unreadable or stale and is being rebuilt."""


def _git_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return None


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the cache folder (see the module docstring for the order). The folder is not created."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    root = _git_root(Path.cwd().resolve())
    if root is not None:
        return root / ".cache" / "contrastive_repro"
    return Path.home() / ".cache" / "contrastive_repro"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _update(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"ndarray:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    elif isinstance(obj, dict):
        h.update(f"dict:{len(obj)};".encode())
        for k in sorted(obj, key=str):
            h.update(f"key:{k!s};".encode())
            _update(h, obj[k])
    elif isinstance(obj, (list, tuple)) and not all(isinstance(v, (str, int, float, bool, type(None))) for v in obj):
        h.update(f"seq:{len(obj)};".encode())
        for v in obj:
            _update(h, v)
    else:  # JSON-able scalars and flat lists
        h.update(("json:" + json.dumps(obj, sort_keys=True, ensure_ascii=False) + ";").encode())


def payload_checksum(payload: Any) -> str:
    """SHA-256 over the bytes, dtypes and shapes of every tensor and the JSON form of every other value."""
    h = hashlib.sha256()
    _update(h, payload)
    return h.hexdigest()


def save_checked(path: str | os.PathLike, payload: dict, key: dict) -> Path:
    """Write ``payload`` (tensors, strings, numbers, lists) with its ``key`` and checksum, atomically."""
    obj = {"format": _FORMAT, "key": key, "payload": payload, "checksum": payload_checksum(payload)}
    return atomic_torch_save(obj, path)


def load_checked(path: str | os.PathLike, key: dict) -> dict | None:
    """The cached payload if ``path`` exists, is readable, has this ``key`` and an intact checksum; else ``None``.

    A missing file returns ``None`` silently; any other failure warns with :class:`CacheWarning`.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a cache miss
        warnings.warn(f"cache file {path} is unreadable ({type(e).__name__}: {str(e)[:200]}); rebuilding it",
                      CacheWarning, stacklevel=3)
        return None
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT or "payload" not in obj:
        warnings.warn(f"cache file {path} has an unknown format; rebuilding it", CacheWarning, stacklevel=3)
        return None
    if obj.get("key") != key:
        warnings.warn(f"cache file {path} was built from different inputs; rebuilding it", CacheWarning, stacklevel=3)
        return None
    if payload_checksum(obj["payload"]) != obj.get("checksum"):
        warnings.warn(f"cache file {path} fails its checksum (corrupt contents); rebuilding it", CacheWarning,
                      stacklevel=3)
        return None
    return obj["payload"]
