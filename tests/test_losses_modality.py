"""Modality-structure losses (Jiang et al., CVPR 2023): loop references, gradients, sanity values, composition."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from contrastive_repro.losses.modality import (
    BASES,
    REGULARIZERS,
    ModalityStructureLoss,
    _gram,
    bridge_mean,
    brownian_bridge_loss,
    contrastive_base_loss,
    cyclip_loss,
    geometric_consistency_loss,
    separation_loss,
)
from contrastive_repro.utils import NonFiniteError

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _unit(n, d, gen, dtype=D64):
    return F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=1)


def _feats(n=5, d=4, seed=0, dtype=D64, k=8):
    g = torch.Generator().manual_seed(seed)
    return [_unit(n, d, g, dtype) for _ in range(k)]


# ------------------------------------------------------------------------------------------------ loop references
def _dot(u, v):
    return sum(float(a) * float(b) for a, b in zip(u, v))


def _ref_infonce(a, b, s):
    n = a.shape[0]
    total = 0.0
    for j in range(n):
        logits = [s * _dot(a[j], b[k]) for k in range(n)]
        total += -(logits[j] - math.log(sum(math.exp(x) for x in logits)))
    return total / n


def _ref_con(zv, zt, zva, zta, s):
    return (_ref_infonce(zv, zt, s) + _ref_infonce(zt, zv, s) + _ref_infonce(zv, zva, s)
            + _ref_infonce(zt, zta, s)) / 4


def _ref_cross_cyc(zv, zt):
    n = zv.shape[0]
    return sum((_dot(zv[j], zt[k]) - _dot(zv[k], zt[j])) ** 2 for j in range(n) for k in range(n))


def _ref_in_cyc(a, b, a2, b2):
    n = a.shape[0]
    return sum((_dot(a[j], a2[k]) - _dot(b[j], b2[k])) ** 2 for j in range(n) for k in range(n))


def _ref_sep(zv, zt, ziv, ziva, zit, zita, s, t):
    n = zv.shape[0]
    ortho = sum(_dot(zv[j], ziv[j]) ** 2 + _dot(zt[j], zit[j]) ** 2 for j in range(n)) / n
    con = _ref_infonce(ziv, ziva, s) + _ref_infonce(zit, zita, s)

    def g(u, v):
        return math.exp(-t * sum((float(a) - float(b)) ** 2 for a, b in zip(u, v)))

    uni = math.log(sum(g(ziv[j], ziv[k]) + g(zit[j], zit[k]) for j in range(n) for k in range(n)) / n)
    return ortho + con + uni, ortho, con, uni


def _ref_bridge(zv, zt, zva, t):
    n = zv.shape[0]
    total = 0.0
    for j in range(n):
        m = [t * float(a) + (1 - t) * float(b) for a, b in zip(zv[j], zt[j])]
        norm = math.sqrt(sum(x * x for x in m))
        m = [x / norm for x in m]
        total += sum((float(a) - b) ** 2 for a, b in zip(zva[j], m))
    return total / n


def _ref_gc(zv, zt, zva=None, zta=None):
    n = zv.shape[0]
    plain = (_ref_cross_cyc(zv, zt) + _ref_in_cyc(zv, zt, zv, zt)) / n
    if zva is None:
        return plain
    aug = (_ref_in_cyc(zv, zva, zv, zva) + _ref_in_cyc(zt, zta, zt, zta)) / n
    aug += sum((_dot(zv[j], zt[j]) - _dot(zva[j], zta[j])) ** 2 for j in range(n)) / n
    return plain + aug


# ------------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scale", [1.0, 14.3])
def test_contrastive_base_matches_loop(seed, scale):
    zv, zt, zva, zta = _feats(seed=seed)[:4]
    val, parts = contrastive_base_loss(zv, zt, zva, zta, scale, return_parts=True)
    assert val.item() == pytest.approx(_ref_con(zv, zt, zva, zta, scale), rel=1e-12, abs=1e-12)
    assert parts["v2t"].item() == pytest.approx(_ref_infonce(zv, zt, scale), rel=1e-12)
    assert parts["t2t"].item() == pytest.approx(_ref_infonce(zt, zta, scale), rel=1e-12)
    clip = contrastive_base_loss(zv, zt, None, None, torch.tensor(scale, dtype=D64))
    ref = (_ref_infonce(zv, zt, scale) + _ref_infonce(zt, zv, scale)) / 2
    assert clip.item() == pytest.approx(ref, rel=1e-12)


def test_contrastive_base_needs_both_or_no_aug():
    zv, zt, zva = _feats()[:3]
    with pytest.raises(ValueError, match="both"):
        contrastive_base_loss(zv, zt, zva, None, 10.0)
    with pytest.raises(ValueError, match="positive"):
        contrastive_base_loss(zv, zt, None, None, -1.0)
    with pytest.raises(ValueError, match="shape"):
        contrastive_base_loss(zv, zt[:3], None, None, 1.0)


@pytest.mark.parametrize("seed", [0, 3])
def test_cyclip_matches_loop(seed):
    zv, zt = _feats(seed=seed)[:2]
    n = zv.shape[0]
    val, parts = cyclip_loss(zv, zt, inmodal_weight=0.3, crossmodal_weight=0.7, return_parts=True)
    ref_in = _ref_in_cyc(zv, zt, zv, zt) / n
    ref_cross = _ref_cross_cyc(zv, zt) / n
    assert parts["cyclip/inmodal"].item() == pytest.approx(ref_in, rel=1e-12)
    assert parts["cyclip/crossmodal"].item() == pytest.approx(ref_cross, rel=1e-12)
    assert val.item() == pytest.approx(0.3 * ref_in + 0.7 * ref_cross, rel=1e-12)
    mean = cyclip_loss(zv, zt, inmodal_weight=0.3, crossmodal_weight=0.7, reduction="mean")
    assert mean.item() == pytest.approx(val.item() / n, rel=1e-12)
    with pytest.raises(ValueError, match="reduction"):
        cyclip_loss(zv, zt, reduction="sum")


def test_cyclip_matches_cyclip_code_formula():
    """CyCLIP's train.py: (s*A - s*B).square().mean() / s**2 * batch_size, lambdas 0.25 / 0.25."""
    zv, zt = _feats(n=6, d=5, seed=7)[:2]
    s = 30.0
    lt = s * zv @ zt.T
    li = lt.T
    inmodal = (s * zv @ zv.T - s * zt @ zt.T).square().mean() / (s * s) * 6
    cross = (lt - li).square().mean() / (s * s) * 6
    assert cyclip_loss(zv, zt).item() == pytest.approx((0.25 * inmodal + 0.25 * cross).item(), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 2])
@pytest.mark.parametrize("t", [2.0, 0.5])
def test_separation_matches_loop(seed, t):
    zv, zt, ziv, ziva, zit, zita = _feats(seed=seed)[:6]
    ziv = ziv * 1.3  # un-normalised independent features are allowed
    val, parts = separation_loss(zv, zt, ziv, ziva, zit, zita, 5.0, t=t, return_parts=True)
    ref, ortho, con, uni = _ref_sep(zv, zt, ziv, ziva, zit, zita, 5.0, t)
    assert val.item() == pytest.approx(ref, rel=1e-12)
    assert parts["sep/ortho"].item() == pytest.approx(ortho, rel=1e-12)
    assert parts["sep/con"].item() == pytest.approx(con, rel=1e-12)
    assert parts["sep/uni"].item() == pytest.approx(uni, rel=1e-12, abs=1e-12)


def test_separation_uniformity_stable_for_large_t():
    zv, zt, ziv, ziva, zit, zita = _feats(n=8, d=6, seed=1)[:6]
    _, parts = separation_loss(zv, zt, ziv, ziva, zit, zita, 1.0, t=500.0, return_parts=True)
    # exp(-500 d^2) underflows off the diagonal: the sum is the 2N diagonal ones -> log(2N / N) = log 2.
    assert parts["sep/uni"].item() == pytest.approx(math.log(2.0), abs=1e-9)


@pytest.mark.parametrize("t", [0.25, 0.7])
def test_bridge_matches_loop(t):
    zv, zt, zva, zta = _feats(seed=4)[:4]
    assert brownian_bridge_loss(zv, zt, zva, t=t).item() == pytest.approx(_ref_bridge(zv, zt, zva, t), rel=1e-12)
    sym, parts = brownian_bridge_loss(zv, zt, zva, t=t, z_t_aug=zta, return_parts=True)
    assert parts["bridge/t"].item() == pytest.approx(_ref_bridge(zt, zv, zta, t), rel=1e-12)
    assert sym.item() == pytest.approx((_ref_bridge(zv, zt, zva, t) + _ref_bridge(zt, zv, zta, t)) / 2, rel=1e-12)


def test_bridge_mean_weights_the_image_end():
    zv, zt = _feats()[:2]
    assert torch.allclose(bridge_mean(zv, zt, 1e-12), zt, atol=1e-9)
    assert torch.allclose(bridge_mean(zv, zt, 1 - 1e-12), zv, atol=1e-9)
    mu = bridge_mean(zv, zt, 0.25)  # closer to the text end
    assert bool(((mu * zt).sum(1) > (mu * zv).sum(1)).all())


def test_bridge_zero_at_mean_and_bad_t():
    zv, zt = _feats()[:2]
    mu = F.normalize(0.25 * zv + 0.75 * zt, dim=1)
    assert brownian_bridge_loss(zv, zt, mu, t=0.25).item() == pytest.approx(0.0, abs=1e-15)
    for bad in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            brownian_bridge_loss(zv, zt, mu, t=bad)


@pytest.mark.parametrize("seed", [0, 5])
def test_gc_matches_loop(seed):
    zv, zt, zva, zta = _feats(seed=seed)[:4]
    n = zv.shape[0]
    assert geometric_consistency_loss(zv, zt).item() == pytest.approx(_ref_gc(zv, zt), rel=1e-12)
    val, parts = geometric_consistency_loss(zv, zt, zva, zta, return_parts=True)
    assert val.item() == pytest.approx(_ref_gc(zv, zt, zva, zta), rel=1e-12)
    assert parts["gc/plain"].item() == pytest.approx(_ref_gc(zv, zt), rel=1e-12)
    # one augmented view: the missing one is its clean feature
    one = geometric_consistency_loss(zv, zt, zva, None)
    assert one.item() == pytest.approx(_ref_gc(zv, zt, zva, zt), rel=1e-12)
    # reduction="mean": double sums over N^2, the single sum keeps 1/N
    mean, mparts = geometric_consistency_loss(zv, zt, zva, zta, reduction="mean", return_parts=True)
    expect = (parts["gc/plain"] + parts["gc/aug_v"] + parts["gc/aug_t"]) / n + parts["gc/aug_pair"]
    assert mean.item() == pytest.approx(expect.item(), rel=1e-12)


def test_gc_zero_when_modalities_coincide():
    zv, zva = _feats()[:2]
    assert geometric_consistency_loss(zv, zv.clone()).item() == pytest.approx(0.0, abs=1e-15)
    assert geometric_consistency_loss(zv, zv.clone(), zv.clone(), zv.clone()).item() == pytest.approx(0.0, abs=1e-15)
    # same geometry up to a common rotation is also consistent
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=D64, generator=torch.Generator().manual_seed(3)))
    assert geometric_consistency_loss(zv, zv @ q, zva, zva @ q).item() > 0  # pair term differs
    assert geometric_consistency_loss(zv, zv, zv @ q, zv @ q).item() == pytest.approx(0.0, abs=1e-12)


# ------------------------------------------------------------------------------------------------ gradients
def _req(*xs):
    return tuple(x.clone().requires_grad_(True) for x in xs)


def test_gradcheck_all_functions():
    zv, zt, zva, zta, ziv, ziva, zit, zita = _feats(n=4, d=3, seed=11)
    scale = torch.tensor(3.0, dtype=D64)
    opts = dict(eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda *a: contrastive_base_loss(*a), _req(zv, zt, zva, zta, scale), **opts)
    assert torch.autograd.gradcheck(lambda a, b: cyclip_loss(a, b, inmodal_weight=0.4, crossmodal_weight=0.9),
                                    _req(zv, zt), **opts)
    assert torch.autograd.gradcheck(lambda *a: separation_loss(*a, t=2.0),
                                    _req(zv, zt, ziv, ziva, zit, zita, scale), **opts)
    assert torch.autograd.gradcheck(lambda a, b, c, d: brownian_bridge_loss(a, b, c, 0.25, z_t_aug=d),
                                    _req(zv, zt, zva, zta), **opts)
    assert torch.autograd.gradcheck(geometric_consistency_loss, _req(zv, zt, zva, zta), **opts)


def test_gradcheck_module_all_regularizers():
    zv, zt, zva, zta, ziv, ziva, zit, zita = _feats(n=4, d=3, seed=12)
    loss = ModalityStructureLoss("clip+inmodal", {"cyclip": 0.5, "separation": 0.3, "bridge": 2.0, "gc": 0.7},
                                 bridge_symmetric=True)

    def f(zv, zt, zva, zta, ziv, ziva, zit, zita, s):
        return loss(zv, zt, s, z_v_aug=zva, z_t_aug=zta, zi_v=ziv, zi_v_aug=ziva, zi_t=zit, zi_t_aug=zita)[0]

    inputs = _req(zv, zt, zva, zta, ziv, ziva, zit, zita, torch.tensor(2.5, dtype=D64))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_sym_gram_first_and_second_derivatives():
    x = torch.randn(5, 3, dtype=D64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.allclose(_gram(x), x @ x.T)
    assert torch.autograd.gradcheck(_gram, (x,))
    assert torch.autograd.gradgradcheck(_gram, (x,))


# ------------------------------------------------------------------------------------------------ the module
def test_module_equals_weighted_sum_of_functions():
    zv, zt, zva, zta, ziv, ziva, zit, zita = _feats(n=6, d=5, seed=21)
    w = {"cyclip": 0.5, "separation": 0.3, "bridge": 2.0, "gc": 0.7}
    s = 7.0
    total, parts = ModalityStructureLoss("clip+inmodal", w)(zv, zt, s, z_v_aug=zva, z_t_aug=zta, zi_v=ziv,
                                                             zi_v_aug=ziva, zi_t=zit, zi_t_aug=zita)
    expect = (contrastive_base_loss(zv, zt, zva, zta, s) + 0.5 * cyclip_loss(zv, zt)
              + 0.3 * separation_loss(zv, zt, ziv, ziva, zit, zita, s)
              + 2.0 * brownian_bridge_loss(zv, zt, zva) + 0.7 * geometric_consistency_loss(zv, zt, zva, zta))
    assert total.item() == pytest.approx(expect.item(), rel=1e-12)
    assert parts["total"].item() == pytest.approx(expect.item(), rel=1e-12)
    for key in ("con", "v2t", "t2v", "v2v", "t2t", "cyclip", "sep", "sep/uni", "bridge", "gc", "gc/aug"):
        assert key in parts and not parts[key].requires_grad
    assert total.requires_grad is False  # inputs do not require grad here
    # base "clip" + gc without augmentation
    total2, parts2 = ModalityStructureLoss("clip", {"gc": 1.0}, gc_use_aug=False)(zv, zt, s, z_v_aug=zva,
                                                                                  z_t_aug=zta)
    expect2 = contrastive_base_loss(zv, zt, None, None, s) + geometric_consistency_loss(zv, zt)
    assert total2.item() == pytest.approx(expect2.item(), rel=1e-12)
    assert "v2v" not in parts2


def test_module_arguments_and_errors():
    with pytest.raises(ValueError) as err:
        ModalityStructureLoss("clip", {"cyclip": 1.0, "vicreg": 1.0})
    assert "vicreg" in str(err.value) and all(name in str(err.value) for name in REGULARIZERS)
    with pytest.raises(ValueError, match="clip\\+inmodal"):
        ModalityStructureLoss("simclr")
    assert set(BASES) == {"clip", "clip+inmodal"}
    with pytest.raises(ValueError, match=">= 0"):
        ModalityStructureLoss("clip", {"gc": -1.0})
    assert ModalityStructureLoss("clip", ["gc", "bridge"]).weights == {"gc": 1.0, "bridge": 1.0}
    assert ModalityStructureLoss("clip", {"gc": 0.0}).weights == {}
    zv, zt, zva = _feats()[:3]
    with pytest.raises(ValueError, match="z_v_aug and z_t_aug"):
        ModalityStructureLoss("clip+inmodal")(zv, zt, 1.0)
    with pytest.raises(ValueError, match="separation"):
        ModalityStructureLoss("clip", {"separation": 1.0})(zv, zt, 1.0)
    with pytest.raises(ValueError, match="bridge"):
        ModalityStructureLoss("clip", {"bridge": 1.0})(zv, zt, 1.0)


def test_module_nan_guard_names_the_term():
    zv, zt, zva, zta = _feats()[:4]
    zva = zva.clone()
    zva[0, 0] = float("nan")
    loss = ModalityStructureLoss("clip", {"bridge": 1.0})
    with pytest.raises(NonFiniteError, match="bridge"):
        loss(zv, zt, 1.0, z_v_aug=zva, z_t_aug=zta)
    total, _ = ModalityStructureLoss("clip", {"bridge": 1.0}, check_finite=False)(zv, zt, 1.0, z_v_aug=zva)
    assert torch.isnan(total)


def test_module_backward_float32_and_half_inputs():
    g = torch.Generator().manual_seed(0)
    feats = [_unit(16, 8, g, torch.float32) for _ in range(8)]
    leaves = [f.clone().requires_grad_(True) for f in feats]
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = ModalityStructureLoss("clip+inmodal", {"cyclip": 1, "separation": 1, "bridge": 1, "gc": 1})
    total, parts = loss(leaves[0], leaves[1], log_scale.exp(), z_v_aug=leaves[2], z_t_aug=leaves[3],
                        zi_v=leaves[4], zi_v_aug=leaves[5], zi_t=leaves[6], zi_t_aug=leaves[7])
    total.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)
    assert log_scale.grad is not None
    # half / bfloat16 inputs (AMP) are computed in float32
    half = [f.to(torch.bfloat16) for f in feats]
    total16, _ = loss(half[0], half[1], 14.0, z_v_aug=half[2], z_t_aug=half[3], zi_v=half[4], zi_v_aug=half[5],
                      zi_t=half[6], zi_t_aug=half[7])
    assert total16.dtype == torch.float32
    ref, _ = loss(*[h.float() for h in half[:2]], 14.0, z_v_aug=half[2].float(), z_t_aug=half[3].float(),
                  zi_v=half[4].float(), zi_v_aug=half[5].float(), zi_t=half[6].float(), zi_t_aug=half[7].float())
    assert total16.item() == pytest.approx(ref.item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total_ac, _ = loss(*feats[:2], 14.0, z_v_aug=feats[2], z_t_aug=feats[3], zi_v=feats[4], zi_v_aug=feats[5],
                           zi_t=feats[6], zi_t_aug=feats[7])
    assert total_ac.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_module_on_cuda_matches_cpu():
    feats = _feats(n=32, d=16, seed=3, dtype=torch.float32)
    loss = ModalityStructureLoss("clip+inmodal", {"cyclip": 1, "separation": 1, "bridge": 1, "gc": 1})
    kw = lambda fs: dict(z_v_aug=fs[2], z_t_aug=fs[3], zi_v=fs[4], zi_v_aug=fs[5], zi_t=fs[6], zi_t_aug=fs[7])
    cpu, _ = loss(feats[0], feats[1], 10.0, **kw(feats))
    gpu_feats = [f.cuda() for f in feats]
    gpu, _ = loss(gpu_feats[0], gpu_feats[1], 10.0, **kw(gpu_feats))
    assert gpu.device.type == "cuda"
    assert gpu.item() == pytest.approx(cpu.item(), rel=1e-4)
