"""Run every notebook of a profile through papermill: ``python -m reproduce.run --profile cpu``.

* parameters: ``configs/<profile>.yaml`` (smoke = the notebooks' own defaults), checked against each notebook's
  parameters cell before anything runs; ``profile`` is injected;
* kernel ``python3``, a per-cell timeout, outputs capped so a runaway cell cannot write megabytes;
* the executed notebook goes to ``results/<notebook>/<profile>/executed.ipynb`` atomically;
* a notebook whose ``metrics.json`` says ``complete`` for these parameters is skipped unless ``--force``, so an
  interrupted ``make reproduce`` resumes (notebooks also cache their sub-runs, see ``Run.cached``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from contrastive_repro.io import atomic_write_json, atomic_write_text

from . import PROFILES
from .params import ParameterError, load_profile, validate
from .paths import repo_root, results_dir

MAX_TEXT_CHARS = 20_000  # per output stream / text result
MAX_IMAGE_BYTES = 3_000_000


def cap_outputs(nb) -> int:
    """Truncate long text outputs and drop huge images in place; return how many outputs were cut."""
    cut = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text = out.get("text", "")
                if len(text) > MAX_TEXT_CHARS:
                    out["text"] = text[:MAX_TEXT_CHARS // 2] + "\n... [output truncated by reproduce.run] ...\n" + \
                        text[-MAX_TEXT_CHARS // 2:]
                    cut += 1
            for key, value in list(out.get("data", {}).items()):
                if key.startswith("text/") and isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
                    out["data"][key] = value[:MAX_TEXT_CHARS] + "\n... [truncated]"
                    cut += 1
                elif key.startswith("image/") and isinstance(value, str) and len(value) > MAX_IMAGE_BYTES:
                    out["data"][key] = ""
                    cut += 1
    return cut


def is_complete(nb_name: str, profile: str, params: dict) -> bool:
    """True when the notebook finished (metrics.json complete) with exactly these injected parameters."""
    out = results_dir(nb_name, profile)
    try:
        rec = json.loads((out / "metrics.json").read_text())
        ran = json.loads((out / "runner.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (rec.get("status") == "complete" and (out / "executed.ipynb").is_file()
            and ran.get("parameters") == json.loads(json.dumps(params)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="cpu", choices=PROFILES)
    ap.add_argument("--only", nargs="*", help="notebook stems (or prefixes like 01) to run")
    ap.add_argument("--force", action="store_true", help="re-run notebooks that already completed")
    ap.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell (default by profile)")
    ap.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    args = ap.parse_args(argv)

    root = repo_root()
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [p for p in notebooks if any(p.stem == o or p.stem.startswith(o) for o in args.only)]
        if not notebooks:
            print(f"no notebook matches {args.only}", file=sys.stderr)
            return 2
    cell_timeout = args.cell_timeout or {"smoke": 300, "cpu": 1800, "paper": 24 * 3600}[args.profile]
    try:
        overrides = load_profile(args.profile, root / "configs")
        plan = [(p, validate(p, overrides.get(p.stem, {}))) for p in notebooks]
        unknown = set(overrides) - {p.stem for p in sorted((root / "notebooks").glob("*.ipynb"))}
        if unknown:
            raise ParameterError(f"configs/{args.profile}/ has files for unknown notebooks: {', '.join(sorted(unknown))}")
    except (ParameterError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    t_all = time.time()
    failures = []
    for i, (nb_path, params) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}] {nb_path.stem} ({args.profile})"
        if not args.force and is_complete(nb_path.stem, args.profile, dict(params, profile=args.profile)):
            print(f"{tag}: complete, skipped (FORCE=1 to re-run)", flush=True)
            continue
        print(f"{tag}: running ...", flush=True)
        t0 = time.time()
        try:
            execute_and_store(nb_path, args.profile, params, cell_timeout)
        except KeyboardInterrupt:
            print(f"{tag}: interrupted after {time.time() - t0:.0f} s; re-run to resume", flush=True)
            return 130
        except Exception as e:  # papermill raises PapermillExecutionError with the failing cell
            msg = str(e).strip().splitlines()
            print(f"{tag}: FAILED after {time.time() - t0:.0f} s: {' | '.join(msg[-6:])}", flush=True)
            print(f"    partial notebook: {results_dir(nb_path.stem, args.profile) / 'failed.ipynb'}", flush=True)
            failures.append(nb_path.stem)
            if not args.keep_going:
                break
            continue
        print(f"{tag}: done in {time.time() - t0:.0f} s (total {time.time() - t_all:.0f} s)", flush=True)
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def execute_and_store(nb_path: Path, profile: str, params: dict, cell_timeout: int) -> Path:
    """Execute into a temp file, cap outputs, then move the executed notebook into place atomically."""
    import nbformat
    import papermill as pm

    out_dir = results_dir(nb_path.stem, profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "failed.ipynb").unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".executing.", suffix=".ipynb")
    os.close(fd)
    env_backup = dict(os.environ)
    os.environ.update({"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "CONTRASTIVE_REPRO_ROOT": str(repo_root())})
    ok, t_start = False, time.time()
    try:
        pm.execute_notebook(str(nb_path), tmp, parameters=dict(params, profile=profile), kernel_name="python3",
                            cwd=str(nb_path.parent), execution_timeout=cell_timeout, progress_bar=False,
                            log_output=False)
        ok = True
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
        try:
            nb = nbformat.read(tmp, as_version=4)
            cap_outputs(nb)
            atomic_write_text(out_dir / ("executed.ipynb" if ok else "failed.ipynb"), nbformat.writes(nb))
        except Exception:  # nothing was written (kernel died before the first save)
            pass
        Path(tmp).unlink(missing_ok=True)
    metrics = out_dir / "metrics.json"
    if not metrics.is_file() or metrics.stat().st_mtime < t_start:
        raise RuntimeError(f"{nb_path.name} finished without writing {out_dir / 'metrics.json'}")
    atomic_write_json(out_dir / "runner.json", {"parameters": dict(params, profile=profile),
                                                 "cell_timeout_s": cell_timeout})
    return out_dir / "executed.ipynb"


if __name__ == "__main__":
    sys.exit(main())
