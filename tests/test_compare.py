"""The comparison of a reproduction run with the committed reference: rows, claims, tolerance, statuses."""
import json

import pytest

from reproduce.compare import build_report, close, compare_claims, compare_notebook, compare_summaries, format_report


def _row(metric, value):
    return {"experiment": "e", "metric": metric, "value": value}


def _claim(cid, effect, verdict):
    return {"id": cid, "effect": effect, "ci_low": effect - 0.1, "ci_high": effect + 0.1, "verdict": verdict}


@pytest.mark.parametrize("ours, ref, expected", [
    (1.0, 1.0, True),
    (1.049, 1.0, True),        # 0.049 <= 0.001 + 0.05 * 1
    (1.052, 1.0, False),       # 0.052 >  0.051
    (0.0009, 0.0, True),       # absolute part for values near zero
    (0.002, 0.0, False),
    (float("nan"), float("nan"), True),
    (float("nan"), 1.0, False),
    ("a", "a", True),
])
def test_tolerance_rule(ours, ref, expected):
    assert close(ours, ref, rtol=0.05, atol=1e-3) is expected


def test_summary_rows_are_matched_by_experiment_and_metric():
    rows = compare_summaries([_row("a", 1.0), _row("b", 5.0), _row("new", 1.0)],
                             [_row("b", 2.0), _row("a", 1.0), _row("old", 3.0)], rtol=0.0, atol=0.0)
    by = {r["metric"]: r for r in rows}
    assert by["a"]["status"] == "match" and by["b"]["status"] == "differs" and by["b"]["abs_diff"] == 3.0
    assert by["new"]["status"] == "missing in reference" and by["old"]["status"] == "missing in run"


def test_claims_need_same_verdict_and_close_effect():
    res = compare_claims([_claim("c1", 0.50, "supported"), _claim("c2", 0.5, "supported"),
                          _claim("c3", 0.9, "refuted")],
                         [_claim("c1", 0.51, "supported"), _claim("c2", 0.5, "inconclusive"),
                          _claim("c3", 0.5, "refuted")], rtol=0.05, atol=0.0)
    assert [c["status"] for c in res] == ["match", "differs", "differs"]


def test_notebook_status_and_report(tmp_path):
    ref = {"status": "complete", "params": {"s": 1}, "summary": [_row("a", 1.0)],
           "claims": [_claim("c", 0.2, "supported")], "provenance": {"commit": "abc"}}
    ours = json.loads(json.dumps(ref))
    assert compare_notebook(ours, ref, 0.0, 0.0)["status"] == "match"
    assert compare_notebook(None, ref, 0.0, 0.0)["status"] == "no complete run"
    assert compare_notebook(ours, None, 0.0, 0.0)["status"] == "no reference"
    ours["claims"][0]["verdict"] = "refuted"
    assert compare_notebook(ours, ref, 0.0, 0.0)["status"] == "differs"

    for base, rec in (("run", ours), ("ref", ref)):
        p = tmp_path / base / "01_x" / "cpu" / "metrics.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(rec))
    failed = tmp_path / "run" / "02_y" / "cpu" / "metrics.json"  # a failed run is never compared as a run
    failed.parent.mkdir(parents=True)
    failed.write_text(json.dumps({"status": "failed", "summary": [_row("a", 1.0)]}))
    report = build_report("cpu", ["01_x", "02_y"], tmp_path / "run", tmp_path / "ref",
                          {"01_x": {"wall_time_s": 12.0, "resumed": False}, "02_y": {"wall_time_s": 3.5}},
                          elapsed_s=20.0, rtol=0.0, atol=0.0)
    assert report["counts"] == {"differs": 1, "no complete run": 1}
    assert report["timing"] == {"notebooks_s": 15.5, "elapsed_s": 20.0}
    text = format_report(report)
    assert "01_x: differs" in text and "claim c: ours refuted" in text and "02_y: no complete run" in text
    assert "total: 16 s of notebook time" in text
