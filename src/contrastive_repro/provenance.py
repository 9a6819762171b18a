"""What made a number: git commit, package versions, device, host. Written beside every metric."""
from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

__all__ = ["git_commit", "package_versions", "device_description", "provenance"]

_PACKAGES = ("torch", "torchvision", "open_clip_torch", "pytorch-metric-learning", "numpy", "contrastive-repro")


def git_commit(cwd: str | Path | None = None) -> str:
    """The HEAD commit, with ``-dirty`` appended when tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    return {
        "commit": git_commit(cwd),
        "versions": package_versions(),
        "device": device_description(),
        "host": platform.node(),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
