"""Summarize `make test` timings from pytest's JUnit XML reports: ``python -m reproduce.test_timings``.

``make test`` writes ``build/test-reports/unit.xml`` and ``build/test-reports/nbval.xml``; this prints the unit
suite's wall time and each notebook's smoke time (the sum of its cells), flags notebooks over the 60 s smoke budget,
and with ``--write PATH`` stores them as JSON with provenance (e.g. ``results/timings_test.json``, together with the
total measured around ``.ci/run``: ``--total-s``).
"""
from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

from contrastive_repro.io import atomic_write_json
from contrastive_repro.provenance import provenance

SMOKE_BUDGET_S = 60.0


def suite_seconds(xml: Path) -> float:
    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return float(sum(float(s.get("time", 0.0)) for s in suites))


def notebook_seconds(xml: Path) -> dict[str, float]:
    """Per notebook, the summed time of its cells (nbval reports one test case per cell)."""
    per = defaultdict(float)
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("classname", "")              # e.g. "notebooks.00_tour.ipynb"
        if name.endswith(".ipynb"):
            per[name[: -len(".ipynb")].split(".")[-1]] += float(case.get("time", 0.0))
    return dict(sorted(per.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reports", default="build/test-reports")
    ap.add_argument("--write", default=None)
    ap.add_argument("--total-s", type=float, default=None, help="wall time of the whole run, measured outside")
    args = ap.parse_args(argv)
    reports = Path(args.reports)
    out = {"unit_s": round(suite_seconds(reports / "unit.xml"), 1),
           "nbval_s": round(suite_seconds(reports / "nbval.xml"), 1),
           "smoke_notebook_s": {k: round(v, 1) for k, v in notebook_seconds(reports / "nbval.xml").items()},
           "smoke_budget_s": SMOKE_BUDGET_S}
    out["over_budget"] = [k for k, v in out["smoke_notebook_s"].items() if v > SMOKE_BUDGET_S]
    if args.total_s is not None:
        out["make_test_total_s"] = round(args.total_s, 1)
    for k, v in out.items():
        print(f"{k}: {v}")
    if args.write:
        atomic_write_json(args.write, dict(out, provenance=provenance()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
