"""What made a number: git commit, package versions, device, host, and a fingerprint of the code.

Written beside every metric. :func:`code_fingerprint` and :func:`notebook_fingerprint` key caches and checkpoints
on the code that computes them, so a cached result is never returned after the code changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

__all__ = ["git_commit", "git_dirty_paths", "package_versions", "device_description", "provenance",
           "code_fingerprint", "notebook_fingerprint", "data_fingerprint", "stable_hash"]

_LIBRARY_ROOT = Path(__file__).resolve().parent
# changes here never alter a number: results themselves and documentation
_NOT_CODE_PREFIXES = ("results/",)
_NOT_CODE_SUFFIXES = (".md",)

_PACKAGES = ("torch", "torchvision", "open_clip_torch", "pytorch-metric-learning", "numpy", "contrastive-repro")


def git_commit(cwd: str | Path | None = None) -> str:
    """The HEAD commit, with ``-dirty`` appended when the code differs from it (see :func:`git_dirty_paths`);
    ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if git_dirty_paths(cwd) else "")


def git_dirty_paths(cwd: str | Path | None = None) -> list[str] | None:
    """Paths that make the working tree differ from HEAD in a way that can change a result: modified tracked files
    and untracked (not ignored) files, except ``results/`` and Markdown. ``None`` outside git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=cwd,
                             capture_output=True, text=True, check=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    paths = []
    for line in out.splitlines():
        path = line[3:].split(" -> ")[-1].strip().strip('"')
        if path.startswith(_NOT_CODE_PREFIXES) or path.endswith(_NOT_CODE_SUFFIXES):
            continue
        paths.append(path)
    return paths


def stable_hash(obj, length: int = 16) -> str:
    """A short sha256 of ``obj`` serialized as canonical JSON (sorted keys; non-JSON values by ``str``)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _hash_files(files, base: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(str(f.relative_to(base)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_fingerprint(root: str | Path | None = None) -> str:
    """A short hash of every ``.py`` file of the library (``src/contrastive_repro/**``): path and content.

    Any edit of the library changes it, so results cached under it are recomputed. Computed afresh on each call
    (a few milliseconds), so an edit made during a session is seen.
    """
    base = Path(root) if root is not None else _LIBRARY_ROOT
    return _hash_files((p for p in base.rglob("*.py") if "__pycache__" not in p.parts), base)


def notebook_fingerprint(path: str | Path) -> str:
    """A short hash of the code cells of a notebook (sources only: outputs, metadata and Markdown do not count).

    ``"missing"`` when the file does not exist (a notebook run from an untitled kernel)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    cells = json.loads(path.read_text()).get("cells", [])
    sources = ["".join(c.get("source", "")) for c in cells if c.get("cell_type") == "code"]
    return stable_hash(sources)


def data_fingerprint(root: str | Path | None = None) -> str:
    """A cheap identity of the user-provided data under ``root`` (default ``$DATA_ROOT``): its resolved path and
    the names and modification times of its top-level entries (a dataset added, removed or replaced there changes
    it). Contents are not hashed: benchmark trees hold millions of files. ``"none"`` when there is no such folder."""
    root = Path(root if root is not None else os.environ.get("DATA_ROOT", "data")).expanduser()
    if not root.is_dir():
        return "none"
    entries = sorted((e.name, e.stat().st_mtime_ns) for e in root.iterdir())
    return stable_hash([str(root.resolve()), entries])


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def provenance(cwd: str | Path | None = None) -> dict:
    """Commit (``-dirty`` suffix and ``dirty: true`` when code differs from it), library fingerprint, versions,
    device, host and time."""
    commit = git_commit(cwd)
    dirty_paths = git_dirty_paths(cwd) if commit != "unknown" else None
    return {
        "commit": commit,
        "dirty": bool(dirty_paths),
        "dirty_paths": (dirty_paths or [])[:20],
        "code_fingerprint": code_fingerprint(),
        "versions": package_versions(),
        "device": device_description(),
        "host": platform.node(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
