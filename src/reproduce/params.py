"""Profile parameters: load ``configs/<profile>.yaml`` and check overrides against a notebook's parameters cell.

The smoke profile is the notebook's own defaults. A parameter's allowed values can be declared in its comment in
the parameters cell, e.g. ``loss = "infonce"  # one of: infonce, decomposable``; the runner enforces them.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import yaml

from . import PROFILES

_CHOICES = re.compile(r"one of:\s*(.+)$", re.IGNORECASE)


class ParameterError(ValueError):
    """A notebook parameter is unknown, ill-typed or not among its allowed values."""


def load_profile(profile: str, configs_dir: Path) -> dict[str, dict[str, Any]]:
    """``{notebook_stem: {param: value}}`` for ``profile``, read from ``configs/<profile>/<notebook>.yaml``.

    The smoke profile is the notebooks' own defaults (no files). A notebook without a file for the profile runs
    with its defaults.
    """
    if profile not in PROFILES:
        raise ParameterError(f"unknown profile {profile!r}; allowed: {', '.join(PROFILES)}")
    if profile == "smoke":
        return {}
    folder = configs_dir / profile
    if not folder.is_dir():
        raise FileNotFoundError(f"profile folder {folder} is missing")
    out = {}
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ParameterError(f"{path}: expected a mapping parameter -> value")
        out[path.stem] = data
    return out


def notebook_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """The parameters cell of ``path``: ``{name: {"default": value, "type": type_name, "choices": list|None}}``."""
    import papermill as pm

    params = pm.inspect_notebook(str(path))
    if not params:
        raise ParameterError(f"{path.name}: no cell tagged 'parameters'")
    out = {}
    for name, info in params.items():
        default_src = info.get("default")
        try:
            default = ast.literal_eval(default_src) if default_src is not None else None
        except (ValueError, SyntaxError):
            default = default_src
        type_name = info.get("inferred_type_name", "None")
        if type_name == "None" and default is not None:
            type_name = type(default).__name__
        choices = None
        m = _CHOICES.search(info.get("help") or "")
        if m:
            choices = [c.strip().strip("'\"") for c in m.group(1).split(",") if c.strip()]
        out[name] = {"default": default, "type": type_name, "choices": choices}
    return out


def _type_ok(value: Any, type_name: str) -> bool:
    t = type_name.lower()
    if t in ("none", ""):
        return True
    if t == "bool":
        return isinstance(value, bool)
    if t == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "str":
        return isinstance(value, str)
    if t.startswith("list") or t.startswith("tuple"):
        return isinstance(value, (list, tuple))
    if t.startswith("dict"):
        return isinstance(value, dict)
    return True


def validate(notebook: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Check ``overrides`` against the notebook's parameters cell; return them (raise ParameterError otherwise)."""
    spec = notebook_parameters(notebook)
    problems = []
    for name, value in overrides.items():
        if name not in spec:
            problems.append(f"unknown parameter {name!r}; allowed: {', '.join(sorted(spec))}")
            continue
        s = spec[name]
        if not _type_ok(value, s["type"]):
            problems.append(f"parameter {name!r} must be {s['type']} (default {s['default']!r}), got {value!r}")
        elif s["choices"]:
            values = value if isinstance(value, (list, tuple)) else [value]
            bad = [v for v in values if str(v) not in s["choices"]]
            if bad:
                problems.append(f"parameter {name!r}: {bad!r} not allowed; one of: {', '.join(s['choices'])}")
    if problems:
        raise ParameterError(f"{notebook.name}: " + "; ".join(problems))
    return dict(overrides)


def check_choice(name: str, value: Any, allowed) -> None:
    """In-notebook guard for a parameter with a fixed set of values (papermill -p bypasses the runner)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ParameterError(f"parameter {name!r}: {bad!r} not allowed; one of: {', '.join(map(str, allowed))}")
