"""Run a notebook end to end from a test: a profile's code path on tiny fixture data, into a temporary results folder.

Usage in a test::

    from notebook_runner import profile_params, run_notebook

    def test_07_paper_path(tmp_path):
        root = tmp_path / "data"
        ft.make_cub(root)                                   # tests/fixtures/data_trees.py: real on-disk formats
        params = profile_params("07_tcm_image_retrieval", "paper", steps=2, datasets=["cub"])
        rec = run_notebook("07_tcm_image_retrieval", params, results=tmp_path / "results", data_root=root)
        assert rec["profile"] == "paper"

``profile_params`` starts from ``configs/<profile>/<notebook>.yaml`` (so the test exercises that profile's settings
and checks the file is valid), applies the overrides that make it small (steps, sizes) and validates the result
against the notebook's parameters cell, exactly as the runner does. ``run_notebook`` executes the notebook with
papermill (kernel ``python3``, cwd ``notebooks/``), with ``DATA_ROOT`` pointing at the fixture tree and
``CONTRASTIVE_REPRO_RESULTS`` at a temporary folder, then asserts that ``metrics.json`` is ``complete`` for that
profile and that no temporary file was left behind; it returns the record. A failing cell raises papermill's
``PapermillExecutionError`` naming the cell, so a broken code path fails CI instead of a user's GPU job.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def profile_params(notebook: str, profile: str, **overrides: Any) -> dict[str, Any]:
    """The profile's parameters for ``notebook`` with ``overrides`` applied, validated against the notebook's
    parameters cell (ParameterError names what is wrong); ``profile`` is included."""
    from reproduce.params import load_profile, validate

    params = dict(load_profile(profile, ROOT / "configs").get(notebook, {}), **overrides)
    return dict(validate(NOTEBOOKS / f"{notebook}.ipynb", params), profile=profile)


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (or, with None, remove) environment variables for the duration; the kernel inherits them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_notebook(notebook: str, params: dict[str, Any], *, results: Path, data_root: Path | None = None,
                 cell_timeout: int = 600, env: dict[str, str] | None = None) -> dict:
    """Execute ``notebooks/<notebook>.ipynb`` with ``params`` into ``results``; return its complete metrics.json.

    ``params`` must include ``profile`` (see :func:`profile_params`). The executed notebook is written to
    ``results/<notebook>/<profile>/executed.ipynb`` for inspection when the test fails.
    """
    import papermill as pm

    profile = params["profile"]
    out = Path(results) / notebook / profile
    out.mkdir(parents=True, exist_ok=True)
    variables = {"CONTRASTIVE_REPRO_RESULTS": str(results), "CONTRASTIVE_REPRO_ROOT": str(ROOT),
                 "DATA_ROOT": str(data_root) if data_root is not None else None, "HF_HUB_OFFLINE": "1",
                 "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONHASHSEED": "0",
                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    with _environ(**variables):
        pm.execute_notebook(str(NOTEBOOKS / f"{notebook}.ipynb"), str(out / "executed.ipynb"), parameters=params,
                            kernel_name="python3", cwd=str(NOTEBOOKS), execution_timeout=cell_timeout,
                            progress_bar=False, log_output=False)
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["status"] == "complete", f"{notebook}: metrics.json says {rec['status']!r}"
    assert rec["profile"] == profile and rec["notebook"] == notebook
    assert not list(out.glob(".executing.*")) and not list(out.rglob("*.tmp"))
    return rec
