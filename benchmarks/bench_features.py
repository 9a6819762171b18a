"""Frozen-encoder feature extraction: throughput of EfficientNet-Lite0 (channels-last vs the default layout) and
all-MiniLM-L6-v2 on this machine, and the time to load a filled cache.

    .venv/bin/python benchmarks/bench_features.py           # writes results/benchmarks/features.json
    .venv/bin/python benchmarks/bench_features.py --quick

The goal of the evidence layer: every feature the `cpu` profile needs computed in at most 5 minutes on an idle
2-core machine, then loaded in under a second. The load average before and after is recorded: on a shared machine
the throughput is a lower bound. The channels-last path is the one `image_features` uses; its parity with the plain
layout is a unit test (tests/test_features.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from contrastive_repro import features as feat  # noqa: E402
from contrastive_repro.io import atomic_write_json  # noqa: E402
from contrastive_repro.provenance import provenance  # noqa: E402


def images_per_second(enc, x: torch.Tensor, layers, repeats: int) -> float:
    with torch.inference_mode():
        enc(x[:16], layers)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            enc(x, layers)
            best = min(best, time.perf_counter() - t0)
    return x.shape[0] / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    repeats, n = (1, 64) if args.quick else (3, 256)
    load_before = os.getloadavg()
    enc = feat.load_image_encoder()
    out = {"threads": torch.get_num_threads(), "image": {}, "text": {}}
    for res in (64, 96, 128):
        x = torch.rand(n, 3, res, res)
        fast = images_per_second(enc, x, ("final", "mid"), repeats)
        plain = enc.backbone.to(memory_format=torch.contiguous_format)
        with torch.inference_mode():
            mean, std = enc.mean, enc.std
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                plain((x - mean) / std)
                best = min(best, time.perf_counter() - t0)
        enc.backbone.to(memory_format=torch.channels_last)
        out["image"][f"{res}px"] = {"channels_last_img_per_s": round(fast, 1), "plain_img_per_s": round(n / best, 1)}
        print(f"EfficientNet-Lite0 {res}px: {fast:.0f} img/s channels-last, {n / best:.0f} img/s plain")
    texts = [f"a small {w} emoji with a face number {i}" for i, w in enumerate(["red", "blue", "green"] * (n // 3))]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        feat.text_features(texts, "bench", tokens=True, cache_dir=d, progress=False)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        feat.text_features(texts, "bench", tokens=True, cache_dir=d, progress=False)
        warm = time.perf_counter() - t0
        out["text"] = {"texts_per_s": round(len(texts) / cold, 1), "cache_load_s": round(warm, 3)}
        print(f"all-MiniLM-L6-v2: {len(texts) / cold:.0f} texts/s; cache load {warm:.3f} s")
        x = (torch.rand(3655, 3, 64, 64) * 255).to(torch.uint8)  # emoji-sized payload, 1 + 2 views
        feat.image_features(x[:8], "warm", resolution=32, cache_dir=d, progress=False)
        key_path = Path(d)
        t0 = time.perf_counter()
        payload = {"final": torch.randn(3655, 1280), "mid": torch.randn(3655, 112),
                   "view_final": torch.randn(3655, 2, 1280), "view_mid": torch.randn(3655, 2, 112)}
        from contrastive_repro.data.cache import load_checked, save_checked

        save_checked(key_path / "x.pt", payload, {"k": 1})
        t0 = time.perf_counter()
        load_checked(key_path / "x.pt", {"k": 1})
        out["image"]["emoji_cache_load_s"] = round(time.perf_counter() - t0, 3)
        print(f"emoji-sized image feature cache (3,655 x (1+2 views) x 1392 floats): load "
              f"{out['image']['emoji_cache_load_s']:.3f} s")
    out["loadavg_before"], out["loadavg_after"] = load_before, os.getloadavg()
    out["provenance"] = provenance(ROOT)
    atomic_write_json(ROOT / "results" / "benchmarks" / "features.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
