"""Two-view augmentation on small grayscale / RGB tensors and TwoViewDataset."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from contrastive_repro.data import (EmptyDatasetError, TensorImageDataset, TwoViewDataset, TwoViewTransform,
                                    apply_per_sample, eval_transform, simclr_transform)


def _gray(n=6, s=28):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, s, s), dtype=torch.uint8, generator=g)


def _rgb(n=6, s=32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, generator=g)


def test_single_view_shapes_dtype_range():
    t = simclr_transform(24, channels=1, flip=False)
    out = t(_gray()[0].unsqueeze(0))
    assert type(out) is torch.Tensor  # a plain tensor, not a tv_tensors.Image
    assert out.shape == (1, 24, 24) and out.dtype == torch.float32
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    t3 = simclr_transform(16, channels=3)
    out3 = t3(_rgb()[0])
    assert out3.shape == (3, 16, 16) and out3.dtype == torch.float32
    out_f = t3(_rgb()[0].float() / 255)  # float input in [0,1] works too
    assert out_f.shape == (3, 16, 16) and out_f.dtype == torch.float32
    norm = simclr_transform(16, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(_rgb()[0])
    assert float(norm.min()) < 0


def test_batched_per_sample_randomness_and_seeding():
    x = _rgb(1).repeat(8, 1, 1, 1)  # eight copies of one image
    two = TwoViewTransform(simclr_transform(16, channels=3))
    torch.manual_seed(0)
    v1, v2 = two(x)
    assert v1.shape == v2.shape == (8, 3, 16, 16) and type(v1) is torch.Tensor
    assert not torch.allclose(v1[0], v1[1])  # each sample gets its own random parameters
    assert not torch.allclose(v1, v2)
    torch.manual_seed(0)
    w1, w2 = two(x)
    assert torch.equal(v1, w1) and torch.equal(v2, w2)


def test_apply_per_sample_shapes():
    t = eval_transform(20)
    assert apply_per_sample(t, _gray()[0]).shape == (1, 20, 20)
    assert apply_per_sample(t, _gray().unsqueeze(1)).shape == (6, 1, 20, 20)
    assert torch.allclose(apply_per_sample(eval_transform(), _gray()[:2].unsqueeze(1)),
                          _gray()[:2].unsqueeze(1).float() / 255)
    with pytest.raises(ValueError, match="expected"):
        apply_per_sample(t, torch.zeros(1, 1, 1, 2, 2))


def test_two_view_dataset_returns_views_and_index():
    base = _gray(10)
    ds = TwoViewDataset(base, simclr_transform(20, channels=1), labels=torch.arange(10) % 2)
    v1, v2, i = ds[7]
    assert v1.shape == v2.shape == (1, 20, 20) and i == 7 and not torch.equal(v1, v2)
    loader = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    b1, b2, idx = next(iter(loader))
    assert b1.shape == (4, 1, 20, 20) and idx.dtype == torch.int64 and len(set(idx.tolist())) == 4
    assert ds.labels.tolist()[:3] == [0, 1, 0]


def test_two_view_dataset_over_a_dataset_of_pil_images():
    base = TensorImageDataset(_rgb(5), [0, 1, 2, 0, 1], as_pil=True)
    assert isinstance(base[0][0], Image.Image)
    ds = TwoViewDataset(base, simclr_transform(12, channels=3))
    v1, v2, i = ds[2]
    assert v1.shape == (3, 12, 12) and v1.dtype == torch.float32 and i == 2


def test_errors():
    with pytest.raises(EmptyDatasetError):
        TwoViewDataset(torch.zeros(0, 8, 8, dtype=torch.uint8), eval_transform())
    with pytest.raises(ValueError, match="channels"):
        simclr_transform(8, channels=2)
    with pytest.raises(ValueError, match="labels"):
        TwoViewDataset(_gray(3), eval_transform(), labels=[0, 1])
