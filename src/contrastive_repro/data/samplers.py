"""Batch samplers for metric learning.

:class:`ClassBalancedBatchSampler` builds "P x K" batches: ``classes_per_batch`` distinct classes, ``samples_per_class``
items of each. Pass it as ``DataLoader(ds, batch_sampler=sampler)``.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ._common import as_label_tensor

__all__ = ["ClassBalancedBatchSampler"]


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yield index lists holding ``samples_per_class`` (m) items from each of ``batch_size // m`` distinct classes.

    Args:
        labels: integer class label per dataset item (list, array or tensor).
        batch_size: items per batch *on each rank*; must be a multiple of ``samples_per_class``. Alternatively give
            ``classes_per_batch`` (then ``batch_size = classes_per_batch * samples_per_class``).
        samples_per_class: m. A class with fewer than m items is sampled with replacement; otherwise its m items
            in a batch are distinct.
        num_batches: batches per epoch summed over all ranks; default ``len(labels) // batch_size`` (one pass's
            worth of items). Each rank gets ``ceil(num_batches / world_size)`` batches.
        seed: base seed. The batches are a pure function of ``(labels, seed, epoch, sizes)``: call
            :meth:`set_epoch` each epoch for new batches (as with ``DistributedSampler``); without it every
            iteration repeats the same batches.
        rank, world_size: shard for DDP. Every rank generates the same global list of batches and takes
            ``batches[rank::world_size]``; ``None`` reads them from ``torch.distributed`` when initialised
            (else 0 and 1).

    Classes are visited in a shuffled order that is reshuffled once exhausted, so over an epoch every class is
    drawn about equally often (within a batch the classes are always distinct).

    Raises ``ValueError`` when the labels hold fewer than 2 classes, ``batch_size % samples_per_class != 0``, fewer
    than 2 classes per batch would result, or more classes per batch are asked for than exist.
    """

    def __init__(self, labels: Any, batch_size: int | None = None, samples_per_class: int = 2, *,
                 classes_per_batch: int | None = None, num_batches: int | None = None, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        lab = as_label_tensor(labels).numpy()
        m = int(samples_per_class)
        if m < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if batch_size is None and classes_per_batch is None:
            raise ValueError("give batch_size or classes_per_batch")
        if batch_size is None:
            batch_size = int(classes_per_batch) * m
        if batch_size % m != 0:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of samples_per_class ({m})")
        p = batch_size // m
        if classes_per_batch is not None and int(classes_per_batch) != p:
            raise ValueError(f"classes_per_batch ({classes_per_batch}) != batch_size // samples_per_class ({p})")
        classes, inverse = np.unique(lab, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"ClassBalancedBatchSampler needs at least 2 classes, the labels hold {len(classes)}")
        if p < 2:
            raise ValueError(f"a batch must hold at least 2 classes: batch_size ({batch_size}) // samples_per_class "
                             f"({m}) = {p}")
        if p > len(classes):
            raise ValueError(f"{p} classes per batch requested but the labels hold only {len(classes)} classes")
        if rank is None or world_size is None:
            dist_rank, dist_world = 0, 1
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                dist_rank, dist_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            rank = dist_rank if rank is None else rank
            world_size = dist_world if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_batches is None:
            num_batches = max(1, len(lab) // batch_size)
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.classes = classes
        self.members = [np.flatnonzero(inverse == c) for c in range(len(classes))]
        self.batch_size, self.samples_per_class, self.classes_per_batch = batch_size, m, p
        self.num_batches, self.seed, self.rank, self.world_size = int(num_batches), int(seed), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.num_batches // self.world_size)

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All ``len(self) * world_size`` batches of an epoch, before sharding."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, int(epoch)])
        n_classes, p, m = len(self.members), self.classes_per_batch, self.samples_per_class
        order, pos = rng.permutation(n_classes), 0
        batches = []
        for _ in range(len(self) * self.world_size):
            if pos + p <= n_classes:
                chosen = order[pos:pos + p]
                pos += p
            else:  # take the rest of this permutation, then fill from a fresh one without repeating a class
                rest = order[pos:]
                order = rng.permutation(n_classes)
                fill = order[~np.isin(order, rest)][:p - len(rest)]
                chosen = np.concatenate([rest, fill])
                order = np.concatenate([fill, order[~np.isin(order, fill)]])
                pos = len(fill)
            batch = []
            for c in chosen:
                idx = self.members[c]
                batch.extend(idx[rng.choice(len(idx), size=m, replace=len(idx) < m)].tolist())
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.global_batches()[self.rank::self.world_size]
