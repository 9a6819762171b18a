"""InfoNCE / NT-Xent and the symmetric CLIP loss: equality with pytorch-metric-learning and open_clip, loop
references, gradients, gathered negatives (simulated ranks in one process, and a real 2-rank gloo run)."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from contrastive_repro.losses.infonce import InfoNCELoss, SymmetricContrastiveLoss, clip_loss, info_nce



# Imported lazily (not at module level): the 2-rank test's spawned workers re-import this module, and open_clip and
# pytorch-metric-learning take seconds to import.
def _pml():
    return pytest.importorskip("pytorch_metric_learning.losses")


def _open_clip_loss():
    return pytest.importorskip("open_clip.loss")

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _feats(b=6, d=5, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, generator=g, dtype=dtype), torch.randn(b, d, generator=g, dtype=dtype))


def _grads(fn, *xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    return out.detach(), torch.autograd.grad(out, xs)


# ---------------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------------
def _ntxent_loop(a, p, tau):
    z = F.normalize(torch.cat([a, p]), dim=1)
    n, b = z.shape[0], a.shape[0]
    total = 0.0
    for k in range(n):
        pos = (k + b) % n
        num = torch.exp(z[k] @ z[pos] / tau)
        den = sum(torch.exp(z[k] @ z[m] / tau) for m in range(n) if m != k)
        total = total - torch.log(num / den)
    return total / n


def _moco_loop(a, p, negs, tau):
    a, p, negs = (F.normalize(x, dim=1) for x in (a, p, negs))
    total = 0.0
    for i in range(a.shape[0]):
        num = torch.exp(a[i] @ p[i] / tau)
        den = num + sum(torch.exp(a[i] @ n / tau) for n in negs)
        total = total - torch.log(num / den)
    return total / a.shape[0]


def _clip_loop(img, txt, scale):
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    b = img.shape[0]
    total = 0.0
    for i in range(b):
        li = scale * img[i] @ txt.T
        lt = scale * txt[i] @ img.T
        total = total + (torch.logsumexp(li, 0) - li[i]) + (torch.logsumexp(lt, 0) - lt[i])
    return total / (2 * b)


# ---------------------------------------------------------------------------------------------------------------
# one modality
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("b", [2, 7])
def test_info_nce_equals_pml_ntxent(tau, b):
    a, p = _feats(b=b, d=6, seed=b)
    pml = _pml().NTXentLoss(temperature=tau)
    labels = torch.cat([torch.arange(b), torch.arange(b)])
    v_ref, g_ref = _grads(lambda x, y: pml(torch.cat([x, y]), labels), a, p)
    v, g = _grads(lambda x, y: info_nce(x, y, tau), a, p)
    assert torch.allclose(v, v_ref, rtol=1e-10, atol=1e-12)
    for u, w in zip(g, g_ref):
        assert torch.allclose(u, w, rtol=1e-8, atol=1e-12)


def test_info_nce_matches_loop_and_module():
    a, p = _feats(b=5)
    ref = _ntxent_loop(a, p, 0.2)
    assert torch.allclose(info_nce(a, p, 0.2), ref, rtol=1e-12)
    assert torch.allclose(InfoNCELoss(0.2)(a, p), ref, rtol=1e-12)
    per = info_nce(a, p, 0.2, reduction="none")
    assert per.shape == (10,) and torch.allclose(per.mean(), ref, rtol=1e-12)
    assert torch.allclose(info_nce(a, p, 0.2, reduction="sum"), 10 * ref, rtol=1e-12)


def test_info_nce_explicit_negatives_matches_loop():
    a, p = _feats(b=4, seed=1)
    negs = torch.randn(9, 5, dtype=DT, generator=torch.Generator().manual_seed(3))
    ref = _moco_loop(a, p, negs, 0.3)
    assert torch.allclose(info_nce(a, p, 0.3, negatives=negs), ref, rtol=1e-12)
    assert torch.allclose(InfoNCELoss(0.3)(a, p, negs), ref, rtol=1e-12)


def test_info_nce_gradcheck():
    a, p = _feats(b=4, d=3, seed=2)
    a.requires_grad_(True)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: info_nce(x, y, 0.3), (a, p))
    negs = torch.randn(5, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, n: info_nce(x, y, 0.3, negatives=n), (a, p, negs))


def test_learnable_temperature_gets_gradient():
    a, p = _feats(b=4)
    tau = torch.tensor(0.2, dtype=DT, requires_grad=True)
    info_nce(a, p, tau).backward()
    assert tau.grad is not None and torch.isfinite(tau.grad)


def test_half_precision_inputs_are_upcast():
    a, p = _feats(b=8, dtype=torch.float32)
    out = info_nce(a.bfloat16(), p.bfloat16(), 0.1)
    assert out.dtype == torch.float32
    assert torch.allclose(out, info_nce(a.bfloat16().float(), p.bfloat16().float(), 0.1))


# ---------------------------------------------------------------------------------------------------------------
# two modalities
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("use_open_clip", [True, False])
def test_clip_loss_equals_open_clip(scale, use_open_clip):
    img, txt = _feats(b=7, d=6, seed=4)
    ocl = _open_clip_loss().ClipLoss()
    v_ref, g_ref = _grads(lambda x, y: ocl(F.normalize(x, dim=1), F.normalize(y, dim=1), scale), img, txt)
    v, g = _grads(lambda x, y: clip_loss(x, y, scale, use_open_clip=use_open_clip), img, txt)
    assert torch.allclose(v, v_ref, rtol=1e-10)
    for u, w in zip(g, g_ref):
        assert torch.allclose(u, w, rtol=1e-8, atol=1e-12)
    assert torch.allclose(v, _clip_loop(img, txt, scale), rtol=1e-10)


def test_clip_loss_tensor_scale_and_module():
    img, txt = _feats(b=5, seed=5)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=DT, requires_grad=True)
    loss = SymmetricContrastiveLoss()(img, txt, log_scale.exp())
    loss.backward()
    assert log_scale.grad is not None
    assert torch.allclose(loss.detach(), _clip_loop(img, txt, 1 / 0.07), rtol=1e-10)
    assert torch.allclose(SymmetricContrastiveLoss(temperature=0.07)(img, txt), loss.detach(), rtol=1e-10)
    with pytest.raises(ValueError):
        SymmetricContrastiveLoss()(img, txt)


def test_clip_loss_without_normalization_uses_raw_features():
    img, txt = _feats(b=5, seed=6)
    img_n, txt_n = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    assert torch.allclose(clip_loss(img_n, txt_n, 10.0, normalize=False), clip_loss(img, txt, 10.0), rtol=1e-12)
    assert not torch.allclose(clip_loss(img, txt, 10.0, normalize=False), clip_loss(img, txt, 10.0))


def test_shape_errors():
    a, p = _feats(b=4)
    with pytest.raises(ValueError):
        info_nce(a, p[:3], 0.1)
    with pytest.raises(ValueError):
        clip_loss(a, p[:, :2], 10.0)
    with pytest.raises(ValueError):
        InfoNCELoss(temperature=0.0)
    with pytest.raises(ValueError):
        info_nce(a, p, 0.1, reduction="avg")


# ---------------------------------------------------------------------------------------------------------------
# gathered negatives, simulated: W "ranks" in one process
# ---------------------------------------------------------------------------------------------------------------
def _simulated(loss_fn, a_full, p_full, world):
    """Mean over simulated ranks of the local losses, and the gradient of their sum (what all_gather_with_grad
    hands back before DDP divides by W)."""
    a_full = a_full.clone().requires_grad_(True)
    p_full = p_full.clone().requires_grad_(True)
    b = a_full.shape[0] // world
    a_parts, p_parts = a_full.split(b), p_full.split(b)
    losses = []
    for r in range(world):
        def gather(x, r=r):
            parts = a_parts if x is a_parts[r] else p_parts
            assert x is parts[r]
            return torch.cat(parts)
        losses.append(loss_fn(a_parts[r], p_parts[r], gather, r))
    total = torch.stack(losses).sum()
    ga, gp = torch.autograd.grad(total, (a_full, p_full))
    return total.detach() / world, ga, gp


@pytest.mark.parametrize("world", [2, 3])
def test_info_nce_gathered_local_loss_equals_global(world):
    a, p = _feats(b=4 * world, seed=7)
    a, p = F.normalize(a, dim=1), F.normalize(p, dim=1)
    v_ref, (ga_ref, gp_ref) = _grads(lambda x, y: info_nce(x, y, 0.2, normalize=False), a, p)
    v, ga, gp = _simulated(lambda x, y, g, r: info_nce(x, y, 0.2, normalize=False, gather=g, rank=r), a, p, world)
    assert torch.allclose(v, v_ref, rtol=1e-12)
    assert torch.allclose(ga / world, ga_ref, rtol=1e-10, atol=1e-14)
    assert torch.allclose(gp / world, gp_ref, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("world", [2, 3])
def test_clip_loss_gathered_local_loss_equals_open_clip_global(world):
    a, p = _feats(b=3 * world, seed=8)
    a, p = F.normalize(a, dim=1), F.normalize(p, dim=1)
    ocl = _open_clip_loss().ClipLoss()
    v_ref, (ga_ref, gp_ref) = _grads(lambda x, y: ocl(x, y, 20.0), a, p)
    v, ga, gp = _simulated(lambda x, y, g, r: clip_loss(x, y, 20.0, normalize=False, gather=g, rank=r), a, p, world)
    assert torch.allclose(v, v_ref, rtol=1e-12)
    assert torch.allclose(ga / world, ga_ref, rtol=1e-10, atol=1e-14)
    assert torch.allclose(gp / world, gp_ref, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# gathered negatives, real: 2 gloo processes
# ---------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, a, p, out_dir):
    import torch.distributed as dist

    from contrastive_repro.distributed import all_gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = a.shape[0] // world
        res = {}
        for name, fn in [("ntxent", lambda x, y: info_nce(x, y, 0.2, gather=True)),
                         ("clip", lambda x, y: clip_loss(x, y, 20.0, gather=all_gather_with_grad))]:
            x = a[rank * b:(rank + 1) * b].clone().requires_grad_(True)
            y = p[rank * b:(rank + 1) * b].clone().requires_grad_(True)
            loss = fn(x, y)
            loss.backward()
            res[name] = (loss.detach(), x.grad, y.grad)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_rank_gloo_gather_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    a, p = _feats(b=4 * world, seed=9)
    mp.spawn(_ddp_worker, args=(world, _free_port(), a, p, str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    b = a.shape[0] // world
    refs = {"ntxent": lambda x, y: info_nce(x, y, 0.2), "clip": lambda x, y: clip_loss(x, y, 20.0)}
    for name, fn in refs.items():
        v_ref, (ga_ref, gp_ref) = _grads(fn, a, p)
        v = sum(r[name][0] for r in ranks) / world
        assert torch.allclose(v, v_ref, rtol=1e-10)
        ga = torch.cat([r[name][1] for r in ranks]) / world     # DDP divides parameter gradients by W
        gp = torch.cat([r[name][2] for r in ranks]) / world
        assert torch.allclose(ga, ga_ref, rtol=1e-8, atol=1e-12), name
        assert torch.allclose(gp, gp_ref, rtol=1e-8, atol=1e-12), name
        assert ga.shape[0] == world * b


# ------------------------------------------------------------------------------------------ bad input is named
@pytest.mark.parametrize("tau", [0.0, -0.1, float("nan"), torch.tensor(-0.5), torch.tensor(0.0)])
def test_info_nce_rejects_nonpositive_temperature(tau):
    from contrastive_repro.losses.infonce import InfoNCELoss, info_nce

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        info_nce(x, x + 0.1, tau)
    if not isinstance(tau, torch.Tensor):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            InfoNCELoss(temperature=tau)


@pytest.mark.parametrize("scale", [-1.0, torch.tensor(-3.0), float("inf")])
def test_clip_loss_rejects_negative_logit_scale(scale):
    from contrastive_repro.losses.infonce import clip_loss

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="logit_scale must be a finite number >= 0"):
        clip_loss(x, x + 0.1, scale)


def test_empty_batch_and_integer_features_are_refused():
    from contrastive_repro.losses.infonce import clip_loss, info_nce

    empty = torch.zeros(0, 3)
    with pytest.raises(ValueError, match="empty batch: anchor and positive have 0 rows"):
        info_nce(empty, empty, 0.1)
    with pytest.raises(ValueError, match="empty batch: image_features and text_features have 0 rows"):
        clip_loss(empty, empty, 10.0)
    ints = torch.randint(0, 3, (4, 3))
    with pytest.raises(TypeError, match="anchor must be floating-point features, got dtype torch.int64"):
        info_nce(ints, ints, 0.1)
    with pytest.raises(TypeError, match="image_features must be floating-point"):
        clip_loss(ints, ints, 10.0)
