"""ClassBalancedBatchSampler: class counts per batch, determinism, epochs, DDP sharding, errors."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from contrastive_repro.data import ClassBalancedBatchSampler


def _labels(sizes):
    return np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])


def _check_batch(batch, labels, p, m):
    assert len(batch) == p * m
    counts = Counter(int(labels[i]) for i in batch)
    assert len(counts) == p, counts
    assert set(counts.values()) == {m}, counts


def test_every_batch_has_p_classes_with_m_samples():
    labels = _labels([10, 7, 12, 9, 8, 11])
    s = ClassBalancedBatchSampler(labels, batch_size=12, samples_per_class=4, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == len(labels) // 12
    for b in batches:
        _check_batch(b, labels, 3, 4)
        assert len(set(b)) == len(b)  # classes larger than m: no repeats within a class
        assert all(isinstance(i, int) for i in b)


def test_classes_per_batch_form_and_num_batches():
    labels = _labels([5] * 8)
    s = ClassBalancedBatchSampler(labels, classes_per_batch=4, samples_per_class=2, num_batches=25, seed=1)
    assert s.batch_size == 8 and len(s) == 25
    batches = list(s)
    for b in batches:
        _check_batch(b, labels, 4, 2)
    # the class order cycles through permutations, so classes are drawn (almost) equally often
    per_class = Counter(c for b in batches for c in {int(labels[i]) for i in b})
    assert max(per_class.values()) - min(per_class.values()) <= 2


def test_small_classes_are_sampled_with_replacement():
    labels = _labels([1, 2, 10, 10])
    s = ClassBalancedBatchSampler(labels, batch_size=16, samples_per_class=4, num_batches=20, seed=0)
    for b in s:
        _check_batch(b, labels, 4, 4)
    # class 0 has one item: it appears 4 times
    assert Counter(next(iter(s)))[0] == 4


def test_deterministic_given_seed_and_epoch():
    labels = _labels([6] * 10)
    a = ClassBalancedBatchSampler(labels, batch_size=12, samples_per_class=3, seed=7)
    b = ClassBalancedBatchSampler(labels, batch_size=12, samples_per_class=3, seed=7)
    assert list(a) == list(b) and list(a) == list(a)  # re-iterating without set_epoch repeats the epoch
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != e0
    c = ClassBalancedBatchSampler(labels, batch_size=12, samples_per_class=3, seed=8)
    assert list(c) != e0


def test_ddp_sharding_partitions_the_global_batches():
    labels = _labels([4] * 12)
    world = 3
    shards = [ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=2, num_batches=10, seed=5,
                                        rank=r, world_size=world) for r in range(world)]
    for s in shards:
        s.set_epoch(2)
    lists = [list(s) for s in shards]
    assert all(len(lst) == len(shards[0]) == 4 for lst in lists)  # ceil(10 / 3) each
    glob = shards[0].global_batches()
    assert len(glob) == 12
    for r in range(world):
        assert lists[r] == glob[r::world]
    assert lists[0] != lists[1]
    single = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=2, num_batches=12, seed=5)
    single.set_epoch(2)
    assert list(single) == glob  # every rank derives the same global epoch


def test_works_as_dataloader_batch_sampler():
    labels = torch.tensor(_labels([6, 6, 6, 6]))
    ds = TensorDataset(torch.arange(len(labels)), labels)
    s = ClassBalancedBatchSampler(labels, batch_size=6, samples_per_class=3, seed=0)
    for idx, lab in DataLoader(ds, batch_sampler=s):
        assert idx.shape == (6,) and sorted(Counter(lab.tolist()).values()) == [3, 3]


@pytest.mark.parametrize("kwargs,match", [
    (dict(labels=[0, 0, 0, 0], batch_size=4, samples_per_class=2), "at least 2 classes"),
    (dict(labels=[0, 1, 2, 0, 1, 2], batch_size=5, samples_per_class=2), "multiple of samples_per_class"),
    (dict(labels=[0, 1, 2, 0, 1, 2], batch_size=2, samples_per_class=2), "at least 2 classes"),
    (dict(labels=[0, 1, 0, 1], batch_size=6, samples_per_class=2), "only 2 classes"),
    (dict(labels=[0, 1, 0, 1], samples_per_class=2), "batch_size or classes_per_batch"),
    (dict(labels=[0, 1, 0, 1], batch_size=4, samples_per_class=2, rank=2, world_size=2), "rank"),
    (dict(labels=[0.5, 1.0], batch_size=4, samples_per_class=2), "integers"),
])
def test_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassBalancedBatchSampler(**kwargs)
