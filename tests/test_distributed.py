"""Distributed helpers: 2 gloo processes on CPU reproduce the single-process contrastive loss and its gradients."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from contrastive_repro import distributed as D
from contrastive_repro.training import find_checkpoints

WORLD = 2
B = 4  # per-rank batch
D_IMG, D_TXT, D_EMB = 6, 7, 5


# ------------------------------------------------------------------------------------------------ helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, args: tuple, timeout: float = 120.0) -> None:
    """``mp.spawn`` with a deadline, so a collective that hangs fails the test instead of blocking CI."""
    ctx = mp.start_processes(fn, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout:.0f}s")


def _setup(rank: int, port: int) -> D.DistInfo:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "distributed training on CPU with gloo"
        return D.init_distributed(timeout_s=60)


def reference_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                        all_img: torch.Tensor | None = None, all_txt: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE: mean of CE(scale * img @ all_txt^T, labels) and CE(scale * txt @ all_img^T, labels)."""
    all_img = img if all_img is None else all_img
    all_txt = txt if all_txt is None else all_txt
    return 0.5 * (F.cross_entropy(scale * img @ all_txt.T, labels) + F.cross_entropy(scale * txt @ all_img.T, labels))


class Encoder(nn.Module):
    """Two linear towers and a learned log inverse temperature; forward gives normalized features and the scale."""

    def __init__(self):
        super().__init__()
        self.img, self.txt = nn.Linear(D_IMG, D_EMB), nn.Linear(D_TXT, D_EMB)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, xi, xt):
        return F.normalize(self.img(xi), dim=-1), F.normalize(self.txt(xt), dim=-1), self.log_scale.exp()


def _encoders(dtype=torch.float64):
    torch.manual_seed(0)
    return Encoder().to(dtype)


def _global_batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B, D_IMG, generator=g, dtype=dtype), torch.randn(WORLD * B, D_TXT, generator=g,
                                                                               dtype=dtype)


# -------------------------------------------------------------------------------------------- the workers
def _gather_part(rank: int, info: D.DistInfo, out_dir: str) -> None:
    assert info.is_distributed and info.rank == rank and info.world_size == WORLD and info.backend == "gloo"
    assert info.device == torch.device("cpu") and D.is_main_process() == (rank == 0)
    xi, xt = _global_batch()
    sl = slice(rank * B, (rank + 1) * B)
    results = {}
    for name, local_loss, with_grad in (("local", True, True), ("global", False, True),
                                        ("global_nograd", False, False)):
        enc = _encoders()
        img, txt, scale = enc(xi[sl], xt[sl])
        all_img, all_txt = D.gather_features(img, txt, local_loss=local_loss, gather_with_grad=with_grad)
        assert all_img.shape == (WORLD * B, D_EMB)
        if local_loss:
            loss = reference_clip_loss(img, txt, scale, D.rank_labels(B, rank), all_img, all_txt)
        else:
            loss = reference_clip_loss(all_img, all_txt, scale, torch.arange(WORLD * B))
        loss.backward()
        grads = {}
        for n, p in enc.named_parameters():  # the DDP convention: average parameter gradients over ranks
            grads[n] = D.all_reduce_mean(p.grad)
        results[name] = {"loss": D.all_reduce_mean(loss.detach()), "rank_loss": loss.detach(), "grads": grads}

    # plain collectives
    x = torch.full((B, 2), float(rank), dtype=torch.float64)
    results["gathered"] = D.all_gather_no_grad(x)
    results["mean"] = D.all_reduce_mean(torch.tensor([rank + 1.0]))
    results["mean_float"] = D.all_reduce_mean(float(rank))
    results["labels"] = D.rank_labels(B, rank)
    try:  # unequal batch sizes are refused on every rank (no hang)
        D.all_gather_with_grad(torch.zeros(B + rank, 2))
        results["unequal"] = "no error"
    except ValueError as e:
        results["unequal"] = str(e)
    D.barrier()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _trainer_part(rank: int, info: D.DistInfo, out_dir: str) -> None:
    from contrastive_repro.training import EpochBatches, TrainConfig, epoch_index_batches, train

    hist = _ddp_train_run(train, TrainConfig, EpochBatches, epoch_index_batches, info, Path(out_dir) / "ckpt")
    enc = hist.pop("model")
    torch.save({"params": {k: v.clone() for k, v in enc.state_dict().items()}, "history": hist["history"],
                "ckpt_files": sorted(p.name for p in (Path(out_dir) / "ckpt").iterdir())},
               Path(out_dir) / f"train{rank}.pt")


N_DEC = 16  # dataset size of the decomposable-loss run: 2 steps per epoch at 2 ranks x B


class _Interrupt(Exception):
    """Raised by a callback to end a run abruptly (as a kill would: nothing saved after the last checkpoint)."""


def _decomposable_run(info: D.DistInfo, ckpt_dir: Path, interrupt_at: int | None = None):
    """Train the two towers with the decomposable loss (state kept per sample, per rank) for 6 steps."""
    from contrastive_repro.losses import DecomposableContrastiveLoss
    from contrastive_repro.training import EpochBatches, TrainConfig, epoch_index_batches, train

    g = torch.Generator().manual_seed(3)
    xi = torch.randn(N_DEC, D_IMG, generator=g, dtype=torch.float64)
    xt = torch.randn(N_DEC, D_TXT, generator=g, dtype=torch.float64)
    enc = _encoders()
    loss = DecomposableContrastiveLoss(N_DEC, tau=0.5, gather=info.is_distributed, state_dtype=torch.float64)

    def make_epoch(epoch):  # reshuffled every epoch: a rank meets samples another rank updated
        return epoch_index_batches(N_DEC, B, epoch, seed=7, rank=info.rank, world_size=info.world_size)

    def step_fn(model, idx):
        img, txt, scale = model(xi[idx], xt[idx])
        return loss(img, txt, idx) + 0.0 * scale

    def interrupt(trainer, record):
        if record["step"] == interrupt_at:
            raise _Interrupt

    cfg = TrainConfig(max_steps=6, lr=0.5, optimizer="sgd", ckpt_dir=str(ckpt_dir), ckpt_every=2, progress=False,
                      log_every=0, device="cpu", seed=0)
    train(enc, step_fn, EpochBatches(make_epoch), cfg, state_objects={"loss": loss}, callbacks=[interrupt],
          dist_info=info)
    return enc, loss


def _decomposable_resume_part(rank: int, info: D.DistInfo, out_dir: str) -> None:
    out = Path(out_dir)
    full_enc, full_loss = _decomposable_run(info, out / "dec_full")
    try:
        _decomposable_run(info, out / "dec_killed", interrupt_at=3)  # last checkpoint: step 2
    except _Interrupt:
        pass
    D.barrier()
    res_enc, res_loss = _decomposable_run(info, out / "dec_killed")
    torch.save({"full": {"params": full_enc.state_dict(), "state": dict(full_loss.state_dict())},
                "resumed": {"params": res_enc.state_dict(), "state": dict(res_loss.state_dict())}},
               out / f"decomposable{rank}.pt")


def _load_example():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "train_ddp.py"
    spec = importlib.util.spec_from_file_location("train_ddp_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE_ARGS = ["--steps", "4", "--batch-size", "8", "--num-images", "64", "--ckpt-every", "2"]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One spawn for all distributed checks (process start-up dominates the cost on 2 CPU cores)."""
    info = _setup(rank, port)
    _gather_part(rank, info, out_dir)
    _trainer_part(rank, info, out_dir)
    _decomposable_resume_part(rank, info, out_dir)
    D.barrier()
    # the example script, on the already initialized process group (it destroys the group at the end)
    _load_example().main(EXAMPLE_ARGS + ["--ckpt-dir", str(Path(out_dir) / "example_ckpt"),
                                         "--out", str(Path(out_dir) / "example.json")])


def _ddp_train_run(train, TrainConfig, EpochBatches, epoch_index_batches, info: D.DistInfo, ckpt_dir):
    """Contrastive training on gathered features; per-rank batch B (distributed) or WORLD * B (single)."""
    xi, xt = _global_batch()
    enc = _encoders()
    per_rank = B if info.is_distributed else WORLD * B

    def make_epoch(epoch):
        return epoch_index_batches(len(xi), per_rank, epoch, seed=5, rank=info.rank, world_size=info.world_size)

    def step_fn(model, idx):
        img, txt, scale = model(xi[idx], xt[idx])  # through DDP's forward when distributed
        all_img, all_txt = D.gather_features(img, txt, local_loss=True)
        return reference_clip_loss(img, txt, scale, D.rank_labels(len(idx), info.rank), all_img, all_txt)

    cfg = TrainConfig(max_steps=5, lr=0.5, optimizer="sgd", momentum=0.9, ckpt_dir=str(ckpt_dir), ckpt_every=2,
                      keep_last=2, progress=False, log_every=0, device="cpu", seed=0)
    history = train(enc, step_fn, EpochBatches(make_epoch), cfg, dist_info=info)
    return {"model": enc, "history": history}


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _spawn(_worker, (_free_port(), str(out)))
    return out


@pytest.mark.slow
def test_gathered_contrastive_loss_matches_single_process(spawned):
    tmp_path = spawned
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # single process on the concatenated batch
    xi, xt = _global_batch()
    enc = _encoders()
    img, txt, scale = enc(xi, xt)
    ref_loss = reference_clip_loss(img, txt, scale, torch.arange(WORLD * B))
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in enc.named_parameters()}

    for r in range(WORLD):
        for name in ("local", "global"):
            out = res[r][name]
            torch.testing.assert_close(out["loss"], ref_loss.detach(), rtol=0, atol=1e-6)
            for n, g in ref_grads.items():
                torch.testing.assert_close(out["grads"][n], g, rtol=0, atol=1e-6, msg=f"{name} {n}")
        # local losses differ per rank but average to the global loss; global losses are identical
        torch.testing.assert_close(res[r]["global"]["rank_loss"], ref_loss.detach(), rtol=0, atol=1e-6)
        # without gradient through the gather, the encoders' averaged gradient is the global one divided by the
        # world size (only the local slice carries gradient); the temperature, used directly by the loss, is exact
        for n, g in ref_grads.items():
            expected = g if n == "log_scale" else g / WORLD
            torch.testing.assert_close(res[r]["global_nograd"]["grads"][n], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(res[0]["local"]["rank_loss"], res[1]["local"]["rank_loss"])

    expected = torch.cat([torch.zeros(B, 2), torch.ones(B, 2)]).double()
    for r in range(WORLD):
        assert torch.equal(res[r]["gathered"], expected)
        assert res[r]["mean"].item() == 1.5 and res[r]["mean_float"] == 0.5
        assert res[r]["labels"].tolist() == list(range(r * B, (r + 1) * B))
        assert "equal batch sizes" in res[r]["unequal"] and "[4, 5]" in res[r]["unequal"]


@pytest.mark.slow
def test_trainer_ddp_matches_single_process_and_rank0_writes(spawned, tmp_path):
    res = [torch.load(spawned / f"train{r}.pt") for r in range(WORLD)]

    from contrastive_repro.training import EpochBatches, TrainConfig, epoch_index_batches, load_checkpoint, train

    single = _ddp_train_run(train, TrainConfig, EpochBatches, epoch_index_batches, D.DistInfo(),
                            tmp_path / "single_ckpt")
    ref = single["model"].state_dict()
    for r in range(WORLD):
        for k, v in ref.items():
            torch.testing.assert_close(res[r]["params"][k], v, rtol=0, atol=1e-6, msg=f"rank {r} {k}")
        for a, b in zip(res[r]["history"], single["history"]):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert res[0]["ckpt_files"] == res[1]["ckpt_files"] == ["step_00000004.pt", "step_00000005.pt"]
    ckpt = load_checkpoint(spawned / "ckpt" / "step_00000005.pt")
    assert ckpt["world_size"] == WORLD and len(ckpt["rng"]) == WORLD  # every rank's RNG stream is saved
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # seeds offset by rank
    assert "module." not in next(iter(ckpt["model"]))  # the unwrapped model is saved


@pytest.mark.slow
def test_ddp_checkpoint_holds_every_ranks_decomposable_state_and_resume_is_exact(spawned):
    """A 2-rank run killed after step 3 and resumed from its step-2 checkpoint ends equal to an uninterrupted run:
    the checkpoint (saved by rank 0) holds the per-sample state of both ranks' samples (synced before saving)."""
    from contrastive_repro.training import load_checkpoint

    res = [torch.load(spawned / f"decomposable{r}.pt") for r in range(WORLD)]
    for r in range(WORLD):
        full, resumed = res[r]["full"], res[r]["resumed"]
        for k, v in full["params"].items():
            torch.testing.assert_close(resumed["params"][k], v, rtol=0, atol=1e-12, msg=f"rank {r} {k}")
        for k, v in full["state"].items():
            torch.testing.assert_close(resumed["state"][k], v, rtol=0, atol=1e-12, msg=f"rank {r} state {k}")
    ckpt = load_checkpoint(spawned / "dec_killed" / "step_00000006.pt")
    saved = ckpt["extra"]["loss"]
    # rank 0's file holds the rows that rank 1 updated: after 6 steps x 8 samples every sample has been seen
    assert bool((saved["last_update"] >= 0).all())
    for k in ("log_z", "log_u", "last_update"):
        torch.testing.assert_close(saved[k], res[1]["full"]["state"][k], rtol=0, atol=0)


@pytest.mark.slow
def test_example_script_distributed_and_resume(spawned):
    import json

    metrics = json.loads((spawned / "example.json").read_text())
    assert metrics["world_size"] == WORLD and metrics["global_batch"] == 16 and metrics["steps"] == 4
    assert [s for s, _ in find_checkpoints(spawned / "example_ckpt")] == [2, 4]
    # run again in this (single) process: the finished run is found and not repeated
    with pytest.warns(RuntimeWarning, match="written by 2 ranks"):
        again = _load_example().main(EXAMPLE_ARGS + ["--ckpt-dir", str(spawned / "example_ckpt")])
    assert again["final_loss"] == pytest.approx(metrics["final_loss"])
    assert again["view_matching_top1"] == pytest.approx(metrics["view_matching_top1"])


# --------------------------------------------------------------------------------------- single process
def test_single_process_fallbacks(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed()
    assert not info.is_distributed and info.world_size == 1 and info.rank == 0 and info.is_main
    assert D.is_main_process() and D.get_world_size() == 1
    x = torch.randn(3, 4, requires_grad=True)
    assert D.all_gather_with_grad(x) is x
    a, b = D.gather_features(x, x * 2)
    assert a is x
    assert D.all_reduce_mean(2.5) == 2.5 and torch.equal(D.all_reduce_mean(x), x.detach())
    assert torch.equal(D.all_gather_no_grad(x), x.detach())
    assert D.rank_labels(3).tolist() == [0, 1, 2] and D.rank_labels(3, rank=2).tolist() == [6, 7, 8]
    D.barrier()
    D.cleanup()


def test_launcher_env_parsing(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert D._launcher_env() == (5, 1, 8, "slurm")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert D._launcher_env() == (3, 3, 4, "torchrun")  # torchrun's variables win
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert not D.init_distributed().is_distributed
    # SLURM without MASTER_ADDR: a clear error before any network setup
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        D.init_distributed()
