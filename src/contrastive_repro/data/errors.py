"""Errors raised by dataset loaders: each names the path it looked at and the layout it expected."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DatasetNotFoundError", "EmptyDatasetError", "CorruptDatasetError", "data_root"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file or folder is missing. The message names the path and the expected on-disk layout."""

    def __init__(self, name: str, path: str | os.PathLike, layout: str, hint: str = ""):
        self.name, self.path, self.layout = name, Path(path), layout
        msg = f"{name}: not found at {self.path}\nexpected layout:\n{layout.rstrip()}"
        if hint:
            msg += f"\n{hint}"
        super().__init__(msg)


class EmptyDatasetError(ValueError):
    """A dataset (or a split of it) holds no samples."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be read: truncated, wrong magic number, sizes that do not add up.

    The message names the file and what was wrong with it; ``path`` and ``reason`` are kept as attributes.
    """

    def __init__(self, name: str, path: str | os.PathLike, reason: str, hint: str = ""):
        self.name, self.path, self.reason = name, Path(path), reason
        msg = f"{name}: {self.path} is corrupt or truncated: {reason}"
        if hint:
            msg += f"\n{hint}"
        super().__init__(msg)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding user-provided benchmark datasets: ``root`` if given, else ``$DATA_ROOT``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("DATA_ROOT", "data")).expanduser()
