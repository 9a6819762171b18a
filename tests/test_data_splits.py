"""split_by_class / split_by_item: disjointness, stratification, determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive_repro.data import split_by_class, split_by_item


def _labels():
    return torch.tensor(np.repeat(np.arange(10), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))


def test_split_by_class_disjoint_and_complete():
    y = _labels()
    tr, te = split_by_class(y, test_fraction=0.3, seed=0)
    assert tr.dtype == torch.int64 and torch.all(tr[1:] > tr[:-1])
    assert sorted(tr.tolist() + te.tolist()) == list(range(len(y)))
    assert set(y[tr].tolist()).isdisjoint(y[te].tolist())
    assert len(set(y[te].tolist())) == 3
    tr2, te2 = split_by_class(y, test_fraction=0.3, seed=0)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    seeds = {tuple(split_by_class(y, seed=s)[1].tolist()) for s in range(6)}
    assert len(seeds) > 1
    _, te3 = split_by_class(y, n_test_classes=9, seed=1)
    assert len(set(y[te3].tolist())) == 9


def test_split_by_item_stratified():
    y = _labels()
    tr, te = split_by_item(y, test_fraction=0.2, seed=0)
    assert sorted(tr.tolist() + te.tolist()) == list(range(len(y)))
    counts_te = torch.bincount(y[te], minlength=10).tolist()
    counts_tr = torch.bincount(y[tr], minlength=10).tolist()
    assert counts_te == [0, 1, 1, 1, 1, 1, 1, 2, 2, 2]  # max(1, round(0.2 n)), keeping >= 1 in train
    assert all(c >= 1 for c in counts_tr)
    assert torch.equal(split_by_item(y, 0.2, seed=0)[1], te)
    assert not torch.equal(split_by_item(y, 0.2, seed=1)[1], te)
    _, te1 = split_by_item(y, n_test_per_class=1, seed=0)
    assert torch.bincount(y[te1], minlength=10).tolist() == [0] + [1] * 9


def test_split_errors():
    with pytest.raises(ValueError, match="at least 2 classes"):
        split_by_class([3, 3, 3])
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_class([0, 1], test_fraction=1.5)
    with pytest.raises(ValueError, match="integers"):
        split_by_item([0.5, 1.5])
