"""One small training loop for every experiment: seeding, AMP, gradient accumulation, a NaN guard, DDP, and
checkpoints that resume *exactly*.

Usage::

    from contrastive_repro.training import TrainConfig, EpochBatches, epoch_index_batches, train

    def make_epoch(epoch):                       # deterministic in (seed, epoch): required for exact resume
        for idx in epoch_index_batches(len(x), batch_size=64, epoch=epoch, seed=0):
            yield x[idx], y[idx]

    def step_fn(model, batch):                   # -> loss, (loss, {metrics}) or {"loss": loss, ...}
        xb, yb = batch
        return loss_fn(model(xb), yb)

    cfg = TrainConfig(max_steps=1000, lr=1e-3, warmup_steps=50, ckpt_dir="checkpoints/run1", ckpt_every=100)
    history = train(model, step_fn, EpochBatches(make_epoch), cfg, state_objects={"loss": loss_fn})

Steps are counted from 1: step ``k`` is the ``k``-th optimizer update; a checkpoint ``step_00000010.pt`` holds the
state after 10 updates. One step draws ``grad_accum_steps`` micro-batches from the data source, averages their
losses' gradients (``loss / grad_accum_steps`` per micro-batch), clips, steps the optimizer and the LR schedule.

Exact resume. If ``cfg.ckpt_dir`` holds a checkpoint, :meth:`Trainer.fit` loads the newest readable one and
continues; a run killed at any moment (even with SIGKILL) and started again ends with the same parameters and
history as an uninterrupted run on CPU. A checkpoint stores the model, optimizer, LR scheduler, GradScaler, step,
history, config, the RNG states of python/numpy/torch/CUDA of every rank, the position of the data source and the
``state_dict()`` of every extra object in ``state_objects``. For this to be exact, the data must be a function of
the position: use :class:`IndexedBatches` (``batch_fn(i)`` for the ``i``-th micro-batch) or :class:`EpochBatches`
(``make_epoch(epoch)`` seeded by the epoch, e.g. with :func:`epoch_index_batches` or a ``DataLoader`` given a
``torch.Generator`` seeded from the epoch). Random augmentation inside the step may use the global RNGs (they are
checkpointed). On GPU, nondeterministic kernels make resumed runs close but not bitwise equal.

Distributed. Call :func:`contrastive_repro.distributed.init_distributed` first; the trainer then wraps the model in
``DistributedDataParallel`` (``cfg.ddp``), seeds each rank with ``seed + rank`` (different augmentations, same
initial weights because DDP broadcasts rank 0's), and only rank 0 writes checkpoints (all ranks read them; the
directory must be shared). The data source must shard by rank itself (``epoch_index_batches(..., rank, world_size)``).
The step function must call ``model(...)`` (DDP hooks only run in ``forward``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import logging
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

from . import distributed as cr_dist
from .io import atomic_torch_save
from .utils import check_finite, get_device, seed_everything

__all__ = ["CheckpointMismatchError", "TrainConfig", "StepContext", "BatchSource", "IndexedBatches", "EpochBatches", "epoch_index_batches",
           "Trainer", "train", "find_checkpoints", "latest_checkpoint", "load_checkpoint", "unwrap_model",
           "CHECKPOINT_FORMAT"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "contrastive_repro.training/v1"
_CKPT_RE = re.compile(r"^step_(\d{8,})\.pt$")
# config fields that may change between a run and its resumption: they do not change the result. Any other
# difference (max_steps included: it shapes the LR schedule) makes resuming refuse the checkpoint.
_RESUMABLE_CHANGES = {"log_every", "ckpt_every", "keep_last", "progress", "device", "eval_every", "ckpt_dir",
                      "resume"}


class CheckpointMismatchError(ValueError):
    """The checkpoint folder holds a run made with another configuration (or ``run_key``): resuming it would
    return or continue a different experiment."""


@dataclass
class TrainConfig:
    """Everything the loop needs besides the model, the step function and the data.

    ``amp``: ``"auto"`` = bf16 autocast on CUDA (fp16 + GradScaler on GPUs without bf16), off on CPU;
    ``"bf16"`` = bf16 autocast on any device; ``"fp16"`` = fp16 autocast + GradScaler (CUDA only); ``"off"``.
    ``lr_schedule``: ``"cosine"`` (linear warmup then cosine to ``min_lr_ratio * lr``), ``"linear"``, ``"constant"``
    (each after ``warmup_steps`` of linear warmup). ``ckpt_dir=None`` disables checkpoints; ``ckpt_every=0`` writes
    only the final one. ``keep_last``: checkpoints kept on disk (the newest ``k``).
    """

    max_steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # "adamw" | "sgd" (used when no optimizer is passed)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd only
    warmup_steps: int = 0
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_accum_steps: int = 1
    amp: str = "auto"
    grad_clip: float | None = None
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when an eval_fn is given)
    ckpt_every: int = 0
    ckpt_dir: str | None = None
    keep_last: int = 2
    resume: bool = True
    seed: int = 0
    device: str | None = "auto"
    progress: bool = True
    ddp: bool = True
    find_unused_parameters: bool = False
    run_key: str = ""

    def __post_init__(self):
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {self.amp!r}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine', 'linear' or 'constant', got {self.lr_schedule!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {self.keep_last}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ValueError(f"grad_clip must be > 0 (a maximum gradient norm) or None, got {self.grad_clip!r}")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"min_lr_ratio must be in [0, 1] (final LR / peak LR), got {self.min_lr_ratio!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        self.betas = tuple(self.betas)
        if self.ckpt_dir is not None:
            self.ckpt_dir = str(self.ckpt_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class StepContext:
    """Passed as third argument to step functions that accept one: where the loop is."""

    step: int  # the optimizer step being computed, 1-based
    micro_step: int  # index of the micro-batch within the step, 0-based
    grad_accum_steps: int
    trainer: "Trainer"


# ----------------------------------------------------------------------------------------------- data sources
@runtime_checkable
class BatchSource(Protocol):
    """A resumable stream of micro-batches: ``next_batch()`` plus ``state_dict()``/``load_state_dict()``."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping) -> None: ...


class IndexedBatches:
    """Stateless data: ``batch_fn(i)`` returns the ``i``-th micro-batch (``i = (step - 1) * grad_accum + k``).

    The position is just ``i``, so resuming is free. Make ``batch_fn`` a pure function of ``i`` (and fixed seeds).
    """

    def __init__(self, batch_fn: Callable[[int], Any], start: int = 0):
        self.batch_fn, self.index = batch_fn, int(start)

    def next_batch(self):
        batch = self.batch_fn(self.index)
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": "indexed", "index": self.index}

    def load_state_dict(self, state: Mapping) -> None:
        self.index = int(state["index"])


class EpochBatches:
    """Epochs of micro-batches from ``make_epoch(epoch) -> iterable``, restarted when exhausted.

    The saved position is ``(epoch, offset)``: on resume the epoch's iterable is rebuilt and ``offset`` items are
    skipped (or, with ``seekable=True``, ``make_epoch(epoch, offset)`` is asked to start there). ``make_epoch`` must
    return the same sequence for the same epoch: seed its shuffling with the epoch (:func:`epoch_index_batches`, a
    ``DataLoader(..., generator=torch.Generator().manual_seed(seed + epoch))`` or ``DistributedSampler.set_epoch``).
    """

    def __init__(self, make_epoch: Callable[..., Iterable], seekable: bool = False, start_epoch: int = 0):
        self.make_epoch, self.seekable = make_epoch, seekable
        self.epoch, self.offset = int(start_epoch), 0
        self._it: Iterator | None = None

    def _open(self) -> Iterator:
        if self.seekable:
            return iter(self.make_epoch(self.epoch, self.offset))
        return itertools.islice(iter(self.make_epoch(self.epoch)), self.offset, None)

    def next_batch(self):
        for attempt in range(2):
            if self._it is None:
                self._it = self._open()
            try:
                batch = next(self._it)
            except StopIteration:
                if attempt == 1 or self.offset == 0:
                    raise ValueError(f"EpochBatches: epoch {self.epoch} yielded no batches") from None
                self.epoch, self.offset, self._it = self.epoch + 1, 0, None
                continue
            self.offset += 1
            return batch
        raise AssertionError("unreachable")

    def state_dict(self) -> dict:
        return {"kind": "epoch", "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: Mapping) -> None:
        self.epoch, self.offset, self._it = int(state["epoch"]), int(state["offset"]), None


def epoch_index_batches(num_samples: int, batch_size: int, epoch: int, seed: int = 0, rank: int = 0,
                        world_size: int = 1, shuffle: bool = True, drop_last: bool = True) -> list[torch.Tensor]:
    """Index batches of one epoch, shuffled by a generator seeded with ``(seed, epoch)``, sharded by rank.

    Every rank draws the same permutation and takes the ``rank``-th of every ``world_size`` consecutive batches,
    so all ranks get equally many equal-size batches (``drop_last=True``), as :func:`~distributed.gather_features`
    requires. ``batch_size`` is per rank.
    """
    if num_samples <= 0 or batch_size <= 0:
        raise ValueError(f"need num_samples > 0 and batch_size > 0, got {num_samples}, {batch_size}")
    if shuffle:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        perm = torch.randperm(num_samples, generator=g)
    else:
        perm = torch.arange(num_samples)
    global_bs = batch_size * world_size
    n_full = num_samples // global_bs
    batches = [perm[i * global_bs + rank * batch_size: i * global_bs + (rank + 1) * batch_size]
               for i in range(n_full)]
    rest = perm[n_full * global_bs:]
    if not drop_last and len(rest):
        shard = rest[rank::world_size]
        if len(shard):
            batches.append(shard)
    if not batches:
        raise ValueError(f"no full batch: {num_samples} samples < batch_size {batch_size} x world_size {world_size}")
    return batches


def _as_source(data) -> BatchSource:
    if isinstance(data, BatchSource):
        return data
    if callable(data):
        return IndexedBatches(data)
    raise TypeError("data must be a BatchSource (IndexedBatches, EpochBatches, or an object with next_batch/"
                    f"state_dict/load_state_dict) or a callable batch_fn(i); got {type(data).__name__}")


# ------------------------------------------------------------------------------------------------ checkpoints
def find_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the finished checkpoints in ``ckpt_dir``, oldest first (temp files are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    found = find_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :class:`Trainer` (pickle: only load files you wrote)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
        else:
            warnings.warn("checkpoint has CUDA RNG states for a different number of GPUs; not restored",
                          RuntimeWarning, stacklevel=3)


def _to_device(obj, device: torch.device):
    """Move tensors, also inside (named)tuples, lists and dicts, to ``device``; leave everything else alone."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _scalar(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().item())
    return float(v)


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    warmup, total, floor = cfg.warmup_steps, max(cfg.max_steps, 1), cfg.min_lr_ratio

    def factor(i: int) -> float:  # i = number of optimizer steps already taken
        if warmup > 0 and i < warmup:
            return (i + 1) / warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (i - warmup) / max(1, total - warmup))
        if cfg.lr_schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _default_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW/SGD with weight decay on >=2-D weights only (biases, norm scales, class tokens and the temperature
    ``logit_scale`` are not decayed), as in nanoGPT / open_clip."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "logit_scale" not in name and "logit_bias" not in name else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


# ------------------------------------------------------------------------------------------------------ trainer
class Trainer:
    """The training loop; :func:`train` is ``Trainer(...).fit()``.

    ``step_fn(model, batch)`` or ``step_fn(model, batch, ctx: StepContext)`` returns a scalar loss, a tuple
    ``(loss, {name: scalar})`` or a dict with key ``"loss"`` (other entries are logged). It runs under autocast.
    ``data``: a :class:`BatchSource` or a callable ``batch_fn(i)`` (wrapped in :class:`IndexedBatches`); batches
    are moved to the device (tensors inside tuples, lists, dicts).
    ``optimizer`` / ``scheduler``: instances built on ``model``'s parameters, or None for AdamW/SGD from ``cfg`` and
    the warmup + cosine/linear/constant schedule (the scheduler is stepped once per optimizer step).
    ``state_objects``: ``{name: obj}`` with ``state_dict()`` / ``load_state_dict()`` saved in checkpoints (e.g. a
    loss holding per-sample auxiliary variables, a memory bank).
    ``callbacks``: ``cb(trainer, record)`` after every step (before the checkpoint); call :meth:`stop` to end early.
    ``eval_fn(model) -> {name: scalar}``: run under ``torch.no_grad()`` in eval mode every ``cfg.eval_every`` steps
    and after the last step; merged into that step's record.

    NaN guard: a non-finite loss (checked per micro-batch, before backward) or gradient norm (after accumulation
    and unscaling, before the optimizer step) raises :class:`~contrastive_repro.utils.NonFiniteError` naming the
    step, so the parameters stay those of the last good step. Under torchrun the failing rank's exit makes the
    launcher stop the others. State objects are restored from checkpoints loaded with ``map_location="cpu"``
    (``nn.Module`` state objects copy into their own device).
    """

    def __init__(self, model: nn.Module, step_fn: Callable, data, cfg: TrainConfig | None = None, *,
                 optimizer: torch.optim.Optimizer | None = None, scheduler=None,
                 state_objects: Mapping[str, Any] | None = None, callbacks: Sequence[Callable] = (),
                 eval_fn: Callable[[nn.Module], Mapping[str, Any]] | None = None,
                 dist_info: cr_dist.DistInfo | None = None):
        self.cfg = cfg if cfg is not None else TrainConfig()
        self.dist = dist_info if dist_info is not None else cr_dist.get_dist_info()
        self.device = self.dist.device if self.dist.is_distributed else get_device(self.cfg.device)
        self.step_fn = step_fn
        self._step_fn_takes_ctx = self._accepts_ctx(step_fn)
        self.data = _as_source(data)
        self.state_objects = dict(state_objects or {})
        for name, obj in self.state_objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"state_objects[{name!r}] has no state_dict/load_state_dict")
        self.callbacks = list(callbacks)
        self.eval_fn = eval_fn
        self.step = 0
        self.history: list[dict] = []
        self._stop = False

        self.module = model.to(self.device)
        if self.dist.is_distributed and self.cfg.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.model = DDP(self.module, find_unused_parameters=self.cfg.find_unused_parameters, **kwargs)
        else:
            self.model = self.module
        self.optimizer = optimizer if optimizer is not None else _default_optimizer(self.module, self.cfg)
        self.scheduler = scheduler if scheduler is not None else torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(self.cfg))
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    # ------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _accepts_ctx(fn: Callable) -> bool:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return False
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return len(positional) >= 3

    def _amp_dtype(self) -> torch.dtype | None:
        amp, dev = self.cfg.amp, self.device.type
        if amp == "off" or (amp == "auto" and dev != "cuda"):
            return None
        if amp == "fp16":
            if dev != "cuda":
                raise ValueError("amp='fp16' needs CUDA; use amp='bf16' or 'off' on CPU")
            return torch.float16
        if amp == "auto" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def is_main(self) -> bool:
        return self.dist.rank == 0

    def stop(self) -> None:
        """Ask the loop to stop after the current step (a final checkpoint is still written)."""
        self._stop = True

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue this run (this rank's RNG only; see :meth:`save_checkpoint`)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if hasattr(self.scheduler, "state_dict") else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": self.data.state_dict(),
            "rng": [_rng_state()],
            "extra": {name: obj.state_dict() for name, obj in self.state_objects.items()},
            "history": list(self.history),
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            "time": time.time(),
        }

    def sync_state_objects(self) -> int:
        """Call ``sync_state()`` (collective) on every state object, model or sub-module that has one, e.g. the
        per-rank replicas of :class:`~contrastive_repro.losses.DecomposableContrastiveLoss`'s per-sample state,
        so that the state saved by rank 0 is the merged state of all ranks. A no-op without a process group.
        Returns how many objects were synced."""
        if not self.dist.is_distributed:
            return 0
        seen, synced = set(), 0
        for obj in [self.module, *self.state_objects.values()]:
            for sub in (obj.modules() if isinstance(obj, nn.Module) else [obj]):
                if id(sub) in seen or not callable(getattr(sub, "sync_state", None)):
                    continue
                seen.add(id(sub))
                sub.sync_state()
                synced += 1
        return synced

    def _gather_rng(self) -> list:
        if not self.dist.is_distributed:
            return [_rng_state()]
        import io

        buf = io.BytesIO()
        torch.save(_rng_state(), buf)  # as bytes: all_gather_object cannot carry tensors reliably
        blobs = [None] * self.dist.world_size
        torch.distributed.all_gather_object(blobs, buf.getvalue())
        return [torch.load(io.BytesIO(b), weights_only=False) for b in blobs]

    def save_checkpoint(self) -> Path | None:
        """Write ``ckpt_dir/step_XXXXXXXX.pt`` atomically on rank 0 (collective: call on every rank) and prune to
        the newest ``keep_last``. Returns the path on rank 0, None elsewhere."""
        if self.cfg.ckpt_dir is None:
            return None
        self.sync_state_objects()  # rank 0 saves: it must hold every rank's per-sample state first
        rng = self._gather_rng()  # every rank's RNG, so that each can resume its own stream
        path = None
        if self.is_main:
            state = self.state_dict()
            state["rng"] = rng
            path = Path(self.cfg.ckpt_dir) / f"step_{self.step:08d}.pt"
            atomic_torch_save(state, path)
            for _, old in find_checkpoints(self.cfg.ckpt_dir)[:-self.cfg.keep_last]:
                old.unlink(missing_ok=True)
        cr_dist.barrier()
        return path

    def config_differences(self, saved: Mapping) -> dict:
        """``{field: (checkpoint value, current value)}`` for the config fields that differ and can change the
        result (all but logging, checkpoint cadence and device)."""
        current = self.cfg.to_dict()
        diff = {}
        for k in sorted(set(saved) | set(current)):
            if k in _RESUMABLE_CHANGES:
                continue
            a, b = saved.get(k, dataclasses.MISSING), current.get(k, dataclasses.MISSING)
            if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
                a, b = tuple(a), tuple(b)
            if k == "run_key" and a is dataclasses.MISSING:
                a = ""  # checkpoints written before run_key existed
            if a != b:
                diff[k] = ("<absent>" if a is dataclasses.MISSING else a, "<absent>" if b is dataclasses.MISSING else b)
        return diff

    def load_state_dict(self, ckpt: Mapping) -> None:
        """Restore a checkpoint; :class:`CheckpointMismatchError` if it was made with a different config."""
        changed = self.config_differences(ckpt.get("config", {}))
        if changed:
            where = f" in {self.cfg.ckpt_dir}" if self.cfg.ckpt_dir else ""
            raise CheckpointMismatchError(
                f"the checkpoint{where} (step {ckpt.get('step')}) was made with a different configuration: "
                + ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in changed.items())
                + ". Use another ckpt_dir for the new configuration (or resume=False to overwrite it)")
        self.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None and hasattr(self.scheduler, "load_state_dict"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.data.load_state_dict(ckpt["data"])
        extra = ckpt.get("extra", {})
        for name, obj in self.state_objects.items():
            if name not in extra:
                raise KeyError(f"checkpoint has no state for state_objects[{name!r}] (has {sorted(extra)})")
            obj.load_state_dict(extra[name])
        rngs = ckpt["rng"]
        if len(rngs) == self.dist.world_size:
            _set_rng_state(rngs[self.dist.rank])
        else:
            warnings.warn(f"checkpoint was written by {len(rngs)} ranks, this run has {self.dist.world_size}: "
                          "RNG states not restored (data order is)", RuntimeWarning, stacklevel=2)
        self.step = int(ckpt["step"])
        self.history = list(ckpt.get("history", []))
    def _find_resume_checkpoint(self) -> tuple[Path | None, dict | None]:
        """Rank 0 picks the newest checkpoint that loads (damaged files are skipped with a warning) and broadcasts
        its path; returns ``(path, checkpoint)`` (the checkpoint is loaded on every rank)."""
        choice, ckpt = [None], None
        if self.is_main and self.cfg.ckpt_dir is not None and self.cfg.resume:
            d = Path(self.cfg.ckpt_dir)
            for stale in d.glob(".step_*.tmp") if d.is_dir() else ():
                stale.unlink(missing_ok=True)  # left by a process killed while writing
            for _, path in reversed(find_checkpoints(d)):
                try:
                    ckpt = load_checkpoint(path)
                except Exception as e:  # noqa: BLE001 - a damaged file: fall back to the previous one
                    warnings.warn(f"skipping unreadable checkpoint {path}: {e}", RuntimeWarning, stacklevel=3)
                    continue
                choice = [str(path)]
                break
        if self.dist.is_distributed:
            torch.distributed.broadcast_object_list(choice, src=0)
            if choice[0] is not None and ckpt is None:
                ckpt = load_checkpoint(choice[0])
        return (Path(choice[0]) if choice[0] is not None else None), ckpt

    # ------------------------------------------------------------------------------------------ the loop
    def _unpack(self, out, step: int, micro: int) -> tuple[torch.Tensor, dict]:
        metrics: dict = {}
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise KeyError("a step function returning a dict must include 'loss'")
            metrics = {k: v for k, v in out.items() if k != "loss"}
            loss = out["loss"]
        elif isinstance(out, tuple):
            loss, metrics = out[0], (dict(out[1]) if len(out) > 1 and out[1] is not None else {})
        else:
            loss = out
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"the step function must return a scalar loss tensor, got {type(loss).__name__}")
        micro_txt = f" (micro-batch {micro + 1}/{self.cfg.grad_accum_steps})" if self.cfg.grad_accum_steps > 1 else ""
        check_finite(loss, f"loss at step {step}{micro_txt}")
        return loss.reshape(()), metrics

    def _train_step(self) -> dict:
        cfg, step = self.cfg, self.step + 1
        accum = cfg.grad_accum_steps
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        metric_sums: dict[str, float] = {}
        for micro in range(accum):
            batch = _to_device(self.data.next_batch(), self.device)
            last = micro == accum - 1
            sync = contextlib.nullcontext() if (last or self.model is self.module) else self.model.no_sync()
            with sync:
                with self._autocast():
                    out = (self.step_fn(self.model, batch, StepContext(step, micro, accum, self))
                           if self._step_fn_takes_ctx else self.step_fn(self.model, batch))
                loss, metrics = self._unpack(out, step, micro)
                scaled = loss.float() / accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += _scalar(loss)
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + _scalar(v)

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        grad_norm = _scalar(grad_norm)
        if self.scaler is None:  # with fp16 the scaler skips steps with inf gradients by design
            check_finite(grad_norm, f"gradient norm at step {step}")
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step = step

        record = {"step": step, "loss": loss_sum / accum, "lr": lr, "grad_norm": grad_norm}
        record.update({k: v / accum for k, v in metric_sums.items()})
        if self.dist.is_distributed:  # report the mean over ranks (one small all-reduce per step)
            keys = [k for k in record if k not in ("step", "lr", "grad_norm")]
            vals = cr_dist.all_reduce_mean(torch.tensor([record[k] for k in keys], dtype=torch.float64,
                                                        device=self.device))
            record.update({k: float(v) for k, v in zip(keys, vals.tolist())})
        return record

    def _evaluate(self) -> dict:
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), self._autocast():
                out = self.eval_fn(self.module) or {}
        finally:
            self.module.train(was_training)
        res = {}
        for k, v in out.items():
            res[k] = _scalar(v) if isinstance(v, (torch.Tensor, float, int, np.floating, np.integer)) else v
            if isinstance(res[k], float):
                check_finite(res[k], f"eval metric {k!r} at step {self.step}")
        return res

    def fit(self) -> list[dict]:
        """Run (or resume) until ``cfg.max_steps`` optimizer steps; return the history (one dict per step)."""
        cfg = self.cfg
        seed_everything(cfg.seed + self.dist.rank)
        resume_path, ckpt = self._find_resume_checkpoint()
        if ckpt is not None:
            self.load_state_dict(ckpt)
            del ckpt
            if self.is_main:
                logger.info("resumed from %s at step %d", resume_path, self.step)
        if self.step >= cfg.max_steps:
            return self.history

        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc="train", dynamic_ncols=True, mininterval=0.5)
        self.model.train()
        t0 = time.perf_counter()
        try:
            while self.step < cfg.max_steps and not self._stop:
                record = self._train_step()
                record["time_s"] = time.perf_counter() - t0
                last = self.step >= cfg.max_steps
                if self.eval_fn is not None and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                    record.update(self._evaluate())
                self.history.append(record)
                if cfg.log_every and (self.step % cfg.log_every == 0 or last):
                    bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}", refresh=False)
                    if self.is_main:
                        logger.info("step %d: %s", self.step, {k: v for k, v in record.items() if k != "step"})
                for cb in self.callbacks:
                    cb(self, record)
                bar.update(1)
                if cfg.ckpt_dir is not None and (last or self._stop or
                                                 (cfg.ckpt_every and self.step % cfg.ckpt_every == 0)):
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.history


def train(model: nn.Module, step_fn: Callable, data, cfg: TrainConfig | None = None, **kwargs) -> list[dict]:
    """Train ``model`` with :class:`Trainer` (see there for the arguments) and return the per-step history."""
    return Trainer(model, step_fn, data, cfg, **kwargs).fit()
