"""Speed and peak memory of the contrastive losses: the decomposable loss vs our symmetric InfoNCE vs open_clip.

    .venv/bin/python benchmarks/bench_contrastive_losses.py                       # B = 256 1024 4096, d = 512
    .venv/bin/python benchmarks/bench_contrastive_losses.py --sizes 256 1024 --repeats 10

One step = forward + backward of the loss w.r.t. L2-normalized ``[B, d]`` image and text features (leaf tensors;
encoders excluded), logit scale 1/0.07. Implementations, all symmetric (image->text and text->image):

* ``open_clip``      -- ``open_clip.loss.ClipLoss`` (two matmuls, two cross-entropies)
* ``infonce``        -- our :func:`contrastive_repro.losses.infonce.clip_loss` own path (one matmul, two CE)
* ``conventional``   -- :func:`~contrastive_repro.losses.decomposable.conventional_contrastive_loss` (positive
  out of the denominator; the decomposable loss's biased counterpart)
* ``decomposable``   -- :class:`~contrastive_repro.losses.decomposable.DecomposableContrastiveLoss` (symmetric,
  running E-step, per-sample state of 100k samples, NaN guard on: one host sync per step)

Goals: decomposable <= 1.2x infonce per step, infonce <= 1.05x open_clip.

Times (ms) are medians and minima over interleaved repeats after warm-up (CUDA synchronized), with process CPU time
(on a shared CPU it measures the work rather than the wait for a core). Peak memory: on CUDA
``max_memory_allocated`` above the inputs; on CPU the peak resident-set growth of one step, measured in a fresh
subprocess per (loss, size) (coarse: allocator granularity, about +-1 MiB). Writes
``results/benchmarks/contrastive_losses.{json,csv}`` with provenance.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from contrastive_repro.io import atomic_write_json, atomic_write_text  # noqa: E402
from contrastive_repro.losses.decomposable import (DecomposableContrastiveLoss,  # noqa: E402
                                                    conventional_contrastive_loss)
from contrastive_repro.losses.infonce import clip_loss  # noqa: E402
from contrastive_repro.provenance import provenance  # noqa: E402

IMPLS = ("open_clip", "infonce", "conventional", "decomposable")
SCALE = 1.0 / 0.07
NUM_SAMPLES = 100_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(impl: str, batch: int, dim: int, device: torch.device, seed: int = 0):
    """A closure running one forward + backward of ``impl`` on fixed normalized features."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_(True)
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=1).to(device).requires_grad_(True)
    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        loss_fn = ClipLoss()
        fwd = lambda: loss_fn(img, txt, SCALE)  # noqa: E731
    elif impl == "infonce":
        fwd = lambda: clip_loss(img, txt, SCALE, normalize=False, use_open_clip=False)  # noqa: E731
    elif impl == "conventional":
        fwd = lambda: conventional_contrastive_loss(img, txt, 1 / SCALE, symmetric=True, normalize=False)  # noqa
    elif impl == "decomposable":
        crit = DecomposableContrastiveLoss(NUM_SAMPLES, tau=1 / SCALE, symmetric=True, normalize=False).to(device)
        idx = torch.randperm(NUM_SAMPLES, generator=g)[:batch].to(device)
        fwd = lambda: crit(img, txt, idx)  # noqa: E731
    else:
        raise ValueError(impl)

    def step():
        img.grad = txt.grad = None
        loss = fwd()
        loss.backward()
        return loss.detach()

    return step


def time_interleaved(steps: dict, device, repeats: int, warmup: int = 2):
    """Time the steps in turn, repetition by repetition (order reversed every other repetition) so that load from
    other processes is spread over all of them. Returns wall and process-CPU milliseconds per step."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    _sync(device)
    names = list(steps)
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            _sync(device)
            wall[name].append(1e3 * (time.perf_counter() - t0))
            cpu[name].append(1e3 * (time.process_time() - c0))
    return wall, cpu


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """Peak resident set (VmHWM) since the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so import-time peaks do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_probe(impl: str, batch: int, dim: int) -> None:
    """(subprocess) Peak RSS growth of one step above the set-up state, printed as JSON."""
    torch.set_num_threads(1)
    make_step(impl, 8, dim, torch.device("cpu"))()                 # one-time initializations, small peak
    step = make_step(impl, batch, dim, torch.device("cpu"))
    exact = _reset_hwm()
    base = _rss_bytes()
    step()
    print(json.dumps({"peak_bytes": max(0, _hwm_bytes() - base), "hwm_reset": exact}))


def cpu_peak_memory(impl: str, batch: int, dim: int) -> float | None:
    cmd = [sys.executable, __file__, "--_probe", impl, str(batch), str(dim)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])["peak_bytes"] / 2**20
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:  # pragma: no cover - diagnostics only
        print(f"  memory probe failed for {impl} B={batch}: {exc}", file=sys.stderr)
        return None


def cuda_peak_memory(impl: str, batch: int, dim: int, device) -> float:
    step = make_step(impl, batch, dim, device)
    step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=None, help="default: 20 (B<=1024), 6 (larger)")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU memory probes (subprocesses)")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "contrastive_losses"))
    ap.add_argument("--_probe", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._probe:
        _memory_probe(args._probe[0], int(args._probe[1]), int(args._probe[2]))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rows = []
    load_before = os.getloadavg()
    for dev_name in devices:
        device = torch.device(dev_name)
        for batch in args.sizes:
            repeats = args.repeats or (20 if batch <= 1024 else 6)
            steps = {impl: make_step(impl, batch, args.dim, device) for impl in IMPLS}
            losses = {impl: fn().item() for impl, fn in steps.items()}
            wall, cpu = time_interleaved(steps, device, repeats)
            for impl in IMPLS:
                if device.type == "cuda":
                    mem = cuda_peak_memory(impl, batch, args.dim, device)
                else:
                    mem = None if args.no_memory else cpu_peak_memory(impl, batch, args.dim)
                rows.append({"device": dev_name, "batch": batch, "dim": args.dim, "impl": impl,
                             "median_ms": statistics.median(wall[impl]), "min_ms": min(wall[impl]),
                             "cpu_median_ms": statistics.median(cpu[impl]), "cpu_min_ms": min(cpu[impl]),
                             "repeats": repeats, "peak_mem_mib": mem, "loss_value": losses[impl]})
            ref = {r["impl"]: r for r in rows if r["device"] == dev_name and r["batch"] == batch}
            for r in ref.values():
                r["x_infonce_min"] = r["min_ms"] / ref["infonce"]["min_ms"]
                r["x_open_clip_min"] = r["min_ms"] / ref["open_clip"]["min_ms"]
                r["x_infonce_median"] = r["median_ms"] / ref["infonce"]["median_ms"]
                r["x_open_clip_median"] = r["median_ms"] / ref["open_clip"]["median_ms"]
            for impl in IMPLS:
                r = ref[impl]
                mem = "n/a" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.1f} MiB"
                print(f"{dev_name:4s} B={batch:5d} {impl:13s} median {r['median_ms']:9.2f} ms  min {r['min_ms']:9.2f} ms"
                      f"  x infonce {r['x_infonce_min']:.3f}  x open_clip {r['x_open_clip_min']:.3f}  peak {mem}",
                      flush=True)
    load_after = os.getloadavg()
    goals = {}
    for r in rows:
        key = f"{r['device']}/B={r['batch']}"
        if r["impl"] == "decomposable":
            goals.setdefault(key, {})["decomposable_over_infonce_min"] = r["x_infonce_min"]
            goals[key]["decomposable_over_infonce_median"] = r["x_infonce_median"]
        if r["impl"] == "infonce":
            goals.setdefault(key, {})["infonce_over_open_clip_min"] = r["x_open_clip_min"]
            goals[key]["infonce_over_open_clip_median"] = r["x_open_clip_median"]
    result = {"benchmark": "contrastive_losses", "provenance": provenance(ROOT),
              "settings": {"sizes": args.sizes, "dim": args.dim, "logit_scale": SCALE, "threads":
                           torch.get_num_threads(), "decomposable_num_samples": NUM_SAMPLES,
                           "load_average_before": load_before, "load_average_after": load_after},
              "goals": {"decomposable_over_infonce": 1.2, "infonce_over_open_clip": 1.05}, "ratios": goals,
              "rows": rows}
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
