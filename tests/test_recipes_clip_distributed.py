"""2 gloo ranks (CPU): the CLIP / decomposable image-text recipe shards each global batch by rank (crops included)
and gathers negatives with gradient, so one step gives the single-process loss, parameter gradients (after DDP's
averaging, the learned temperature included) and decomposable state on the same global batch (1e-6); a short
``train_clip_dcl`` run crossing an epoch ends with the same merged state on both ranks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from spawn_ranks import run_ranks  # noqa: E402 (tests/ is on sys.path)

from contrastive_repro.recipes import clip_dcl as cd

WORLD, N, B = 2, 16, 8
WORDS = ("red", "green", "blue", "cat", "dog", "sun", "moon", "tree")



def _data() -> cd.CLIPData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=g)
    captions = [f"a {WORDS[i % 8]} {WORDS[(3 * i + 1) % 8]}" for i in range(N)]
    return cd.CLIPData("synthetic", cd.TensorPairs(images, captions), zeroshot={}, probes={}, retrieval=None)


def _cfg(loss: str, **kw) -> cd.CLIPDCLConfig:
    return cd.CLIPDCLConfig(**{"loss": loss, "batch_size": B, "steps": 1, "temperature": 0.2, "dcl_momentum": 0.5,
                               **kw})


def _one_step(loss_name: str, ddp: bool):
    """Loss, gradients and decomposable state after one step on the first global batch of epoch 0."""
    model, _, loss_fn, make_epoch, step_fn, _ = cd._setup(_data(), _cfg(loss_name))
    if hasattr(loss_fn, "log_z"):                    # a visited state: the running E-step mixes history and the
        g = torch.Generator().manual_seed(1)         # new estimate
        loss_fn.log_z.copy_(torch.randn(loss_fn.log_z.shape, generator=g))
        loss_fn.log_u.copy_(-loss_fn.log_z)
        loss_fn.last_update.fill_(0)
        loss_fn.step.fill_(1)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    batch = next(iter(make_epoch(0)))
    loss, _ = step_fn(wrapped, batch)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    state = None
    if hasattr(loss_fn, "sync_state"):
        loss_fn.sync_state()
        state = (loss_fn.log_z.clone(), loss_fn.log_u.clone(), loss_fn.last_update.clone())
    return loss.detach(), grads, state, batch


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = {}
        for loss_name in cd.LOSSES:
            loss, grads, state, batch = _one_step(loss_name, ddp=True)
            dist.all_reduce(loss)
            res[loss_name] = (loss / WORLD, grads, state, batch)
        try:
            cd._setup(_data(), _cfg("clip", batch_size=5))
        except ValueError as e:
            res["error"] = str(e)
        _, _, history = cd.train_clip_dcl(_data(), _cfg("decomposable", steps=N // B + 1))
        loss_fn_state = torch.tensor([float(history[-1]["loss"])])
        parts = [torch.zeros(1) for _ in range(WORLD)]
        dist.all_gather(parts, loss_fn_state)
        res["train"] = parts
        if rank == 0:
            torch.save(res, Path(out_dir) / "res.pt")
        dist.barrier()  # both ranks tear gloo down together (a rank exiting mid-teardown can abort its peer)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_single_process(tmp_path):
    run_ranks(_worker, tmp_path, WORLD)
    res = torch.load(tmp_path / "res.pt")
    torch.set_num_threads(1)
    for loss_name in cd.LOSSES:
        loss, grads, state, batch = _one_step(loss_name, ddp=False)
        x_dist, tok_dist, idx_dist = res[loss_name][3]
        half = B // WORLD
        assert idx_dist.tolist() == batch[2][:half].tolist()                   # rank 0: the first half ...
        torch.testing.assert_close(x_dist, batch[0][:half], rtol=0, atol=1e-6)  # ... with the same crops
        assert abs(float(res[loss_name][0]) - float(loss)) < 1e-6, loss_name
        assert len(grads) == len(res[loss_name][1])
        for g_dist, g_one in zip(res[loss_name][1], grads):
            torch.testing.assert_close(g_dist, g_one, rtol=0, atol=1e-6, msg=loss_name)
        if state is not None:
            for s_dist, s_one in zip(res[loss_name][2], state):
                torch.testing.assert_close(s_dist, s_one, rtol=0, atol=1e-6, msg=loss_name)
    assert "batch_size=5" in res["error"] and "world size" in res["error"]
    a, b = res["train"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)      # the trainer reports the mean over ranks


def test_sharded_crops_are_rows_of_the_global_crops():
    x = torch.rand(6, 3, 8, 8)
    whole = cd.random_resized_crop(x, torch.Generator().manual_seed(3), (0.5, 1.0))
    part = cd.random_resized_crop(x[2:4], torch.Generator().manual_seed(3), (0.5, 1.0), total=6, start=2)
    torch.testing.assert_close(part, whole[2:4], rtol=0, atol=0)
    with pytest.raises(ValueError, match="total=6"):
        cd.random_resized_crop(x[2:4], None, (0.5, 1.0), total=6, start=5)
