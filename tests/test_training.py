"""The training loop: NaN guard, checkpoint contents, exact resume after SIGKILL, gradient accumulation, atomicity."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from contrastive_repro.training import (CHECKPOINT_FORMAT, EpochBatches, IndexedBatches, TrainConfig, Trainer,
                                        epoch_index_batches, find_checkpoints, latest_checkpoint, load_checkpoint,
                                        train)
from contrastive_repro.utils import NonFiniteError

SRC = Path(__file__).resolve().parents[1] / "src"


class PerSampleMemory:
    """A stateful object outside the model (like a loss with per-sample auxiliary variables)."""

    def __init__(self, n: int):
        self.values = torch.zeros(n, dtype=torch.float64)
        self.updates = 0

    def update(self, idx: torch.Tensor, v: torch.Tensor) -> None:
        self.values[idx] = 0.5 * self.values[idx] + 0.5 * v.detach().to(self.values)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "updates": self.updates}

    def load_state_dict(self, state) -> None:
        self.values = state["values"].clone()
        self.updates = int(state["updates"])


def _tiny_problem(seed: int = 0, n: int = 40, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = x @ torch.randn(6, 3, generator=g, dtype=dtype)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    return x, y, model


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=6, lr=1e-2, progress=False, log_every=0, device="cpu", seed=0)
    base.update(kw)
    return TrainConfig(**base)


# -------------------------------------------------------------------------------------------------- NaN guard
def test_nan_loss_raises_naming_the_step():
    x, y, model = _tiny_problem()

    def step_fn(model, idx, ctx):
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        return loss * float("nan") if ctx.step == 3 else loss

    data = IndexedBatches(lambda i: torch.arange(4) + 4 * (i % 10))
    with pytest.raises(NonFiniteError, match=r"loss at step 3\b"):
        train(model, step_fn, data, _cfg(max_steps=10))
    assert data.index == 3  # stopped at the third batch, before any further step


def test_nonfinite_gradient_raises_naming_the_step():
    x, y, model = _tiny_problem()

    class InfiniteGrad(torch.autograd.Function):  # identity forward, infinite backward
        @staticmethod
        def forward(ctx, u):
            return u.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    def step_fn(model, idx, ctx):
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        return InfiniteGrad.apply(loss) if ctx.step == 2 else loss

    with pytest.raises(NonFiniteError, match=r"gradient norm at step 2\b"):
        train(model, step_fn, lambda i: torch.arange(4), _cfg())


def test_nan_micro_batch_is_named():
    x, y, model = _tiny_problem()

    def step_fn(model, idx, ctx):
        loss = ((model(x[idx]) - y[idx]) ** 2).mean()
        return loss / 0 * 0 if (ctx.step, ctx.micro_step) == (2, 1) else loss

    with pytest.raises(NonFiniteError, match=r"step 2 \(micro-batch 2/2\)"):
        train(model, step_fn, lambda i: torch.arange(4), _cfg(grad_accum_steps=2))


# ---------------------------------------------------------------------------------------- checkpoint contents
def _epoch_source(n: int, bs: int, seed: int = 0) -> EpochBatches:
    return EpochBatches(lambda epoch: epoch_index_batches(n, bs, epoch, seed=seed))


def test_checkpoint_contents(tmp_path):
    x, y, model = _tiny_problem()
    memory = PerSampleMemory(len(x))

    def step_fn(model, idx):
        per_sample = ((model(x[idx]) - y[idx]) ** 2).mean(1)
        memory.update(idx, per_sample)
        return per_sample.mean(), {"mem": memory.values.mean()}

    cfg = _cfg(max_steps=7, ckpt_dir=str(tmp_path), ckpt_every=2, keep_last=2, warmup_steps=2, weight_decay=0.1)
    data = _epoch_source(len(x), 6)  # 6 batches per epoch: step 7 is in the second epoch
    trainer = Trainer(model, step_fn, data, cfg, state_objects={"memory": memory})
    history = trainer.fit()

    assert [s for s, _ in find_checkpoints(tmp_path)] == [6, 7]  # every 2 steps + final, newest 2 kept
    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["step"] == 7
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "scaler", "data", "rng", "extra", "history", "config"}
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt["model"][k], v), k
    opt_state = ckpt["optimizer"]["state"]
    assert len(opt_state) == 4 and all(int(s["step"]) == 7 for s in opt_state.values())
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [0.1, 0.0]  # no decay on biases
    assert ckpt["scheduler"]["last_epoch"] == 7
    assert ckpt["scaler"] is None  # no fp16 on CPU
    assert ckpt["data"] == {"kind": "epoch", "epoch": 1, "offset": 1}
    assert len(ckpt["rng"]) == 1 and set(ckpt["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert torch.equal(ckpt["rng"][0]["torch"], torch.get_rng_state())
    assert ckpt["extra"]["memory"]["updates"] == 7
    assert torch.equal(ckpt["extra"]["memory"]["values"], memory.values)
    assert ckpt["config"] == cfg.to_dict()
    assert ckpt["history"] == history and [r["step"] for r in history] == list(range(1, 8))
    assert {"loss", "lr", "grad_norm", "mem"} <= set(history[0])
    assert history[0]["lr"] == pytest.approx(0.5e-2) and history[1]["lr"] == pytest.approx(1e-2)  # warmup

    # a finished run started again does nothing and returns the stored history
    before = {k: v.clone() for k, v in model.state_dict().items()}
    again = train(model, step_fn, _epoch_source(len(x), 6), cfg, state_objects={"memory": PerSampleMemory(len(x))})
    assert again == history
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_finished_run_with_other_config_is_refused_not_returned(tmp_path):
    """A checkpoint folder holding a (finished) run made with other settings must not be returned or resumed."""
    from contrastive_repro.training import CheckpointMismatchError

    x, y, model = _tiny_problem()

    def step_fn(m, i):
        return ((m(x[i]) - y[i]) ** 2).mean()

    def data():
        return IndexedBatches(lambda j: torch.arange(4) + 4 * (j % 10))

    cfg = _cfg(max_steps=4, ckpt_dir=str(tmp_path), run_key="model=a")
    history = train(model, step_fn, data(), cfg)
    for change, words in ((dict(lr=5e-2), ["lr: checkpoint 0.01, now 0.05"]),
                          (dict(max_steps=2), ["max_steps: checkpoint 4, now 2"]),
                          (dict(run_key="model=b"), ["run_key: checkpoint 'model=a', now 'model=b'"])):
        with pytest.raises(CheckpointMismatchError) as e:
            train(_tiny_problem()[2], step_fn, data(), dataclasses.replace(cfg, **change))
        for w in words + [str(tmp_path), "step 4", "another ckpt_dir"]:
            assert w in str(e.value)
    # settings that cannot change the result may differ: the finished run is returned as before
    again = train(_tiny_problem()[2], step_fn, data(), dataclasses.replace(cfg, log_every=1, ckpt_every=3))
    assert again == history
    # resume=False starts over in the same folder
    fresh = train(_tiny_problem()[2], step_fn, data(), dataclasses.replace(cfg, lr=5e-2, resume=False))
    assert len(fresh) == 4 and fresh[0]["loss"] == history[0]["loss"] and fresh[-1]["loss"] != history[-1]["loss"]


@pytest.mark.parametrize("field, value, words", [
    ("grad_clip", -1.0, "grad_clip must be > 0"),
    ("grad_clip", 0.0, "grad_clip must be > 0"),
    ("grad_clip", float("nan"), "grad_clip must be > 0"),
    ("min_lr_ratio", -0.1, "min_lr_ratio must be in [0, 1]"),
    ("min_lr_ratio", 1.5, "min_lr_ratio must be in [0, 1]"),
    ("lr", -1e-3, "lr must be a finite number >= 0"),
    ("warmup_steps", -1, "warmup_steps must be >= 0"),
])
def test_config_values_that_train_the_wrong_way_are_refused(field, value, words):
    with pytest.raises(ValueError) as e:
        TrainConfig(**{field: value})
    msg = str(e.value)
    assert words in msg and (repr(value) in msg or str(value) in msg)


def test_no_checkpoints_without_dir_and_config_validation(tmp_path):
    x, y, model = _tiny_problem()
    history = train(model, lambda m, i: ((m(x[i]) - y[i]) ** 2).mean(), lambda i: torch.arange(4),
                    _cfg(max_steps=2))
    assert len(history) == 2 and not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(grad_accum_steps=0)
    with pytest.raises(TypeError, match="state_dict"):
        Trainer(model, lambda m, b: m(b).sum(), lambda i: x[:2], _cfg(), state_objects={"bad": object()})
    with pytest.raises(TypeError, match="BatchSource"):
        Trainer(model, lambda m, b: m(b).sum(), [x[:2]], _cfg())


# -------------------------------------------------------------------------------------------- exact resume
CHILD = textwrap.dedent('''
    import json, os, random, signal, sys
    import numpy as np
    import torch
    import torch.nn as nn
    from contrastive_repro.training import TrainConfig, EpochBatches, epoch_index_batches, train

    mode, ckpt_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)

    class Memory:  # per-sample auxiliary state, checkpointed through state_objects
        def __init__(self, n):
            self.u = torch.zeros(n)
        def state_dict(self):
            return {"u": self.u.clone()}
        def load_state_dict(self, s):
            self.u = s["u"].clone()

    g = torch.Generator().manual_seed(1)
    N = 70
    X = torch.randn(N, 8, generator=g)
    Y = torch.randint(0, 4, (N,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))
    memory = Memory(N)

    def make_epoch(epoch):  # 11 batches of 6 per epoch (4 dropped): steps straddle epoch boundaries
        return epoch_index_batches(N, 6, epoch, seed=3)

    def step_fn(model, idx):
        # augmentation from all three global RNGs (restored from the checkpoint)
        noise = torch.randn(len(idx), 8) * 0.1 + float(np.random.normal()) * 0.01 + random.random() * 0.01
        logits = model(X[idx] + noise)
        per = nn.functional.cross_entropy(logits, Y[idx], reduction="none")
        weight = torch.softmax(-memory.u[idx], 0) * len(idx)
        with torch.no_grad():
            memory.u[idx] = 0.9 * memory.u[idx] + 0.1 * per
        return (weight * per).mean(), {"u_mean": memory.u.mean()}

    steps_run = []
    def callback(trainer, record):
        steps_run.append(record["step"])
        if mode == "kill" and record["step"] == 15:
            os.kill(os.getpid(), signal.SIGKILL)

    cfg = TrainConfig(max_steps=30, lr=3e-2, weight_decay=0.05, warmup_steps=4, grad_accum_steps=2, grad_clip=1.0,
                      ckpt_dir=ckpt_dir, ckpt_every=10, keep_last=2, seed=7, device="cpu", progress=False,
                      log_every=0)
    history = train(model, step_fn, EpochBatches(make_epoch), cfg, state_objects={"memory": memory},
                    callbacks=[callback])
    torch.save({"params": {k: v.clone() for k, v in model.state_dict().items()}, "memory": memory.u,
                "history": [{k: r[k] for k in ("step", "loss", "lr", "grad_norm", "u_mean")} for r in history],
                "steps_run": steps_run}, out)
''')


def _run_child(script: Path, mode: str, ckpt_dir: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script), mode, str(ckpt_dir), str(out)], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    full = _run_child(script, "full", tmp_path / "ck_full", tmp_path / "full.pt")
    assert full.returncode == 0, full.stderr

    killed = _run_child(script, "kill", tmp_path / "ck", tmp_path / "killed.pt")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "killed.pt").exists()
    assert [s for s, _ in find_checkpoints(tmp_path / "ck")] == [10]  # killed at step 15, last save at 10

    resumed = _run_child(script, "resume", tmp_path / "ck", tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr

    a, b = torch.load(tmp_path / "full.pt"), torch.load(tmp_path / "resumed.pt")
    assert b["steps_run"] == list(range(11, 31))  # it really resumed from step 10
    assert a["steps_run"] == list(range(1, 31))
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=0, atol=1e-6)
    torch.testing.assert_close(b["memory"], a["memory"], rtol=0, atol=1e-6)
    assert len(b["history"]) == 30
    for ra, rb in zip(a["history"], b["history"]):
        assert ra["step"] == rb["step"]
        for k in ("loss", "lr", "grad_norm", "u_mean"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-6), (ra["step"], k)
    assert [s for s, _ in find_checkpoints(tmp_path / "ck")] == [20, 30]


def test_in_process_resume_with_indexed_batches(tmp_path):
    """Stop early (callback), start a new trainer on the same directory, compare with one uninterrupted run."""
    def run(ckpt_dir, stop_at=None):
        x, y, model = _tiny_problem(dtype=torch.float32)

        def step_fn(model, i):
            return ((model(x[i] + 0.05 * torch.randn_like(x[i])) - y[i]) ** 2).mean()

        def stopper(trainer, record):
            if record["step"] == stop_at:
                trainer.stop()

        cfg = _cfg(max_steps=12, ckpt_dir=str(ckpt_dir), ckpt_every=5, lr_schedule="linear", warmup_steps=3)
        hist = train(model, step_fn, IndexedBatches(lambda j: torch.arange(5) + 5 * (j % 8)), cfg,
                     callbacks=[stopper])
        return model, hist

    ref_model, ref_hist = run(tmp_path / "a")
    _, partial = run(tmp_path / "b", stop_at=7)
    assert len(partial) == 7 and latest_checkpoint(tmp_path / "b").name == "step_00000007.pt"
    model, hist = run(tmp_path / "b")
    assert [r["loss"] for r in hist] == [r["loss"] for r in ref_hist]
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------ gradient accumulation
def test_grad_accumulation_2x4_equals_1x8():
    def run(accum, micro_bs, **kw):
        x, y, model = _tiny_problem(n=48)

        def step_fn(model, idx):
            return ((model(x[idx]) - y[idx]) ** 2).mean()

        cfg = _cfg(max_steps=3, grad_accum_steps=accum, **kw)
        hist = train(model, step_fn, lambda i: torch.arange(micro_bs) + micro_bs * i, cfg)
        return model, hist

    for kw in ({"optimizer": "sgd", "momentum": 0.0, "lr": 0.1}, {"grad_clip": 0.5, "weight_decay": 0.1}):
        m_a, h_a = run(2, 4, **kw)
        m_b, h_b = run(1, 8, **kw)
        for p, q in zip(m_a.parameters(), m_b.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
        for ra, rb in zip(h_a, h_b):
            assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-12)
            assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], abs=1e-12)


# ------------------------------------------------------------------------------------------------- atomicity
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    x, y, model = _tiny_problem()
    step_fn = lambda m, i: ((m(x[i]) - y[i]) ** 2).mean()  # noqa: E731
    cfg = _cfg(max_steps=4, ckpt_dir=str(tmp_path), ckpt_every=2)
    trainer = Trainer(model, step_fn, lambda i: torch.arange(4), cfg)
    trainer.fit()
    assert [s for s, _ in find_checkpoints(tmp_path)] == [2, 4]
    good = (tmp_path / "step_00000004.pt").read_bytes()

    # a crash in the middle of torch.save: half a file was written, then the process "dies"
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(good[: len(good) // 2])
        raise KeyboardInterrupt("simulated crash during checkpoint write")

    monkeypatch.setattr(torch, "save", crashing_save)
    trainer.step = 6
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    assert not (tmp_path / "step_00000006.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002.pt", "step_00000004.pt"]


def test_resume_ignores_temp_files_and_skips_damaged_checkpoints(tmp_path):
    def run(max_steps):
        x, y, model = _tiny_problem()
        step_fn = lambda m, i: ((m(x[i]) - y[i]) ** 2).mean()  # noqa: E731
        cfg = _cfg(max_steps=max_steps, ckpt_dir=str(tmp_path / f"run{max_steps}"), ckpt_every=2, keep_last=5)
        return model, train(model, step_fn, lambda i: torch.arange(4) + 4 * (i % 5), cfg)

    ref_model, ref_hist = run(8)
    import shutil

    ck = tmp_path / "run8"
    # leftovers of a SIGKILL during a write (never renamed) and a damaged "finished" file
    (ck / ".step_00000010.pt.abc123.tmp").write_bytes(b"\x80\x02garbage")
    (ck / "step_00000008.pt").write_bytes((ck / "step_00000008.pt").read_bytes()[:100])
    for s in (6, 8):
        shutil.copy(ck / f"step_{s:08d}.pt", tmp_path / f"keep{s}.pt")
    (ck / "step_00000006.pt").unlink()  # so the newest readable one is step 4
    x, y, model = _tiny_problem()
    step_fn = lambda m, i: ((m(x[i]) - y[i]) ** 2).mean()  # noqa: E731
    cfg = _cfg(max_steps=8, ckpt_dir=str(ck), ckpt_every=2, keep_last=5)
    trainer = Trainer(model, step_fn, lambda i: torch.arange(4) + 4 * (i % 5), cfg)
    with pytest.warns(RuntimeWarning, match="unreadable checkpoint .*step_00000008"):
        hist = trainer.fit()
    assert not list(ck.glob("*.tmp"))  # stale temp files are cleaned up
    assert [r["loss"] for r in hist] == [r["loss"] for r in ref_hist]
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------- data, hooks, amp on CPU
def test_epoch_index_batches_deterministic_and_sharded():
    a = epoch_index_batches(50, 4, epoch=3, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(a, epoch_index_batches(50, 4, epoch=3, seed=1)))
    assert not torch.equal(a[0], epoch_index_batches(50, 4, epoch=4, seed=1)[0])
    assert len(a) == 12 and all(len(b) == 4 for b in a)
    r0 = epoch_index_batches(50, 4, epoch=3, seed=1, rank=0, world_size=2)
    r1 = epoch_index_batches(50, 4, epoch=3, seed=1, rank=1, world_size=2)
    assert len(r0) == len(r1) == 6
    full8 = epoch_index_batches(50, 8, epoch=3, seed=1)
    for b0, b1, b in zip(r0, r1, full8):  # rank shards of a step = the single-process batch of 2x the size
        assert torch.equal(torch.cat([b0, b1]), b)
    assert len(epoch_index_batches(10, 4, 0, drop_last=False)) == 3
    with pytest.raises(ValueError, match="no full batch"):
        epoch_index_batches(3, 4, 0)


def test_epoch_batches_resume_position():
    src = EpochBatches(lambda e: [(e, i) for i in range(3)])
    seen = [src.next_batch() for _ in range(5)]
    assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    state = src.state_dict()
    other = EpochBatches(lambda e: [(e, i) for i in range(3)])
    other.load_state_dict(state)
    assert [other.next_batch() for _ in range(3)] == [(1, 2), (2, 0), (2, 1)]
    seek = EpochBatches(lambda e, start: [(e, i) for i in range(start, 3)], seekable=True)
    seek.load_state_dict(state)
    assert seek.next_batch() == (1, 2)
    with pytest.raises(ValueError, match="no batches"):
        EpochBatches(lambda e: []).next_batch()


def test_eval_fn_callbacks_and_dict_outputs():
    x, y, model = _tiny_problem()
    calls = []

    def step_fn(model, batch):
        loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
        return {"loss": loss, "half": loss / 2}

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        return {"val_mse": ((model(x) - y) ** 2).mean()}

    hist = train(model, step_fn, lambda i: {"x": x[:8], "y": y[:8]}, _cfg(max_steps=5, eval_every=2),
                 eval_fn=eval_fn, callbacks=[lambda tr, rec: calls.append((tr.step, rec["loss"]))])
    assert model.training
    assert [("val_mse" in r) for r in hist] == [False, True, False, True, True]  # every 2 steps + the end
    assert calls == [(r["step"], r["loss"]) for r in hist]
    assert all(r["half"] == pytest.approx(r["loss"] / 2) for r in hist)
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_bf16_autocast_on_cpu():
    x, y, model = _tiny_problem(dtype=torch.float32)
    dtypes = []

    def step_fn(model, i):
        out = model(x[i])
        dtypes.append(out.dtype)
        return ((out.float() - y[i]) ** 2).mean()

    train(model, step_fn, lambda i: torch.arange(8), _cfg(max_steps=2, amp="bf16"))
    assert dtypes == [torch.bfloat16] * 2
    dtypes.clear()
    train(model, step_fn, lambda i: torch.arange(8), _cfg(max_steps=1, amp="auto"))
    assert dtypes == [torch.float32]  # "auto" is off on CPU
    with pytest.raises(ValueError, match="CUDA"):
        Trainer(model, step_fn, lambda i: torch.arange(8), _cfg(amp="fp16"))
