"""2 gloo ranks (CPU): the SSL recipe shards each global batch by rank and gathers negatives with gradient, so one
step gives the single-process loss, parameter gradients (after DDP's averaging) and decomposable state on the same
global batch (1e-6), for the symmetric InfoNCE, NT-Xent and the decomposable loss, with pre-computed views and with
fresh (online) views keyed on (seed, epoch, sample); a short ``train_ssl`` run crossing an epoch ends with the same
merged state on both ranks."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from spawn_ranks import run_ranks  # noqa: E402 (tests/ is on sys.path)

from contrastive_repro.recipes import ssl

WORLD, N, B = 2, 32, 8
CASES = {"infonce": {"loss": "infonce"}, "ntxent": {"loss": "infonce", "infonce_form": "ntxent"},
         "decomposable": {"loss": "decomposable", "dcl_momentum": 0.5},
         "decomposable_online": {"loss": "decomposable", "dcl_momentum": 0.5, "view_mode": "online"}}



def _data() -> ssl.SSLData:
    g = torch.Generator().manual_seed(0)
    data = ssl.SSLData("synthetic", torch.randint(0, 256, (N, 1, 16, 16), dtype=torch.uint8, generator=g),
                       torch.arange(N) % 4, torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=g),
                       torch.arange(8) % 4, channels=1, image_size=16, mean=(0.5,), std=(0.25,))
    data.view_bank = torch.rand(N, 3, 1, 16, 16, generator=g).half()
    return data


def _cfg(case: str, **kw) -> ssl.SSLConfig:
    kw = {"batch_size": B, "steps": 1, "width": 4, "num_blocks": 2, "norm": "group", "proj_dim": 8,
          "temperature": 0.3, "probe_Cs": (1.0,), "knn_k": 3, **CASES[case], **kw}
    return ssl.SSLConfig(**kw)


def _no_batchnorm(model: nn.Module) -> nn.Module:
    """The head's BatchNorm normalizes per rank on CPU (no SyncBatchNorm): replaced for an exact comparison."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            _no_batchnorm(child)
    return model


def _one_step(case: str, ddp: bool):
    """Loss, gradients and decomposable state after one step on the first global batch of epoch 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model, loss_fn, make_epoch, step_fn = ssl._setup(_data(), _cfg(case))
    model = _no_batchnorm(model)
    if isinstance(loss_fn, ssl.nn.Module) and hasattr(loss_fn, "log_z"):     # a visited state: the running E-step
        g = torch.Generator().manual_seed(1)                                 # mixes history and the new estimate
        loss_fn.log_z.copy_(torch.randn(loss_fn.log_z.shape, generator=g))
        loss_fn.log_u.copy_(-loss_fn.log_z)
        loss_fn.last_update.fill_(0)
        loss_fn.step.fill_(1)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    batch = next(iter(make_epoch(0)))
    loss, _ = step_fn(wrapped, batch)
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    state = None
    if hasattr(loss_fn, "sync_state"):
        loss_fn.sync_state()
        state = (loss_fn.log_z.clone(), loss_fn.log_u.clone(), loss_fn.last_update.clone())
    return loss.detach(), grads, state, batch[2]


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        res = {}
        for case in CASES:
            loss, grads, state, idx = _one_step(case, ddp=True)
            dist.all_reduce(loss)
            res[case] = (loss / WORLD, grads, state, idx)
        try:
            ssl._setup(_data(), ssl.SSLConfig(batch_size=7))
        except ValueError as e:
            res["error"] = str(e)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            r = ssl.train_ssl(_data(), _cfg("decomposable", steps=N // B + 1, eval_n_train=16))
        # the trainer's DDP, the epoch-end sync and the final sync: both ranks hold the same, merged state
        parts = [torch.zeros(3) for _ in range(WORLD)]
        dist.all_gather(parts, torch.tensor([r["dcl_state"]["seen_fraction"], r["dcl_state"]["mean_log_z"],
                                             r["final_loss"]]))
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
    for case in CASES:
        loss, grads, state, idx = _one_step(case, ddp=False)
        assert len(idx) == B and res[case][3].tolist() == idx[:B // WORLD].tolist()    # rank 0: the first half
        assert abs(float(res[case][0]) - float(loss)) < 1e-6, case
        assert len(grads) == len(res[case][1])
        for g_dist, g_one in zip(res[case][1], grads):
            torch.testing.assert_close(g_dist, g_one, rtol=0, atol=1e-6, msg=case)
        if state is not None:
            for s_dist, s_one in zip(res[case][2], state):
                torch.testing.assert_close(s_dist, s_one, rtol=0, atol=1e-6, msg=case)
    assert "batch_size=7" in res["error"] and "world size" in res["error"]
    a, b = res["train"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(a[0]) == 1.0            # 5 global batches of 8 over 32 samples: every sample seen (epoch 1 began)


def test_online_views_depend_on_seed_epoch_and_sample_only():
    data = _data()
    model, loss_fn, make_epoch, step_fn = ssl._setup(data, _cfg("decomposable_online"))
    torch.manual_seed(123)
    v1, v2, idx = next(iter(make_epoch(0)))
    after = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)                         # the caller's RNG is left alone
    assert not torch.equal(v1, v2)                                   # two different views
    # the same sample's views, drawn alone (another batch position, another rank), are the same
    from contrastive_repro.data import TwoViewTransform

    two = TwoViewTransform(ssl._train_transform(data, {}))
    one = ssl._keyed_views(lambda k: two(data.train[k]), idx[3:4], _cfg("decomposable_online").seed, 0)
    assert torch.equal(one[0][0], v1[3]) and torch.equal(one[1][0], v2[3])
    w1, _, idx1 = next(iter(make_epoch(1)))                          # another epoch: other views
    j = idx1.tolist().index(int(idx[0])) if int(idx[0]) in idx1.tolist() else None
    if j is not None:
        assert not torch.equal(w1[j], v1[0])


def test_single_process_slices_are_whole_batches():
    model, loss_fn, make_epoch, step_fn = ssl._setup(_data(), _cfg("decomposable"))
    v1, v2, idx = next(iter(make_epoch(0)))
    assert v1.shape[0] == v2.shape[0] == len(idx) == B
