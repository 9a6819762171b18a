"""2 gloo ranks: the sharded symmetric head loss (gathered negatives with gradient) equals the single-process loss
of the concatenated batch, and so do the head's gradients, for every arm (1e-6)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from spawn_ranks import run_ranks  # noqa: E402 (tests/ is on sys.path)

from contrastive_repro.recipes import frozen_heads as fh

WORLD, B, D, P = 2, 5, 7, 4



def _data():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(WORLD * B, D, generator=g, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(WORLD * B, D, generator=g, dtype=torch.float64)
    w = torch.randn(D, P, generator=g, dtype=torch.float64)
    log_u = (0.3 * torch.randn(WORLD * B, generator=g, dtype=torch.float64),
             0.3 * torch.randn(WORLD * B, generator=g, dtype=torch.float64))
    return x1, x2, w, log_u


def _single(arm):
    x1, x2, w, log_u = _data()
    w = w.clone().requires_grad_(True)
    z1, z2 = F.normalize(x1 @ w, dim=-1), F.normalize(x2 @ w, dim=-1)
    logits = z1 @ z2.T / 0.3
    if arm in ("decomposable", "sampled"):
        loss = 0.5 * (fh.pair_losses(logits, arm, log_u[0]) + fh.pair_losses(logits.T, arm, log_u[1])).mean()
    else:
        loss = 0.5 * (fh.pair_losses(logits, arm) + fh.pair_losses(logits.T, arm)).mean()
    (grad,) = torch.autograd.grad(loss, w)
    return loss.detach(), grad


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x1, x2, w, log_u = _data()
        sl = slice(rank * B, (rank + 1) * B)
        res = {}
        for arm in fh.SSL_ARMS:
            wr = w.clone().requires_grad_(True)
            z1, z2 = F.normalize(x1[sl] @ wr, dim=-1), F.normalize(x2[sl] @ wr, dim=-1)
            loss, _ = fh.sharded_symmetric_loss(z1, z2, arm, 0.3, gather=True, log_u=(log_u[0][sl], log_u[1][sl]))
            (grad,) = torch.autograd.grad(loss, wr)
            both = torch.stack([loss.detach().reshape(1).expand(1), torch.zeros(1, dtype=loss.dtype)])
            dist.all_reduce(both)
            dist.all_reduce(grad)
            res[arm] = (both[0] / WORLD, grad / WORLD)
        if rank == 0:
            torch.save(res, Path(out_dir) / "res.pt")
        dist.barrier()  # both ranks tear gloo down together (a rank exiting mid-teardown can abort its peer)
    finally:
        dist.destroy_process_group()


def test_single_process_form_matches_pair_losses():
    for arm in fh.SSL_ARMS:
        x1, x2, w, log_u = _data()
        z1, z2 = F.normalize(x1 @ w, dim=-1), F.normalize(x2 @ w, dim=-1)
        loss, _ = fh.sharded_symmetric_loss(z1, z2, arm, 0.3, log_u=log_u)
        torch.testing.assert_close(loss, _single(arm)[0], rtol=0, atol=1e-12)


def test_two_gloo_ranks_equal_single_process(tmp_path):
    run_ranks(_worker, tmp_path, WORLD)
    res = torch.load(tmp_path / "res.pt")
    for arm in fh.SSL_ARMS:
        loss, grad = _single(arm)
        assert abs(float(res[arm][0]) - float(loss)) < 1e-6, arm
        torch.testing.assert_close(res[arm][1], grad, rtol=0, atol=1e-6)
