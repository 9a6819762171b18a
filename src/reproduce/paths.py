"""Where the repository, its notebooks, configs and results live."""
from __future__ import annotations

import os
from pathlib import Path


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The repository root: ``$CONTRASTIVE_REPRO_ROOT`` if set, else the first parent holding ``pyproject.toml``
    and ``notebooks/`` (searched from ``start``, the working directory, then this file)."""
    env = os.environ.get("CONTRASTIVE_REPRO_ROOT")
    if env:
        return Path(env).resolve()
    candidates = [Path(start or os.getcwd()).resolve(), Path(__file__).resolve()]
    for c in candidates:
        for p in [c, *c.parents]:
            if (p / "pyproject.toml").is_file() and (p / "notebooks").is_dir():
                return p
    raise FileNotFoundError("cannot find the contrastive-repro repository root (a folder with pyproject.toml and "
                            "notebooks/); set CONTRASTIVE_REPRO_ROOT")


def results_dir(notebook: str, profile: str, root: Path | None = None, base: Path | None = None) -> Path:
    """``<base>/<notebook>/<profile>``: ``base`` if given, else ``$CONTRASTIVE_REPRO_RESULTS`` (where the runner
    puts a reproduction run), else the committed ``<root>/results``."""
    env = os.environ.get("CONTRASTIVE_REPRO_RESULTS")
    base_path = Path(base) if base else Path(env) if env else (root or repo_root()) / "results"
    return base_path / notebook / profile
