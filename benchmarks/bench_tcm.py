"""TCM speed: our masked-matrix TCMLoss vs pytorch-metric-learning's ThresholdConsistentMarginLoss, and TCM's added
cost on a full training step (torchvision ResNet-18 on 32x32 inputs, Smooth-AP / MultiSimilarity base losses).

    .venv/bin/python benchmarks/bench_tcm.py            # CPU, and CUDA too when available
    .venv/bin/python benchmarks/bench_tcm.py --quick    # fewer repeats

Writes ``results/benchmarks/tcm.json`` (with provenance) and ``results/benchmarks/tcm.csv``.
Times (milliseconds) are medians and minima over repeats after warm-up; CUDA timings are synchronized. The load
average before/after is recorded: on a shared machine trust the minima and the TCM-alone share of a step.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from contrastive_repro.io import atomic_write_json, atomic_write_text  # noqa: E402
from contrastive_repro.losses.dml import build_dml_loss  # noqa: E402
from contrastive_repro.losses.tcm import TCMLoss  # noqa: E402
from contrastive_repro.provenance import provenance  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device, repeats: int, warmup: int = 2, inner: int = 1) -> dict:
    """Time several callables in turn, repetition by repetition (order reversed every other repetition), so that
    load from other processes on a shared machine is spread over all of them. Each sample is the fastest of
    ``inner`` back-to-back calls. Returns ``{name: list of wall ms}, {name: list of process-CPU ms}``: on a
    shared CPU with one torch thread, process CPU time measures the work itself, not the wait for a core."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    names = list(fns)
    times = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for rep in range(repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            best, best_cpu = float("inf"), float("inf")
            for _ in range(inner):
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name]()
                _sync(device)
                best = min(best, 1e3 * (time.perf_counter() - t0))
                best_cpu = min(best_cpu, 1e3 * (time.process_time() - c0))
            times[name].append(best)
            cpu[name].append(best_cpu)
    return times, cpu


def _summary(samples: list, cpu_samples: list) -> dict:
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "repeats": len(samples),
            "cpu_median_ms": statistics.median(cpu_samples), "cpu_min_ms": min(cpu_samples)}


def bench_tcm_loss(device, batch, dim, repeats, per_class=4):
    """Forward + backward of TCM alone: ours vs PML, same data (class-balanced labels, per_class per class)."""
    from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss

    g = torch.Generator().manual_seed(batch)
    emb = torch.randn(batch, dim, generator=g).to(device)
    labels = (torch.arange(batch) // per_class).to(device)
    impls = {"ours": TCMLoss(), "pml": ThresholdConsistentMarginLoss()}
    values, fns = {}, {}
    for impl, loss in impls.items():
        x = emb.clone().requires_grad_(True)

        def step(loss=loss, x=x):
            x.grad = None
            loss(x, labels).backward()

        with torch.no_grad():
            values[impl] = float(loss(x, labels))
        fns[impl] = step
    times, cpu = time_interleaved(fns, device, repeats, warmup=1 if repeats <= 5 else 2)
    diff = abs(values["ours"] - values["pml"])
    rows = [{"benchmark": "tcm_fwd_bwd", "device": device.type, "batch": batch, "dim": dim, "impl": impl,
             **_summary(times[impl], cpu[impl]), "abs_value_diff_ours_vs_pml": diff} for impl in impls]
    for row in rows:
        row["pml_over_ours_min"] = rows[1]["min_ms"] / rows[0]["min_ms"]
        row["pml_over_ours_cpu_min"] = rows[1]["cpu_min_ms"] / max(rows[0]["cpu_min_ms"], 1e-9)
    return rows


def _resnet18(embedding_size: int):
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=embedding_size)


def bench_train_step(device, base, batch, repeats, embedding_size=128, per_class=4):
    """One SGD step (forward, loss, backward, update) of ResNet-18 on 32x32 inputs, without and with TCM.

    The two variants share the model and alternate step by step (with TCM's forward+backward alone on the step's
    embedding shape, fastest of 5, timed in the same rotation), so that load from other processes hits all three.
    Added cost is reported from the medians, from the minima, as the median of the per-repetition (with / without)
    ratios, and as TCM-alone (min) over the fastest step without TCM -- the low-noise estimate on a shared machine.
    """
    torch.manual_seed(0)
    model = _resnet18(embedding_size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = (torch.arange(batch) // per_class).to(device)
    losses = {"without_tcm": build_dml_loss(base, tcm=False, check_finite=False),
              "with_tcm": build_dml_loss(base, tcm=True, check_finite=False)}

    def step(loss):
        opt.zero_grad(set_to_none=True)
        loss(model(images), labels).backward()
        opt.step()

    emb = torch.randn(batch, embedding_size, device=device, requires_grad=True)
    tcm = TCMLoss()

    def tcm_only():
        emb.grad = None
        tcm(emb, labels).backward()

    fns = {"without_tcm": lambda: step(losses["without_tcm"]), "with_tcm": lambda: step(losses["with_tcm"])}
    times, cpu = time_interleaved(fns, device, repeats, warmup=2)
    tcm_times, tcm_cpu = time_interleaved({"tcm": tcm_only}, device, 3, warmup=1, inner=5)
    tcm_times, tcm_cpu = tcm_times["tcm"], tcm_cpu["tcm"]
    # more TCM-alone samples between steps, so its minimum is not taken from a single busy moment
    for _ in range(max(3, repeats // 3)):
        fns["without_tcm"]()
        t, c = time_interleaved({"tcm": tcm_only}, device, 1, warmup=0, inner=5)
        tcm_times += t["tcm"]
        tcm_cpu += c["tcm"]

    def added(samples):
        med = {k: statistics.median(v) for k, v in samples.items()}
        mins = {k: min(v) for k, v in samples.items()}
        ratios = [w / wo for w, wo in zip(samples["with_tcm"], samples["without_tcm"])]
        return (100.0 * (med["with_tcm"] / med["without_tcm"] - 1.0),
                100.0 * (mins["with_tcm"] / mins["without_tcm"] - 1.0),
                100.0 * (statistics.median(ratios) - 1.0), mins["without_tcm"])

    wall_med, wall_min, wall_paired, wall_base = added(times)
    cpu_med, cpu_min, cpu_paired, cpu_base = added(cpu)
    common = {"tcm_added_pct_step_median": wall_med, "tcm_added_pct_step_min": wall_min,
              "tcm_added_pct_step_paired": wall_paired, "tcm_added_pct_step_cpu_median": cpu_med,
              "tcm_added_pct_step_cpu_min": cpu_min, "tcm_added_pct_step_cpu_paired": cpu_paired,
              "tcm_alone_min_ms": min(tcm_times), "tcm_alone_median_ms": statistics.median(tcm_times),
              "tcm_alone_cpu_min_ms": min(tcm_cpu),
              "tcm_alone_pct_of_step": 100.0 * min(tcm_times) / wall_base,
              "tcm_alone_cpu_pct_of_step": 100.0 * min(tcm_cpu) / cpu_base}
    return [{"benchmark": "train_step_resnet18_32px", "device": device.type, "batch": batch, "dim": embedding_size,
             "impl": f"{base}{'+tcm' if key == 'with_tcm' else ''}", **_summary(times[key], cpu[key]), **common}
            for key in losses]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 makes process-CPU times meaningful under load")
    ap.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "tcm"), help="path without extension")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rows = []
    load_before = os.getloadavg()
    for name in devices:
        device = torch.device(name)
        cpu = device.type == "cpu"
        for batch in (256, 1024):
            reps = (3 if args.quick else 5) if (cpu and batch == 1024) else (5 if args.quick else 20)
            rows += bench_tcm_loss(device, batch, 512, reps)
            print(rows[-2], rows[-1], sep="\n", flush=True)
        for base in ("smooth_ap", "multi_similarity"):
            reps = (5 if args.quick else 15) if cpu else (20 if args.quick else 50)
            rows += bench_train_step(device, base, 128, reps)
            print(rows[-2], rows[-1], sep="\n", flush=True)
    out = Path(args.out)
    atomic_write_json(out.with_suffix(".json"), {"benchmark": "tcm", "rows": rows, "provenance": provenance(ROOT),
                                                 "torch_threads": torch.get_num_threads(),
                                                 "cpu_count": os.cpu_count(),
                                                 "loadavg_1_5_15_before": load_before,
                                                 "loadavg_1_5_15_after": os.getloadavg()})
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("benchmark", "device", "batch", "dim",
                                                                          "impl"), k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
