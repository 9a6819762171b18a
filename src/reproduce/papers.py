"""The papers' reported numbers, read from ``configs/paper_numbers.yaml`` (data, never typed into notebooks)."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import yaml

from .paths import repo_root


@lru_cache(maxsize=1)
def paper_numbers() -> dict:
    return yaml.safe_load((repo_root() / "configs" / "paper_numbers.yaml").read_text())


def paper_value(key: str | None) -> Any:
    """Look up a dotted key such as ``lms.table1.gc.cifar10``; ``None`` when the key is absent or empty."""
    if not key:
        return None
    node: Any = paper_numbers()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"paper number {key!r} not in configs/paper_numbers.yaml (at {part!r})")
        node = node[part]
    return node
