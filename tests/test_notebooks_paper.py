"""Each notebook's ``paper`` code path, end to end on tiny inputs (steps overridden), so that a broken path fails
CI instead of a user's GPU job. The notebooks run with papermill through ``tests/notebook_runner.py``."""
from __future__ import annotations

import json

import pytest

from notebook_runner import profile_params, run_notebook


@pytest.mark.slow
def test_00_tour_paper_path(tmp_path):
    # the paper profile's model (width 64, 128-d embeddings), 60 steps on a subset (the notebook
    # asserts that training improves retrieval, which two steps do not reliably do)
    params = profile_params("00_tour", "paper", steps=60, n_train=3840, n_test=1000, batch_size=64,
                            device="cpu")
    assert params["width"] == 64 and params["embed_dim"] == 128  # from configs/paper/00_tour.yaml
    (tmp_path / "data").mkdir()
    rec = run_notebook("00_tour", params, results=tmp_path / "results", data_root=tmp_path / "data")
    assert rec["params"]["steps"] == 60 and rec["params"]["width"] == 64 and rec["metrics"]["steps"] == 60
    assert {r["metric"] for r in rec["summary"]} >= {"test R@1 (trained)", "test MAP@R (trained)"}
    # the checkpoint folder is keyed on parameters and code, not on the seed alone
    ckpts = list((tmp_path / "results" / "00_tour" / "paper" / "checkpoints").glob("*/seed0/step_*.pt"))
    assert ckpts and len(ckpts[0].parent.parent.name) == 16
    assert json.loads((tmp_path / "results" / "00_tour" / "paper" / "metrics.json").read_text())["status"] == \
        "complete"
