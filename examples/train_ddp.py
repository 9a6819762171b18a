"""A tiny contrastive (SimCLR-style) training run on synthetic images, launchable with torchrun.

Two noisy, randomly flipped views of each synthetic 32x32 image are embedded by a small CNN + projection head; a
symmetric InfoNCE loss is computed on features all-gathered from every rank *with* gradients (open_clip's local-loss
layout: each rank's rows against all ranks' columns, targets ``rank * B + arange(B)``), so the run optimizes the
same objective as one process with the whole global batch.

Run it::

    # 2 processes on one machine (CPU: gloo; GPUs: NCCL, one GPU per process)
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --steps 60 --ckpt-dir checkpoints/ddp_demo

    # the same run in one process (batch 2x larger per process for the same global batch)
    python examples/train_ddp.py --steps 60 --batch-size 64

On a small shared CPU machine, one intra-op thread per process is much faster than oversubscribed cores: torchrun
sets ``OMP_NUM_THREADS=1`` itself; for the single process run ``OMP_NUM_THREADS=1 python examples/train_ddp.py``.

Kill it at any point and run the same command again: it resumes from the newest checkpoint in ``--ckpt-dir``.
Rank 0 prints the final loss and the view-matching accuracy on held-out images and, with ``--out``, writes them to
a JSON file.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from contrastive_repro import distributed as dist_utils
from contrastive_repro.io import atomic_write_json
from contrastive_repro.models import ProjectionHead, SmallConvNet
from contrastive_repro.training import EpochBatches, TrainConfig, epoch_index_batches, train
from contrastive_repro.utils import seed_everything


def synthetic_images(n: int, seed: int) -> torch.Tensor:
    """``n`` smooth random 3x32x32 images (low-frequency noise upsampled), fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    return F.interpolate(low, size=32, mode="bilinear", align_corners=False)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip + Gaussian noise, from the global torch RNG (checkpointed by the trainer)."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    x = torch.where(flip, x.flip(-1), x)
    return x + 0.3 * torch.randn_like(x)


class Encoder(nn.Module):
    def __init__(self, embed_dim: int = 32, width: int = 16):
        super().__init__()
        self.backbone = SmallConvNet(in_channels=3, embed_dim=None, width=width, num_blocks=3, norm="group")
        self.head = ProjectionHead(self.backbone.feature_dim, embed_dim, num_layers=2, batch_norm=False)
        self.log_inv_temp = nn.Parameter(torch.tensor(math.log(1 / 0.1)))

    def forward(self, view_a: torch.Tensor, view_b: torch.Tensor):
        za = F.normalize(self.head(self.backbone(view_a)), dim=-1)
        zb = F.normalize(self.head(self.backbone(view_b)), dim=-1)
        return za, zb, self.log_inv_temp.exp().clamp(max=100)


def info_nce_local(za: torch.Tensor, zb: torch.Tensor, scale: torch.Tensor, local_loss: bool) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP eq.): mean of CE(s * a @ b_all^T) and CE(s * b @ a_all^T) on gathered features."""
    all_a, all_b = dist_utils.gather_features(za, zb, local_loss=local_loss, gather_with_grad=True)
    if local_loss:
        labels = dist_utils.rank_labels(za.shape[0], device=za.device)
        return 0.5 * (F.cross_entropy(scale * za @ all_b.T, labels) + F.cross_entropy(scale * zb @ all_a.T, labels))
    labels = torch.arange(all_a.shape[0], device=za.device)
    logits = scale * all_a @ all_b.T
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


@torch.no_grad()
def view_matching_accuracy(model: nn.Module, images: torch.Tensor, seed: int) -> float:
    """Top-1 accuracy of matching each image's augmented view to the other view of the same image."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise_a = 0.3 * torch.randn(images.shape, generator=g)
    noise_b = 0.3 * torch.randn(images.shape, generator=g)
    device = next(model.parameters()).device
    za, zb, _ = model((images + noise_a).to(device), (images.flip(-1) + noise_b).to(device))
    return (za @ zb.T).argmax(1).eq(torch.arange(len(images), device=device)).float().mean().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--num-images", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--global-loss", action="store_true", help="full W*B x W*B loss on every rank")
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write final metrics as JSON here (rank 0)")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)

    info = dist_utils.init_distributed()
    seed_everything(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    images = synthetic_images(args.num_images, seed=args.seed)
    held_out = synthetic_images(256, seed=args.seed + 1)
    model = Encoder()

    def make_epoch(epoch: int):
        return epoch_index_batches(len(images), args.batch_size, epoch, seed=args.seed, rank=info.rank,
                                   world_size=info.world_size)

    def step_fn(model, idx):
        x = images[idx.cpu()].to(idx.device)
        za, zb, scale = model(augment(x), augment(x))
        return info_nce_local(za, zb, scale, local_loss=not args.global_loss), {"inv_temp": scale}

    cfg = TrainConfig(max_steps=args.steps, lr=args.lr, weight_decay=1e-4, warmup_steps=max(1, args.steps // 10),
                      amp=args.amp, grad_clip=1.0, log_every=10, ckpt_dir=args.ckpt_dir, ckpt_every=args.ckpt_every,
                      seed=args.seed, progress=args.progress and info.is_main)
    t0 = time.perf_counter()
    history = train(model, step_fn, EpochBatches(make_epoch), cfg, dist_info=info)
    metrics = {
        "world_size": info.world_size,
        "global_batch": args.batch_size * info.world_size,
        "steps": len(history),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "view_matching_top1": view_matching_accuracy(model, held_out, seed=args.seed + 2),
        "wall_s": time.perf_counter() - t0,
    }
    if info.is_main:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}, flush=True)
        if args.out:
            atomic_write_json(args.out, metrics)
    dist_utils.cleanup()
    return metrics


if __name__ == "__main__":
    main()
