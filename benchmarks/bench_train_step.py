"""Overhead of the shared training loop (``contrastive_repro.training``) over a bare PyTorch loop.

For each model (``small_cnn`` on 1x28x28, CLIP ``tiny`` on 3x32x32 + 16 tokens) it times ``--steps`` optimizer
steps of the same symmetric InfoNCE objective two ways:

* ``bare``    -- ``zero_grad -> forward -> loss -> backward -> AdamW step`` in a Python loop;
* ``trainer`` -- :func:`contrastive_repro.training.train` (LR schedule, NaN guard on loss and gradient norm,
  per-step history, no checkpoints), and ``trainer+ckpt`` with a checkpoint every 10 steps.

``overhead`` = t(trainer) / t(bare) - 1. On CPU the metric is process CPU time with one intra-op thread (the
shared development machine is loaded by other jobs, which scatters wall times); wall medians are recorded too.
Results go to ``results/benchmarks/train_step.json`` with provenance.

    .venv/bin/python benchmarks/bench_train_step.py [--steps 30] [--repeats 3] [--batch-size 64] [--devices cpu cuda]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from contrastive_repro.io import atomic_write_json
from contrastive_repro.models import SmallConvNet, build_clip
from contrastive_repro.provenance import provenance
from contrastive_repro.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def _symmetric_infonce(a, b, scale):
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def _problem(name: str, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "small_cnn":
        model = SmallConvNet(1, 64, width=16)
        x = torch.randn(batch, 1, 28, 28, generator=g)

        def step_fn(m, i):
            xb = x.to(device)
            return _symmetric_infonce(m(xb + 0.1 * torch.randn_like(xb)), m(xb + 0.1 * torch.randn_like(xb)), 10.0)
    else:
        model = build_clip("tiny")
        x = torch.randn(batch, 3, 32, 32, generator=g)
        tok = torch.randint(1, 49407, (batch, 16), generator=g)

        def step_fn(m, i):
            img, txt, scale = m(x.to(device), tok.to(device))
            return _symmetric_infonce(img, txt, scale)
    return model, step_fn


def _clock(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def _time_variant(name: str, variant: str, args, device: torch.device) -> tuple[float, float]:
    model, step_fn = _problem(name, args.batch_size, device)
    model.to(device)
    if variant == "bare":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        w0, c0 = time.perf_counter(), _clock(device)
        for i in range(args.steps):
            opt.zero_grad(set_to_none=True)
            step_fn(model, i).backward()
            opt.step()
        return _clock(device) - c0, time.perf_counter() - w0
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(max_steps=args.steps, lr=1e-3, progress=False, log_every=0, device=str(device), amp="off",
                          ckpt_dir=d if variant == "trainer+ckpt" else None, ckpt_every=10, keep_last=1)
        w0, c0 = time.perf_counter(), _clock(device)
        train(model, step_fn, lambda i: i, cfg)
        return _clock(device) - c0, time.perf_counter() - w0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "train_step.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for dev_name in args.devices:
        device = torch.device(dev_name)
        for name in ("small_cnn", "clip_tiny"):
            samples: dict[str, list[tuple[float, float]]] = {v: [] for v in ("bare", "trainer", "trainer+ckpt")}
            for _ in range(args.repeats):  # round-robin so load drift hits all variants alike
                for variant in samples:
                    samples[variant].append(_time_variant(name, variant, args, device))
            med = {v: (statistics.median(s[0] for s in xs), statistics.median(s[1] for s in xs))
                   for v, xs in samples.items()}
            row = {"device": dev_name, "model": name, "batch_size": args.batch_size, "steps": args.steps,
                   "metric": "cuda wall s" if device.type == "cuda" else "process cpu s",
                   **{f"{v}_ms_per_step": 1e3 * t[0] / args.steps for v, t in med.items()},
                   **{f"{v}_wall_ms_per_step": 1e3 * t[1] / args.steps for v, t in med.items()},
                   "overhead": med["trainer"][0] / med["bare"][0] - 1,
                   "overhead_with_ckpt": med["trainer+ckpt"][0] / med["bare"][0] - 1}
            rows.append(row)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    result = {"benchmark": "train_step", "threads": args.threads, "rows": rows, "provenance": provenance(ROOT)}
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
