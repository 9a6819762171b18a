"""Profile parameters: load ``configs/<profile>.yaml`` and check overrides against a notebook's parameters cell.

The smoke profile is the notebook's own defaults. A parameter's allowed values can be declared in its comment in
the parameters cell and the runner enforces them before anything runs (for a list, on every element):

* ``loss = "infonce"  # one of: infonce, decomposable``
* ``lr = 2e-3  # range: (0, 1]`` (brackets: inclusive, parentheses: exclusive; an empty bound is unbounded:
  ``steps = 40  # range: [1, )``)
* ``temperature = 0.1  # > 0`` (strict bounds ``>``/``<``; several may be given: ``# > 0, < 1``). Write inclusive
  bounds with ``range:``: papermill cannot parse a parameter line with a second ``=`` (as in ``>=``).

A list parameter's elements must have the type of its default's elements (``seeds = [0, 1]``: ints).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import yaml

from . import PROFILES

_CHOICES = re.compile(r"one of:\s*(.+)$", re.IGNORECASE)
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf"
_RANGE = re.compile(rf"range:\s*([\[(])\s*({_NUM})?\s*,\s*({_NUM})?\s*([\])])", re.IGNORECASE)
_BOUND = re.compile(rf"(?<![\w-])(>=|<=|>|<)\s*({_NUM})")


class ParameterError(ValueError):
    """A notebook parameter is unknown, ill-typed or not among its allowed values."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_profile_file(path: Path) -> dict[str, Any]:
    """``{param: value}`` from one profile YAML file; ParameterError naming the file, line and problem when it is
    not valid YAML, has a key twice, is not a mapping or has a key that is not a parameter name."""
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ParameterError(f"{path}: malformed YAML{where}: {problem}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ParameterError(f"{path}: expected a mapping parameter -> value, got {type(data).__name__}")
    bad = [k for k in data if not (isinstance(k, str) and k.isidentifier())]
    if bad:
        raise ParameterError(f"{path}: keys must be parameter names, got {bad!r}")
    return data


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
    return {path.stem: read_profile_file(path) for path in sorted(folder.glob("*.yaml"))}


def parse_bounds(comment: str) -> list[tuple[str, float]]:
    """``[(op, bound)]`` declared in a parameter's comment: ``>= 1``, ``< 5`` or ``range: (0, 1]``."""
    bounds = []
    m = _RANGE.search(comment)
    if m:
        lo_br, lo, hi, hi_br = m.groups()
        if lo:
            bounds.append((">=" if lo_br == "[" else ">", float(lo)))
        if hi:
            bounds.append(("<=" if hi_br == "]" else "<", float(hi)))
        comment = comment[:m.start()] + comment[m.end():]
    bounds += [(op, float(v)) for op, v in _BOUND.findall(comment)]
    return bounds


_OPS = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}


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
        comment = info.get("help") or ""
        m = _CHOICES.search(comment)
        if m:
            choices = [c.strip().strip("'\"") for c in m.group(1).split(",") if c.strip()]
        out[name] = {"default": default, "type": type_name, "choices": choices,
                     "bounds": [] if m else parse_bounds(comment), "element_type": _element_type(default)}
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


def _element_type(default: Any) -> str | None:
    """The type name shared by the elements of a list/tuple default (``float`` if ints and floats mix)."""
    if not isinstance(default, (list, tuple)) or not default:
        return None
    names = {type(v).__name__ for v in default}
    if names <= {"int", "float"} and "float" in names:
        return "float"
    return names.pop() if len(names) == 1 else None


def _problems(name: str, value: Any, s: dict) -> list[str]:
    """What is wrong with ``value`` for parameter ``name`` of spec ``s`` (empty when nothing is)."""
    if not _type_ok(value, s["type"]):
        return [f"parameter {name!r} must be {s['type']} (default {s['default']!r}), got {value!r}"]
    is_list = isinstance(value, (list, tuple))
    values = list(value) if is_list else [value]
    out = []
    if is_list and s.get("element_type"):
        for i, v in enumerate(values):
            if not _type_ok(v, s["element_type"]):
                out.append(f"parameter {name!r}[{i}] must be {s['element_type']} like the default's elements "
                           f"({s['default']!r}), got {v!r}")
        if out:
            return out
    if s["choices"]:
        bad = [v for v in values if str(v) not in s["choices"]]
        if bad:
            out.append(f"parameter {name!r}: {bad!r} not allowed; one of: {', '.join(s['choices'])}")
    for op, bound in s.get("bounds", []):
        for i, v in enumerate(values):
            where = f"{name!r}[{i}]" if is_list else repr(name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool)):
                out.append(f"parameter {where} must be a number {op} {bound:g}, got {v!r}")
            elif not _OPS[op](v, bound):
                out.append(f"parameter {where} = {v!r} is out of range: must be {op} {bound:g}")
    return out


def validate(notebook: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Check ``overrides`` against the notebook's parameters cell (names, types, list elements, allowed values,
    declared ranges); return them, or raise ParameterError listing every problem."""
    spec = notebook_parameters(notebook)
    problems = []
    for name, value in overrides.items():
        if name not in spec:
            problems.append(f"unknown parameter {name!r}; allowed: {', '.join(sorted(spec))}")
            continue
        problems += _problems(name, value, spec[name])
    if problems:
        raise ParameterError(f"{notebook.name}: " + "; ".join(problems))
    return dict(overrides)


def check_choice(name: str, value: Any, allowed) -> None:
    """In-notebook guard for a parameter with a fixed set of values (papermill -p bypasses the runner)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ParameterError(f"parameter {name!r}: {bad!r} not allowed; one of: {', '.join(map(str, allowed))}")
