"""torchrun / SLURM helpers and collectives for contrastive losses over the global batch.

Launch a script with ``torchrun --nproc_per_node=N script.py`` (or ``srun`` under SLURM) and call
:func:`init_distributed` first; without those environment variables everything degrades to one process and every
helper here becomes the identity (``world_size == 1``), so the same code runs in a notebook.

Contrastive losses need negatives from every rank. :func:`all_gather_with_grad` concatenates a ``[B, d]`` tensor
from all ranks *and keeps the autograd graph*: in backward it sums (all-reduces) the gradient w.r.t. the gathered
tensor over ranks and hands each rank its own slice. Together with DistributedDataParallel's gradient averaging this
makes a loss computed on gathered features produce exactly the gradient of the single-process loss on the
concatenated batch (see :func:`gather_features` for the two loss layouts). Batches must have the same size on every
rank (checked).
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "get_dist_info", "is_distributed", "get_rank", "get_world_size",
           "is_main_process", "barrier", "cleanup", "all_gather_with_grad", "all_gather_no_grad", "all_reduce_mean",
           "gather_features", "rank_labels", "local_batch_size", "sync_each_epoch"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``is_distributed`` is True only when a process group is initialized."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    is_distributed: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return None


def _launcher_env() -> tuple[int, int, int, str | None]:
    """(rank, local_rank, world_size, launcher) from torchrun's variables, else SLURM's, else a single process."""
    if _env_int("WORLD_SIZE") is not None and _env_int("RANK") is not None:
        rank = _env_int("RANK")
        return rank, _env_int("LOCAL_RANK") or 0, _env_int("WORLD_SIZE"), "torchrun"
    if _env_int("SLURM_NTASKS") is not None and _env_int("SLURM_PROCID") is not None:
        return (_env_int("SLURM_PROCID"), _env_int("SLURM_LOCALID") or 0, _env_int("SLURM_NTASKS"), "slurm")
    return 0, 0, 1, None


def _device_for(local_rank: int, backend: str | None) -> torch.device:
    if torch.cuda.is_available() and backend != "gloo":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialize the default process group from the launcher's environment and return this process's place.

    * torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``.
    * Under SLURM (``srun``), ``SLURM_PROCID``, ``SLURM_LOCALID`` and ``SLURM_NTASKS`` are used when the torchrun
      variables are absent; ``MASTER_ADDR``/``MASTER_PORT`` must then be exported by the job script, e.g.
      ``export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) MASTER_PORT=29500``.
    * ``backend=None`` picks NCCL when CUDA is available and gloo otherwise; asking for NCCL without CUDA falls
      back to gloo on CPU with a warning. Each CUDA process is pinned to ``cuda:LOCAL_RANK``.
    * With no launcher variables (or ``WORLD_SIZE=1``) no process group is created: the result describes a single
      process on the best device (``utils.get_device``), and every helper in this module is a no-op.

    Calling it again once the group exists returns the current :class:`DistInfo`.
    """
    if dist.is_available() and dist.is_initialized():
        return get_dist_info()
    rank, local_rank, world_size, launcher = _launcher_env()
    if world_size <= 1:
        from .utils import get_device

        return DistInfo(device=get_device(None))
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build, but WORLD_SIZE > 1")

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        warnings.warn("NCCL was requested but CUDA is not available; using gloo on CPU", RuntimeWarning,
                      stacklevel=2)
        backend = "gloo"
    if backend == "gloo" and rank == 0:
        warnings.warn(f"distributed training on CPU with gloo ({world_size} processes)", RuntimeWarning,
                      stacklevel=2)
    if launcher == "slurm":
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise RuntimeError(f"SLURM launch without {', '.join(missing)}: export them in the job script, e.g. "
                               "MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1) "
                               "MASTER_PORT=29500")
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))

    device = _device_for(local_rank, backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device, is_distributed=True,
                    backend=backend)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_dist_info() -> DistInfo:
    """The :class:`DistInfo` of an already initialized process group (or of a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        from .utils import get_device

        return DistInfo(device=get_device(None))
    backend = dist.get_backend()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                    device=_device_for(local_rank, backend), is_distributed=True, backend=backend)


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    """Destroy the default process group if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _check_equal_batches(x: torch.Tensor, world_size: int) -> None:
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    sizes = [int(s.item()) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"all_gather needs equal batch sizes on every rank, got {sizes} "
                         "(use drop_last=True in the sampler)")


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate ``x`` from all ranks. Backward: sum the incoming gradient over ranks, keep own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: D401
        world_size = dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.batch = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        # Every rank's loss may depend on every rank's features: d(sum_r L_r)/dx_k = sum_r dL_r/dG[k-th slice].
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.batch
        return grad[start:start + ctx.batch], None


def all_gather_with_grad(x: torch.Tensor, group=None, check_sizes: bool = True) -> torch.Tensor:
    """Concatenate ``x`` (``[B, ...]``, same ``B`` on every rank) from all ranks along dim 0, rank order, keeping
    gradients.

    Backward returns this rank's slice of the gradient *summed* over ranks, i.e. the gradient of ``sum_r L_r`` where
    ``L_r`` is the loss computed on rank ``r``. DistributedDataParallel then divides parameter gradients by the
    world size, so training optimizes ``mean_r L_r``. Identity when not distributed. ``check_sizes`` costs one
    tiny all-gather and turns unequal batches into a clear error instead of a hang or garbage.
    """
    world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world_size == 1:
        return x
    if check_sizes:
        _check_equal_batches(x, world_size)
    return _AllGatherWithGrad.apply(x, group)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, group=None, check_sizes: bool = True) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without autograd (e.g. for evaluation embeddings)."""
    world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world_size == 1:
        return x.detach()
    if check_sizes:
        _check_equal_batches(x, world_size)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    return torch.cat(parts, dim=0)


def all_reduce_mean(x, group=None):
    """Mean of a tensor or Python number over ranks (a detached copy; input unchanged). Identity in one process."""
    world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    is_tensor = isinstance(x, torch.Tensor)
    if world_size == 1:
        return x.detach().clone() if is_tensor else x
    if is_tensor:
        t = x.detach().clone()
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        t = torch.tensor(float(x), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    t = t / world_size
    return t if is_tensor else float(t.item())


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor, local_loss: bool = False,
                    gather_with_grad: bool = True, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather both towers' features (``[B, d]`` each, equal ``B`` on all ranks) -> ``[W*B, d]`` each.

    Two loss layouts (open_clip's terminology), both exact with ``gather_with_grad=True``:

    * ``local_loss=False``: every rank computes the full ``W*B x W*B`` loss on the gathered features with labels
      ``arange(W*B)``. All ranks compute the same number; DDP's mean of the identical losses is the global loss.
    * ``local_loss=True``: every rank computes logits of its *local* rows against all gathered columns
      (``image_features @ all_text.T``, ``text_features @ all_image.T``), labels :func:`rank_labels`. The mean over
      ranks of these local means is the global loss, at ``1/W`` of the compute and memory.

    With ``gather_with_grad=False`` the other ranks' features are constants and only the local slice (re-inserted
    into the gathered tensor) carries gradient. With ``local_loss=False`` the DDP-averaged gradient of the encoders
    is then the global gradient divided by ``W`` (parameters the loss uses directly, like a learned temperature,
    keep their exact gradient); with ``local_loss=True`` the terms through the other ranks' rows are missing.
    Either way it is not the single-process gradient: prefer ``gather_with_grad=True``.
    """
    world_size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world_size == 1:
        return image_features, text_features
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError(f"image and text batches differ: {image_features.shape[0]} vs {text_features.shape[0]}")
    if gather_with_grad:
        return all_gather_with_grad(image_features, group), all_gather_with_grad(text_features, group)
    rank = dist.get_rank(group)
    out = []
    for f in (image_features, text_features):
        parts = list(all_gather_no_grad(f, group).chunk(world_size, dim=0))
        parts[rank] = f  # the local slice keeps its graph
        out.append(torch.cat(parts, dim=0))
    return out[0], out[1]


def rank_labels(batch_size: int, rank: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Targets for local-loss logits ``[B, W*B]``: row ``i`` of rank ``r`` matches column ``r*B + i``."""
    rank = get_rank() if rank is None else rank
    return torch.arange(batch_size, device=device) + batch_size * rank


def local_batch_size(global_batch_size: int, world_size: int | None = None, name: str = "batch_size") -> int:
    """This rank's share of a *global* batch: ``global_batch_size // world_size``; a ``ValueError`` naming ``name``
    when it does not divide evenly (every rank must hold equally many samples for the gathers)."""
    world_size = get_world_size() if world_size is None else int(world_size)
    if int(global_batch_size) % world_size:
        raise ValueError(f"{name}={global_batch_size} is the global batch and must be divisible by the world size "
                         f"({world_size} processes)")
    return int(global_batch_size) // world_size


def sync_each_epoch(make_epoch, *state_objects):
    """Wrap ``make_epoch(epoch, ...) -> iterable`` (for :class:`~contrastive_repro.training.EpochBatches`) so that
    every state object's ``sync_state()`` (collective) runs when an epoch opens, before its first batch, on every
    rank at once -- e.g. the per-rank replicas of
    :class:`~contrastive_repro.losses.DecomposableContrastiveLoss`'s per-sample state, so that a rank meeting a
    sample last updated elsewhere reads its latest state. Returns ``make_epoch`` itself in a single process."""
    if get_world_size() == 1:
        return make_epoch

    def wrapped(*args, **kwargs):
        for obj in state_objects:
            obj.sync_state()
        yield from make_epoch(*args, **kwargs)
    return wrapped
