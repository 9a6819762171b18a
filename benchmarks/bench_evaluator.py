"""Benchmark the one-pass streaming retrieval evaluator.

Times, on synthetic clustered embeddings (N samples, dimension d, ~``--class-size`` samples per class):

  (a) ``floor``        the bare chunked similarity matmul (same chunk size as the evaluator, reused output buffer):
                       the least any exact evaluator must spend;
  (b) ``streaming``    ``evaluate_retrieval``: Recall@{1,2,4,8}, MAP@R, OPIS and 10%-OPIS in one pass, end to end;
  (c) ``pml``          pytorch-metric-learning's AccuracyCalculator (precision_at_1, mean_average_precision_at_r,
                       batched cosine k-NN), for N <= ``--pml-max``;
      ``exact_opis``   the exact all-pairs OPIS + epsilon-OPIS (``contrastive_repro.metrics.opis``), for N <=
                       ``--exact-opis-max`` (it keeps every negative-pair distance: 8 bytes x N^2 / 2).

and reports each time (wall clock and process CPU time; the minimum over ``--repeats`` interleaved runs for the
floor and the evaluator), its ratio to the floor, and peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset
before each method); on CPU the peak resident set size (VmHWM from /proc, reset before each method through
/proc/self/clear_refs after handing freed heap back with ``malloc_trim``; where that is not possible, the
process-lifetime ``ru_maxrss``, flagged). ``extra`` is the peak minus the resident size just before the method (the
input embeddings are already resident).
Cross-checks (streaming vs PML vs exact) are written beside the timings.

    python benchmarks/bench_evaluator.py --sizes 10000 20000
    python benchmarks/bench_evaluator.py --sizes 10000 20000 50000 100000 --repeats 2   # the full study (long on CPU)

Writes ``results/benchmarks/evaluator.json`` and ``.csv`` atomically, with device and package versions.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from contrastive_repro.io import atomic_write_json, atomic_write_text  # noqa: E402
from contrastive_repro.metrics import evaluate_retrieval, epsilon_opis_from_utilities, opis  # noqa: E402
from contrastive_repro.provenance import provenance  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block of code: CUDA allocator peak, or CPU peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self.resettable = False
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.resettable = _status_kb("VmHWM") is not None
            except OSError:
                pass
            rss = _status_kb("VmRSS")
            self.before = (rss or 0) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.resettable:
            self.peak = _status_kb("VmHWM") * 1024
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.kind = "cpu_ru_maxrss_process_lifetime"
        self.extra = max(0, self.peak - self.before)
        return False


def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so that one method's leftovers do not hide the next one's peak."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------------------
def make_data(n: int, dim: int, class_size: int, noise: float, seed: int, device: torch.device):
    g = torch.Generator().manual_seed(seed)
    n_cls = max(2, n // class_size)
    lab = torch.randint(0, n_cls, (n,), generator=g)
    x = torch.randn(n_cls, dim, generator=g)[lab] + noise * torch.randn(n, dim, generator=g)
    return x.to(device), lab.to(device)


def default_chunk(n: int) -> int:
    return max(1, min(n, (1 << 24) // n))  # the evaluator's default


def floor_matmul(x: torch.Tensor, chunk: int) -> None:
    g = torch.nn.functional.normalize(x.float(), dim=1)
    buf = torch.empty(chunk, g.shape[0], dtype=g.dtype, device=g.device)
    for s in range(0, g.shape[0], chunk):
        e = min(s + chunk, g.shape[0])
        torch.mm(g[s:e], g.T, out=buf[:e - s])
    _sync(g.device)


def pml_scores(x: torch.Tensor, lab: torch.Tensor, chunk: int) -> dict:
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              knn_func=CustomKNN(CosineSimilarity(), batch_size=chunk), device=x.device)
    out = calc.get_accuracy(x, lab)
    _sync(x.device)
    return out


def exact_opis_scores(x: torch.Tensor, lab: torch.Tensor) -> dict:
    det = opis(x, lab, return_details=True)
    return {"OPIS": det["opis"], "eps_OPIS": epsilon_opis_from_utilities(det["utility"], 0.1)}


def timed(fn, device, *args, **kwargs):
    """(wall seconds, process CPU seconds, PeakMemory, result)."""
    with PeakMemory(device) as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn(*args, **kwargs)
        _sync(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return dt, dc, mem, out


# ---------------------------------------------------------------------------------------------------------------
def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, checks = [], []
    for n in args.sizes:
        x, lab = make_data(n, args.dim, args.class_size, args.noise, args.seed, device)
        chunk = args.chunk_size or default_chunk(n)
        best: dict[str, tuple] = {}
        cpu_best: dict[str, float] = {}
        for rep in range(args.repeats):  # interleaved, so that a busy machine slows both alike
            for name, fn, kw in [("floor", floor_matmul, dict(chunk=chunk)),
                                 ("streaming", evaluate_retrieval, dict(n_bins=args.n_bins, chunk_size=chunk))]:
                res = timed(fn, device, x, lab, **kw) if name == "streaming" else timed(fn, device, x, **kw)
                print(f"N={n:>7} {name:<10} rep {rep}: {res[0]:8.2f} s wall {res[1]:8.2f} s cpu", flush=True)
                if name not in best or res[0] < best[name][0]:
                    best[name] = res
                cpu_best[name] = min(cpu_best.get(name, math.inf), res[1])
        if n <= args.pml_max:
            best["pml"] = timed(pml_scores, device, x, lab, chunk)
            print(f"N={n:>7} pml       : {best['pml'][0]:8.2f} s", flush=True)
        if n <= args.exact_opis_max:
            best["exact_opis"] = timed(exact_opis_scores, device, x, lab)
            print(f"N={n:>7} exact_opis: {best['exact_opis'][0]:8.2f} s", flush=True)
        floor_t, floor_c = best["floor"][0], cpu_best["floor"]
        for name, (dt, dc, mem, out) in best.items():
            dc = cpu_best.get(name, dc)
            row = {"n": n, "dim": args.dim, "n_classes": int(torch.unique(lab).numel()), "method": name,
                   "seconds": round(dt, 4), "ratio_to_floor": round(dt / floor_t, 4),
                   "cpu_seconds": round(dc, 4), "cpu_ratio_to_floor": round(dc / floor_c, 4), "chunk_size": chunk,
                   "peak_memory_bytes": int(mem.peak), "extra_peak_memory_bytes": int(mem.extra),
                   "memory_kind": mem.kind, "device": str(device)}
            if name == "streaming":
                row.update({k: out[k] for k in ("R@1", "MAP@R", "OPIS", "eps_OPIS", "opis_error_bound")})
            elif name == "pml":
                row.update({"R@1": out["precision_at_1"], "MAP@R": out["mean_average_precision_at_r"]})
            elif name == "exact_opis":
                row.update(out)
            rows.append(row)
        st = best["streaming"][3]
        check = {"n": n}
        if "pml" in best:
            check["abs_diff_R@1_vs_pml"] = abs(st["R@1"] - best["pml"][3]["precision_at_1"])
            check["abs_diff_MAP@R_vs_pml"] = abs(st["MAP@R"] - best["pml"][3]["mean_average_precision_at_r"])
        if "exact_opis" in best:
            check["abs_diff_OPIS_vs_exact"] = abs(st["OPIS"] - best["exact_opis"][3]["OPIS"])
            check["opis_error_bound"] = st["opis_error_bound"]
            check["within_bound"] = check["abs_diff_OPIS_vs_exact"] <= st["opis_error_bound"]
            check["abs_diff_eps_OPIS_vs_exact"] = abs(st["eps_OPIS"] - best["exact_opis"][3]["eps_OPIS"])
        checks.append(check)
        del x, lab
    return {"benchmark": "evaluator", "provenance": provenance(REPO), "config": vars(args),
            "torch_threads": torch.get_num_threads(), "rows": rows, "checks": checks}


def write(result: dict, out: Path) -> None:
    atomic_write_json(out.with_suffix(".json"), result)
    fields = ["n", "dim", "n_classes", "method", "seconds", "ratio_to_floor", "cpu_seconds", "cpu_ratio_to_floor",
              "chunk_size", "peak_memory_bytes",
              "extra_peak_memory_bytes", "memory_kind", "device", "R@1", "MAP@R", "OPIS", "eps_OPIS",
              "opis_error_bound"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for row in result["rows"]:
        w.writerow(row)
    atomic_write_text(out.with_suffix(".csv"), buf.getvalue())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000], help="numbers of embeddings N")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--class-size", type=int, default=50, help="mean samples per class (N // class-size classes)")
    ap.add_argument("--noise", type=float, default=3.0, help="within-class noise / class-center scale")
    ap.add_argument("--n-bins", type=int, default=2000)
    ap.add_argument("--chunk-size", type=int, default=None, help="default: the evaluator's (2^24 // N rows)")
    ap.add_argument("--repeats", type=int, default=1, help="floor and streaming repeats (the minimum is kept)")
    ap.add_argument("--pml-max", type=int, default=20000, help="largest N for the PML baseline")
    ap.add_argument("--exact-opis-max", type=int, default=10000, help="largest N for the exact OPIS")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "benchmarks" / "evaluator",
                    help="output path without extension (.json and .csv are written)")
    args = ap.parse_args(argv)
    result = run(args)
    args.out = Path(args.out)
    write(result, args.out)
    print(f"{'N':>7} {'method':<11} {'wall s':>8} {'x floor':>8} {'cpu s':>8} {'x floor':>8} {'peak MiB':>9} "
          f"{'extra MiB':>9}")
    for r in result["rows"]:
        print(f"{r['n']:>7} {r['method']:<11} {r['seconds']:>8.2f} {r['ratio_to_floor']:>8.2f} "
              f"{r['cpu_seconds']:>8.2f} {r['cpu_ratio_to_floor']:>8.2f} "
              f"{r['peak_memory_bytes'] / 2**20:>9.0f} {r['extra_peak_memory_bytes'] / 2**20:>9.0f}")
    for c in result["checks"]:
        print("check", {k: (round(v, 8) if isinstance(v, float) else v) for k, v in c.items()})
    print(f"wrote {args.out.with_suffix('.json')} and .csv")
    return result


if __name__ == "__main__":
    main()
