"""Build the README results table from ``results/*/*/metrics.json``: ``python -m reproduce.table --write-readme``.

Every row comes from a notebook's ``summary`` (our number, its spread and seed count) and, where the row names a
``paper_key``, the paper's number from ``configs/paper_numbers.yaml``. Rows say which profile and commit made them.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

from contrastive_repro.io import atomic_write_text

from .papers import paper_value
from .paths import repo_root

START, END = "<!-- results:start -->", "<!-- results:end -->"
PROFILE_ORDER = {"paper": 0, "cpu": 1, "smoke": 2}


def _fmt(x, std=None) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        s = f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"
        if std is not None:
            s += f" ± {std:.2g}"
        return s
    return str(x)


def collect(results: Path, profiles=("paper", "cpu")) -> list[dict]:
    """One row per summary entry, from the best available profile of each notebook (paper > cpu)."""
    rows = []
    for nb_dir in sorted(p for p in results.iterdir() if p.is_dir() and re.match(r"\d\d_", p.name)):
        for profile in sorted(profiles, key=PROFILE_ORDER.get):
            path = nb_dir / profile / "metrics.json"
            if not path.is_file():
                continue
            rec = json.loads(path.read_text())
            if rec.get("status") != "complete":
                continue
            commit = rec.get("provenance", {}).get("commit", "unknown")[:12]
            for r in rec.get("summary", []):
                rows.append({
                    "notebook": rec["notebook"], "experiment": r["experiment"], "metric": r["metric"],
                    "ours": _fmt(r["value"], r.get("std")), "n": r.get("n", len(rec.get("seeds", []))),
                    "paper": _fmt(paper_value(r.get("paper_key"))), "note": r.get("note", ""),
                    "profile": profile, "seeds": ",".join(map(str, rec.get("seeds", []))), "commit": commit,
                })
            break
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return "_No results yet: run `make reproduce`._\n"
    head = "| notebook | experiment | metric | ours | n | paper | note | profile | seeds | commit |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['notebook']} | {r['experiment']} | {r['metric']} | {r['ours']} | {r['n']} | {r['paper']} | "
        f"{r['note']} | {r['profile']} | {r['seeds']} | `{r['commit']}` |\n" for r in rows)
    return head + body


def replace_section(readme: Path, start: str, end: str, body: str) -> None:
    """Replace what stands between the markers ``start`` and ``end`` in ``readme`` with ``body`` (atomically)."""
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} lacks the markers {start} ... {end}")
    pre, rest = text.split(start, 1)
    _, post = rest.split(end, 1)
    atomic_write_text(readme, pre + start + "\n" + body + end + post)


def write_readme(readme: Path, table: str) -> None:
    replace_section(readme, START, END, table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--profiles", nargs="*", default=["paper", "cpu"])
    args = ap.parse_args(argv)
    root = repo_root()
    rows = collect(root / "results", tuple(args.profiles))
    table = markdown(rows)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(root / "results" / "summary.csv", buf.getvalue())
    if args.write_readme:
        write_readme(root / "README.md", table)
        print(f"README.md results table: {len(rows)} rows")
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
