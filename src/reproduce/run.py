"""Run every notebook of a profile through papermill: ``python -m reproduce.run --profile cpu``.

* parameters: ``configs/<profile>/<notebook>.yaml`` (smoke = the notebooks' own defaults), checked against each
  notebook's parameters cell before anything runs; ``profile`` is injected;
* reproduce means recompute: the run goes to a local, git-ignored folder (``build/reproduce/<profile>/results/``,
  ``--out``), never reusing the committed ``results/``, which are the reference. A notebook already complete in
  that folder for the same parameters and code/data fingerprint is reused, so an interrupted run resumes;
  ``--force`` wipes a notebook's local folder first;
* it ends with a comparison per notebook, summary row and claim with the committed ``results/`` (tolerance
  ``--rtol``/``--atol``), and the wall time of each notebook and the total, printed and written to
  ``<run folder>/comparison.json``;
* ``--record`` copies each finished notebook's folder into ``results/<notebook>/<profile>/`` (the committed
  reference) and refuses a tree with uncommitted code changes unless ``--allow-dirty`` (then recorded as dirty);
* kernel ``python3``, a per-cell timeout, outputs capped so a runaway cell cannot write megabytes; the executed
  notebook goes to ``<results>/<notebook>/<profile>/executed.ipynb`` atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from contrastive_repro.io import atomic_write_json, atomic_write_text
from contrastive_repro.provenance import git_commit, git_dirty_paths

from . import PROFILES
from .compare import DEFAULT_ATOL, DEFAULT_RTOL, build_report, format_report
from .notebook import mark_status, run_fingerprint
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


def is_complete(out_dir: Path, params: dict, fingerprint: dict, commit: str | None = None) -> bool:
    """True when ``out_dir`` holds a finished run of the notebook (metrics.json ``complete``, executed notebook)
    made with exactly these parameters and this code/data fingerprint (and at ``commit`` when given)."""
    try:
        rec = json.loads((out_dir / "metrics.json").read_text())
        ran = json.loads((out_dir / "runner.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (rec.get("status") == "complete" and (out_dir / "executed.ipynb").is_file()
            and ran.get("parameters") == json.loads(json.dumps(params))
            and ran.get("fingerprint") == fingerprint and (commit is None or ran.get("commit") == commit))


def _parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="cpu", choices=PROFILES)
    ap.add_argument("--only", nargs="*", help="notebook stems (or prefixes like 01) to run")
    ap.add_argument("--force", action="store_true", help="discard this run's local cache and recompute")
    ap.add_argument("--cell-timeout", type=int, default=None, help="seconds per cell (default by profile)")
    ap.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    ap.add_argument("--out", default=None, help="local run folder (default build/reproduce/<profile>, or "
                                                "build/record/<profile> with --record)")
    ap.add_argument("--record", action="store_true", help="copy each finished notebook's results into "
                                                           "results/<notebook>/<profile>/ (the committed reference)")
    ap.add_argument("--allow-dirty", action="store_true", help="with --record: allow uncommitted code changes "
                                                                "(recorded as dirty in the provenance)")
    ap.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="relative tolerance of the comparison")
    ap.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="absolute tolerance of the comparison")
    return ap.parse_args(argv)


def _plan(args, root: Path) -> list[tuple[Path, dict]]:
    """The notebooks to run with their validated parameters (ParameterError before anything runs)."""
    notebooks = sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = [p for p in notebooks if any(p.stem == o or p.stem.startswith(o) for o in args.only)]
        if not notebooks:
            raise ParameterError(f"no notebook matches {args.only}")
    overrides = load_profile(args.profile, root / "configs")
    unknown = set(overrides) - {p.stem for p in sorted((root / "notebooks").glob("*.ipynb"))}
    if unknown:
        raise ParameterError(f"configs/{args.profile}/ has files for unknown notebooks: {', '.join(sorted(unknown))}")
    return [(p, validate(p, overrides.get(p.stem, {}))) for p in notebooks]


def check_clean_tree(root: Path, allow_dirty: bool) -> tuple[bool, list[str]]:
    """``(dirty, paths)`` for recording; raise ParameterError when dirty and not ``allow_dirty``."""
    paths = git_dirty_paths(root)
    if paths is None:
        raise ParameterError(f"{root} is not a git checkout: results can only be recorded at a commit")
    if paths and not allow_dirty:
        shown = ", ".join(paths[:10]) + (" ..." if len(paths) > 10 else "")
        raise ParameterError(f"refusing to record results from a dirty tree ({len(paths)} changed: {shown}); "
                             "commit first, or pass --allow-dirty (make record ALLOW_DIRTY=1) to record them "
                             "marked dirty")
    return bool(paths), paths


def record_into(src_dir: Path, dest_dir: Path) -> None:
    """Replace ``dest_dir`` (the committed reference) by ``src_dir`` without its checkpoints."""
    tmp = dest_dir.with_name(f".{dest_dir.name}.recording")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src_dir, tmp, ignore=shutil.ignore_patterns("checkpoints", ".executing.*", "failed.ipynb"))
    shutil.rmtree(dest_dir, ignore_errors=True)
    tmp.rename(dest_dir)


def _measure_machine() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu_count": os.cpu_count(), "loadavg_at_start": load}


def main(argv=None) -> int:
    args = _parse_args(argv)
    root = repo_root()
    cell_timeout = args.cell_timeout or {"smoke": 300, "cpu": 1800, "paper": 24 * 3600}[args.profile]
    try:
        plan = _plan(args, root)
        dirty = check_clean_tree(root, args.allow_dirty)[0] if args.record else None
    except (ParameterError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_base = Path(args.out) if args.out else root / "build" / ("record" if args.record else "reproduce") / \
        args.profile
    run_results = out_base / "results"
    os.environ["CONTRASTIVE_REPRO_RESULTS"] = str(run_results)  # results_dir() and the kernels write here
    commit = git_commit(root) if args.record else None
    machine = _measure_machine()
    print(f"reproduce: profile {args.profile}, {len(plan)} notebooks, run folder {run_results}"
          + (f", recording into {root / 'results'}" + (" (DIRTY tree)" if dirty else "") if args.record else ""),
          flush=True)

    # the reference: the committed results/; when recording, a snapshot of a notebook's results taken before it is
    # (re)computed and replaced, so the comparison is with what was there before
    reference = out_base / "previous" if args.record else root / "results"

    t_all = time.time()
    failures, timings = [], {}
    for i, (nb_path, params) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}] {nb_path.stem} ({args.profile})"
        out_dir = results_dir(nb_path.stem, args.profile)
        full = dict(params, profile=args.profile)
        fingerprint = run_fingerprint(nb_path.stem)
        if args.force:
            shutil.rmtree(out_dir, ignore_errors=True)
        if is_complete(out_dir, full, fingerprint, commit):
            ran = json.loads((out_dir / "runner.json").read_text())
            timings[nb_path.stem] = {"wall_time_s": ran.get("wall_time_s"), "resumed": True}
            print(f"{tag}: complete in {out_dir} for this code and these parameters, reused "
                  "(FORCE=1 to recompute)", flush=True)
        else:
            print(f"{tag}: running ...", flush=True)
            if args.record:
                snapshot_reference(root / "results", reference, nb_path.stem, args.profile)
            t0 = time.time()
            try:
                execute_and_store(nb_path, args.profile, params, cell_timeout,
                                  extra={"fingerprint": fingerprint, "commit": git_commit(root), "dirty": dirty})
            except KeyboardInterrupt:
                print(f"{tag}: interrupted after {time.time() - t0:.0f} s; re-run to resume", flush=True)
                return 130
            except Exception as e:  # papermill raises PapermillExecutionError with the failing cell
                msg = str(e).strip().splitlines()
                print(f"{tag}: FAILED after {time.time() - t0:.0f} s: {' | '.join(msg[-6:])}", flush=True)
                print(f"    partial notebook: {out_dir / 'failed.ipynb'}", flush=True)
                failures.append(nb_path.stem)
                timings[nb_path.stem] = {"wall_time_s": round(time.time() - t0, 1), "resumed": False}
                if not args.keep_going:
                    break
                continue
            timings[nb_path.stem] = {"wall_time_s": round(time.time() - t0, 1), "resumed": False}
            print(f"{tag}: done in {time.time() - t0:.0f} s (total {time.time() - t_all:.0f} s)", flush=True)
        if args.record:
            record_into(out_dir, results_dir(nb_path.stem, args.profile, base=root / "results"))

    report = build_report(args.profile, [p.stem for p, _ in plan], run_results, reference, timings,
                          time.time() - t_all, rtol=args.rtol, atol=args.atol)
    report.update(machine=machine, commit=git_commit(root), recorded=bool(args.record), failures=failures)
    print(format_report(report), flush=True)
    atomic_write_json(out_base / "comparison.json", report)
    print(f"comparison written to {out_base / 'comparison.json'}", flush=True)
    if args.record and not failures and not args.only:
        atomic_write_json(root / "results" / f"timings_{args.profile}.json",
                          {"profile": args.profile, "commit": report["commit"], "machine": machine,
                           "notebooks": timings, "total_notebook_s": report["timing"]["notebooks_s"]})
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


def snapshot_reference(results: Path, snapshot: Path, notebook: str, profile: str) -> None:
    """Copy ``results/<notebook>/<profile>/metrics.json`` (the reference about to be replaced) to the same place
    under ``snapshot``; with no reference, remove a stale snapshot."""
    src = results / notebook / profile / "metrics.json"
    dest = snapshot / notebook / profile / "metrics.json"
    dest.unlink(missing_ok=True)
    if src.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)


def _remove_temp_files(out_dir: Path) -> None:
    for tmp in out_dir.glob(".executing.*"):
        tmp.unlink(missing_ok=True)


def _save_executed(tmp: str, dest: Path) -> None:
    """Cap the outputs of the notebook papermill wrote to ``tmp`` and move it to ``dest`` (if it was written)."""
    import nbformat

    try:
        nb = nbformat.read(tmp, as_version=4)
    except Exception:  # nothing was written (kernel died before the first save)
        return
    cap_outputs(nb)
    atomic_write_text(dest, nbformat.writes(nb))


def execute_and_store(nb_path: Path, profile: str, params: dict, cell_timeout: int,
                      extra: dict | None = None) -> Path:
    """Execute into a temp file, cap outputs, then move the executed notebook into place atomically.

    metrics.json says ``running`` while the notebook runs and ``failed`` (with the error) if it fails, so a
    previous ``complete`` record never survives a new run; temporary ``.executing.*`` files are removed on every
    exit path (also on KeyboardInterrupt). ``runner.json`` (parameters, fingerprint, commit, wall time: ``extra``)
    is written only after success.
    """
    import papermill as pm

    out_dir = results_dir(nb_path.stem, profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_temp_files(out_dir)  # left by a runner that was killed
    for stale in ("failed.ipynb", "runner.json"):
        (out_dir / stale).unlink(missing_ok=True)
    mark_status(out_dir, "running", notebook=nb_path.stem, profile=profile)
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
    except BaseException as e:
        mark_status(out_dir, "failed", notebook=nb_path.stem, profile=profile,
                    error=f"{type(e).__name__}: {str(e).strip()[-2000:]}")
        raise
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
        try:
            _save_executed(tmp, out_dir / ("executed.ipynb" if ok else "failed.ipynb"))
        finally:
            Path(tmp).unlink(missing_ok=True)
    try:
        status = json.loads((out_dir / "metrics.json").read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        status = None
    if status != "complete":
        mark_status(out_dir, "failed", notebook=nb_path.stem, profile=profile,
                    error="the notebook finished without calling run.finish")
        raise RuntimeError(f"{nb_path.name} finished without writing a complete {out_dir / 'metrics.json'}")
    atomic_write_json(out_dir / "runner.json", {"parameters": dict(params, profile=profile),
                                                 "cell_timeout_s": cell_timeout,
                                                 "wall_time_s": round(time.time() - t_start, 1), **(extra or {})})
    return out_dir / "executed.ipynb"


if __name__ == "__main__":
    sys.exit(main())
