"""Compare a fresh run of the notebooks with the committed reference results, per summary row and per claim.

A summary row (``experiment``, ``metric``, ``value``) matches when ``|ours - ref| <= atol + rtol * |ref|`` (the
numpy ``isclose`` rule); a claim (``id``, ``effect``, ``verdict``, ...) matches when its verdict is the same and
its effect is within the same tolerance. Only ``complete`` records are compared: a notebook whose run failed, or
that has no committed reference, is reported as such, never as a match.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

DEFAULT_RTOL = 0.05
DEFAULT_ATOL = 1e-3


def close(ours, ref, rtol: float, atol: float) -> bool:
    """``|ours - ref| <= atol + rtol * |ref|`` for finite numbers; equal non-numbers (or both NaN) match."""
    if isinstance(ours, (int, float)) and isinstance(ref, (int, float)) and not isinstance(ours, bool):
        if math.isnan(ours) or math.isnan(ref):
            return math.isnan(ours) and math.isnan(ref)
        return abs(ours - ref) <= atol + rtol * abs(ref)
    return ours == ref


def load_complete(path: Path) -> dict | None:
    """The record in ``path`` if it exists, parses and says ``status: complete``; else None."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and rec.get("status") == "complete" else None


def _diff(ours, ref):
    if isinstance(ours, (int, float)) and isinstance(ref, (int, float)):
        return abs(ours - ref)
    return None


def compare_summaries(ours: list[dict], ref: list[dict], rtol: float, atol: float) -> list[dict]:
    """One entry per ``(experiment, metric)`` present in either list, with a ``status``: ``match``, ``differs``,
    ``missing in run`` or ``missing in reference``."""
    a = {(r["experiment"], r["metric"]): r.get("value") for r in ours}
    b = {(r["experiment"], r["metric"]): r.get("value") for r in ref}
    out = []
    for key in list(dict.fromkeys([*b, *a])):
        o, r = a.get(key), b.get(key)
        if key not in a:
            status = "missing in run"
        elif key not in b:
            status = "missing in reference"
        else:
            status = "match" if close(o, r, rtol, atol) else "differs"
        out.append({"experiment": key[0], "metric": key[1], "ours": o, "reference": r, "abs_diff": _diff(o, r),
                    "status": status})
    return out


def compare_claims(ours: list[dict], ref: list[dict], rtol: float, atol: float) -> list[dict]:
    """One entry per claim ``id``: ``match`` when the verdicts are equal and the effects close."""
    a = {c["id"]: c for c in ours}
    b = {c["id"]: c for c in ref}
    out = []
    for cid in list(dict.fromkeys([*b, *a])):
        o, r = a.get(cid, {}), b.get(cid, {})
        if cid not in a:
            status = "missing in run"
        elif cid not in b:
            status = "missing in reference"
        else:
            same = o.get("verdict") == r.get("verdict") and close(o.get("effect"), r.get("effect"), rtol, atol)
            status = "match" if same else "differs"
        out.append({"id": cid, "verdict": o.get("verdict"), "reference_verdict": r.get("verdict"),
                    "effect": o.get("effect"), "reference_effect": r.get("effect"),
                    "ci": [o.get("ci_low"), o.get("ci_high")], "reference_ci": [r.get("ci_low"), r.get("ci_high")],
                    "abs_diff": _diff(o.get("effect"), r.get("effect")), "status": status})
    return out


def compare_notebook(ours: dict | None, ref: dict | None, rtol: float, atol: float) -> dict:
    """Compare two metrics.json records of one notebook; ``status`` is ``match``, ``differs``, ``no complete
    run`` or ``no reference``."""
    rows = compare_summaries((ours or {}).get("summary", []), (ref or {}).get("summary", []), rtol, atol)
    claims = compare_claims((ours or {}).get("claims", []) or [], (ref or {}).get("claims", []) or [], rtol, atol)
    if ours is None:
        status = "no complete run"
    elif ref is None:
        status = "no reference"
    elif all(e["status"] == "match" for e in rows + claims):
        status = "match"
    else:
        status = "differs"
    return {"status": status, "params_match": (ours or {}).get("params") == (ref or {}).get("params"),
            "reference_commit": (ref or {}).get("provenance", {}).get("commit"),
            "summary": rows, "claims": claims}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)


def format_report(report: dict) -> str:
    """Human-readable lines: per notebook its status and wall time, then each row or claim that is not a match,
    then the totals."""
    lines = [f"== comparison with the committed results ({report['profile']}, "
             f"tolerance |ours - ref| <= {report['atol']:g} + {report['rtol']:g} * |ref|)"]
    for name, nb in report["notebooks"].items():
        n_ok = sum(e["status"] == "match" for e in nb["summary"] + nb["claims"])
        n_all = len(nb["summary"]) + len(nb["claims"])
        t = nb.get("wall_time_s")
        how = " (resumed: time of the earlier run)" if nb.get("resumed") else ""
        lines.append(f"{name}: {nb['status']}, {n_ok}/{n_all} rows and claims match, "
                     f"{_fmt(t)} s{how}" + ("" if nb["params_match"] or nb["status"] == "no reference"
                                            else "  [reference made with other parameters]"))
        for e in nb["summary"]:
            if e["status"] != "match":
                lines.append(f"    row {e['experiment']} / {e['metric']}: ours {_fmt(e['ours'])}, "
                             f"reference {_fmt(e['reference'])} ({e['status']})")
        for e in nb["claims"]:
            if e["status"] != "match":
                lines.append(f"    claim {e['id']}: ours {e['verdict']} effect {_fmt(e['effect'])}, reference "
                             f"{e['reference_verdict']} effect {_fmt(e['reference_effect'])} ({e['status']})")
    t = report["timing"]
    lines.append(f"total: {t['notebooks_s']:.0f} s of notebook time ({t['notebooks_s'] / 60:.1f} min), "
                 f"{t['elapsed_s']:.0f} s elapsed in this invocation; "
                 f"{report['counts'].get('match', 0)}/{len(report['notebooks'])} notebooks match")
    return "\n".join(lines)


def build_report(profile: str, notebooks: list[str], run_base: Path, ref_base: Path, timings: dict[str, dict],
                 elapsed_s: float, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL) -> dict:
    """Compare ``run_base/<nb>/<profile>/metrics.json`` with ``ref_base/<nb>/<profile>/metrics.json`` for each
    notebook. ``timings``: ``{nb: {"wall_time_s": float, "resumed": bool}}``."""
    nbs = {}
    for name in notebooks:
        ours = load_complete(Path(run_base) / name / profile / "metrics.json")
        ref = load_complete(Path(ref_base) / name / profile / "metrics.json")
        nbs[name] = {**compare_notebook(ours, ref, rtol, atol), **timings.get(name, {})}
    counts: dict[str, int] = {}
    for nb in nbs.values():
        counts[nb["status"]] = counts.get(nb["status"], 0) + 1
    total = sum(nb.get("wall_time_s") or 0.0 for nb in nbs.values())
    return {"profile": profile, "rtol": rtol, "atol": atol, "run_results": str(run_base),
            "reference_results": str(ref_base), "counts": counts, "notebooks": nbs,
            "timing": {"notebooks_s": round(total, 1), "elapsed_s": round(elapsed_s, 1)}}
