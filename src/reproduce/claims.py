"""The claims ledger: one row per paper claim, from the ``claims`` the notebooks wrote into their metrics.json.

A notebook builds each row with :func:`claim_row` from a :class:`contrastive_repro.stats.PairedVerdict` and the
:class:`contrastive_repro.stats.GateResult` of its models, and passes the rows to ``Run.finish(claims=...)``.
``python -m reproduce.claims --write-readme`` (run by ``make table`` / ``make reproduce``) merges them into
``results/claims.json`` and the README section "Does each claim hold?" (between ``<!-- claims:start -->`` and
``<!-- claims:end -->``), taking each notebook from its best profile (paper > cpu).

The paper's own number is printed beside ours only when the row says ``comparable=True`` (both measure the same
thing); otherwise the row shows the paper's claim in words.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

from contrastive_repro.io import atomic_write_json
from contrastive_repro.stats import VERDICTS, GateResult, PairedVerdict

from .papers import paper_value
from .table import replace_section
from .paths import repo_root

START, END = "<!-- claims:start -->", "<!-- claims:end -->"
PAPERS = {"dcl": "NeurIPS 2022 decomposable contrastive loss", "lms": "CVPR 2023 latent modality structures",
          "tcm": "ICLR 2024 threshold-consistent margin loss"}
CLAIM_KEYS = ("id", "paper", "claim", "test", "metric", "effect", "ci_low", "ci_high", "n", "p_value", "mde",
              "margin", "verdict", "test_verdict", "gate_passed", "gate", "paper_value", "comparable", "note")
_ID = re.compile(r"^[a-z0-9_.\-]+$")


def claim_row(id: str, paper: str, claim: str, test: str, metric: str, verdict: PairedVerdict,
              gates: Sequence[GateResult] = (), paper_key: str | None = None, comparable: bool = False,
              note: str = "") -> dict:
    """One ledger row. ``gates``: the gate results of the models compared (any failure: ``uninformative``).

    ``paper`` is one of ``PAPERS`` (``dcl``, ``lms``, ``tcm``); ``id`` is unique across the project, lower-case
    with dots (``tcm.opis.emoji_sub.final.arcface``); ``metric`` says what ``effect`` measures (arm b minus arm a).
    """
    if not _ID.match(id):
        raise ValueError(f"claim id must be lower-case letters, digits, '.', '_' or '-', got {id!r}")
    if paper not in PAPERS:
        raise ValueError(f"claim {id}: paper must be one of {sorted(PAPERS)}, got {paper!r}")
    if not isinstance(verdict, PairedVerdict):
        raise TypeError(f"claim {id}: verdict must be a PairedVerdict, got {type(verdict).__name__}")
    gate_ok = all(g.passed for g in gates) if gates else None
    value = paper_value(paper_key) if paper_key else None
    return {
        "id": id, "paper": paper, "claim": claim, "test": test, "metric": metric,
        "effect": verdict.effect, "ci_low": verdict.ci_low, "ci_high": verdict.ci_high, "n": verdict.n,
        "p_value": verdict.p_value, "mde": verdict.mde, "margin": verdict.margin,
        "verdict": "uninformative" if gate_ok is False else verdict.verdict, "test_verdict": verdict.verdict,
        "gate_passed": gate_ok, "gate": "; ".join(str(g) for g in gates),
        "paper_value": value if comparable else None, "comparable": bool(comparable), "note": note,
    }


def check_claims(claims: Iterable[dict]) -> list[dict]:
    """Validate rows before they are written: known keys, a known verdict, unique ids."""
    out, seen = [], set()
    for i, c in enumerate(claims):
        missing = {"id", "paper", "claim", "verdict", "effect", "ci_low", "ci_high", "n"} - set(c)
        if missing:
            raise ValueError(f"claims[{i}] lacks {sorted(missing)}; build rows with reproduce.claims.claim_row")
        if c["verdict"] not in VERDICTS:
            raise ValueError(f"claims[{i}] ({c['id']}): verdict {c['verdict']!r} is not one of {VERDICTS}")
        if c["id"] in seen:
            raise ValueError(f"claims[{i}]: duplicate claim id {c['id']!r}")
        seen.add(c["id"])
        out.append(c)
    return out


def collect(results: Path, profiles: Sequence[str] = ("paper", "cpu")) -> list[dict]:
    """Rows from every notebook's best complete profile, with notebook, profile, seeds and commit added."""
    order = {"paper": 0, "cpu": 1, "smoke": 2}
    rows = []
    for nb_dir in sorted(p for p in results.iterdir() if p.is_dir() and re.match(r"\d\d_", p.name)):
        for profile in sorted(profiles, key=lambda p: order.get(p, 9)):
            path = nb_dir / profile / "metrics.json"
            if not path.is_file():
                continue
            rec = json.loads(path.read_text())
            if rec.get("status") != "complete":
                continue
            for c in rec.get("claims", []):
                rows.append(dict(c, notebook=rec["notebook"], profile=profile,
                                 seeds=",".join(map(str, rec.get("seeds", []))),
                                 commit=rec.get("provenance", {}).get("commit", "unknown")[:12]))
            break
    return rows


def _num(x) -> str:
    return "" if x is None else f"{x:+.3g}"


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "_No claims yet: run `make reproduce`._\n"
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    head = ("**" + ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v]) + f"** of {len(rows)} claims.\n\n"
            "| paper | claim | our test | effect [95% CI] | n | verdict | gate | paper's number | profile | commit |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        effect = f"{r['metric']}: {_num(r['effect'])} [{_num(r['ci_low'])}, {_num(r['ci_high'])}]" \
            if r.get("metric") else f"{_num(r['effect'])} [{_num(r['ci_low'])}, {_num(r['ci_high'])}]"
        verdict = f"**{r['verdict']}**"
        if r["verdict"] == "inconclusive" and r.get("mde") is not None:
            verdict += f" (detectable: ±{r['mde']:.2g})"
        gate = {True: "passed", False: "failed", None: "none"}[r.get("gate_passed")]
        paper = "" if r.get("paper_value") is None else str(r["paper_value"])
        cells = [r["paper"], r["claim"], r.get("test", ""), effect, str(r["n"]), verdict, gate, paper,
                 r["profile"], f"`{r['commit']}`"]
        body.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |\n")
    return head + "".join(body)


def write_readme(readme: Path, text: str) -> None:
    replace_section(readme, START, END, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--profiles", nargs="*", default=["paper", "cpu"])
    args = ap.parse_args(argv)
    root = repo_root()
    rows = collect(root / "results", tuple(args.profiles))
    atomic_write_json(root / "results" / "claims.json", rows)
    text = markdown(rows)
    if args.write_readme:
        write_readme(root / "README.md", text)
        print(f"README.md claims ledger: {len(rows)} claims")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
