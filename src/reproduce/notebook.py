"""Bookkeeping for a notebook run: where its results go, its figures, its sub-run cache and its metrics.json.

Usage inside a notebook, right after the parameters cell::

    from reproduce.notebook import start_run
    run = start_run("00_tour", profile=profile, seeds=[seed], params=dict(steps=steps, lr=lr))
    ...
    run.savefig(fig, "loss_curve")                  # results/00_tour/<profile>/loss_curve.png
    res = run.cached("seed0", lambda: train(...))   # results/.../runs/seed0.json; reused while params+code match
    run.finish(metrics, summary=[...], claims=[...])  # results/.../metrics.json with provenance

``summary`` rows feed the README table: ``{"experiment", "metric", "value", "std", "n", "paper_key"}``; the paper's
number is looked up from ``configs/paper_numbers.yaml`` by ``paper_key``, never typed into a notebook.
``claims`` rows feed the claims ledger (see :mod:`reproduce.claims`).

Never stale: ``run.fingerprint`` hashes the library's code, the notebook's code cells and the data location
(:mod:`contrastive_repro.provenance`); sub-run records and checkpoint folders are keyed on it and on the
parameters, so nothing computed by other code, data or parameters is reused. ``start_run`` marks ``metrics.json``
``running``; only ``finish`` writes ``complete``, so a run that fails never leaves a ``complete`` record behind.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from contrastive_repro.io import atomic_write_json
from contrastive_repro.provenance import (code_fingerprint, data_fingerprint, notebook_fingerprint, provenance,
                                          stable_hash)
from contrastive_repro.utils import check_finite

from . import PROFILES
from .params import ParameterError
from .paths import repo_root, results_dir

_SUMMARY_KEYS = {"experiment", "metric", "value", "std", "n", "paper_key", "higher_is_better", "note"}


@dataclass
class Run:
    notebook: str
    profile: str
    seeds: list[int]
    params: dict[str, Any]
    dir: Path
    started: float = field(default_factory=time.time)
    figures: list[str] = field(default_factory=list)
    fingerprint: dict[str, str] = field(default_factory=dict)  # {"library", "notebook", "data"}: see start_run

    @property
    def runs_dir(self) -> Path:
        return self.dir / "runs"

    @property
    def key(self) -> str:
        """Hash of the parameters and the code/data fingerprint: what every cached thing of this run is keyed on."""
        return stable_hash({"params": _plain(self.params), "fingerprint": self.fingerprint})

    @property
    def checkpoint_dir(self) -> Path:
        """``checkpoints/<key>``: a checkpoint folder of its own for each parameters + code + data combination,
        so training never resumes (or returns) a run made with other parameters or code."""
        return self.dir / "checkpoints" / self.key

    def savefig(self, fig, name: str, dpi: int = 110) -> Path:
        """Save a matplotlib figure as ``<name>.png`` beside metrics.json (atomically)."""
        import io as _io

        from contrastive_repro.io import atomic_write_bytes

        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        path = atomic_write_bytes(self.dir / f"{name}.png", buf.getvalue())
        if path.name not in self.figures:
            self.figures.append(path.name)
        return path

    def cached(self, key: str, compute: Callable[[], dict]) -> dict:
        """Return the JSON result of sub-run ``key``; compute and store it atomically if it is not there yet.

        This is what makes a long notebook resumable: an interrupted sweep recomputes only the missing sub-runs.
        The stored record carries the parameters and the code/data fingerprint: a sub-run made with other
        parameters, another version of the library or of the notebook, or other data is recomputed.
        """
        path = self.runs_dir / f"{key}.json"
        if path.is_file():
            try:
                rec = json.loads(path.read_text())
                if rec.get("params") == _plain(self.params) and rec.get("fingerprint") == self.fingerprint:
                    return rec["result"]
            except (json.JSONDecodeError, KeyError, AttributeError):
                pass  # a corrupt record is recomputed
        t0 = time.time()
        result = compute()
        atomic_write_json(path, {"key": key, "params": _plain(self.params), "fingerprint": self.fingerprint,
                                 "seconds": round(time.time() - t0, 2), "result": result})
        return json.loads(json.dumps(_plain(result)))

    def finish(self, metrics: dict, summary: list[dict] | None = None, claims: list[dict] | None = None) -> Path:
        """Write ``metrics.json``: metrics, README summary rows, claims-ledger rows (built with
        :func:`reproduce.claims.claim_row`) and provenance (profile, seeds, params, commit...)."""
        from .claims import check_claims

        claims = check_claims(claims or [])
        for row in summary or []:
            unknown = set(row) - _SUMMARY_KEYS
            if unknown or not {"experiment", "metric", "value"} <= set(row):
                raise ValueError(f"bad summary row {row}: keys must be among {sorted(_SUMMARY_KEYS)}")
            check_finite(float(row["value"]), f"summary value {row['experiment']}/{row['metric']}")
        record = {
            "notebook": self.notebook,
            "profile": self.profile,
            "seeds": list(self.seeds),
            "params": _plain(self.params),
            "status": "complete",
            "wall_time_s": round(time.time() - self.started, 1),
            "provenance": provenance(repo_root()),
            "figures": sorted(self.figures),
            "summary": summary or [],
            "claims": claims,
            "metrics": metrics,
        }
        return atomic_write_json(self.dir / "metrics.json", record)


def _plain(obj):
    return json.loads(json.dumps(obj, default=str))


def start_run(notebook: str, profile: str, seeds, params: dict[str, Any]) -> Run:
    """Validate the profile, create ``results/<notebook>/<profile>/`` and return a :class:`Run`."""
    if profile not in PROFILES:
        raise ParameterError(f"parameter 'profile' must be one of {', '.join(PROFILES)}, got {profile!r}")
    seeds = [int(s) for s in (seeds if isinstance(seeds, (list, tuple)) else [seeds])]
    if not seeds:
        raise ParameterError("at least one seed is needed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = results_dir(notebook, profile)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(notebook=notebook, profile=profile, seeds=seeds, params=dict(params, profile=profile, seeds=seeds),
              dir=out, fingerprint=run_fingerprint(notebook))
    mark_status(out, "running", notebook=notebook, profile=profile, params=_plain(run.params))
    return run


def run_fingerprint(notebook: str) -> dict[str, str]:
    """What besides the parameters determines a notebook's numbers: the library's code, the notebook's code cells
    (``notebooks/<notebook>.ipynb``) and the data location (see :mod:`contrastive_repro.provenance`)."""
    try:
        nb_path = repo_root() / "notebooks" / f"{notebook}.ipynb"
    except FileNotFoundError:
        nb_path = Path(f"{notebook}.ipynb")
    return {"library": code_fingerprint(), "notebook": notebook_fingerprint(nb_path), "data": data_fingerprint()}


def mark_status(out_dir: Path, status: str, **fields) -> Path:
    """Replace ``out_dir/metrics.json`` by a record saying ``status`` (``running`` or ``failed``) and ``fields``.

    Called when a run starts and when it fails, so a previous run's ``complete`` record never outlives a new run
    of the notebook (the README table and the comparison only read ``complete`` records)."""
    return atomic_write_json(Path(out_dir) / "metrics.json", {"status": status, **fields,
                                                              "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                        time.gmtime())})


def load_metrics(notebook: str, profile: str) -> dict | None:
    path = results_dir(notebook, profile) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None
