"""Atomic writes, JSON safety, seeding, device choice and the non-finite guard."""
import json
import math
import os

import numpy as np
import pytest
import torch

from contrastive_repro.io import atomic_torch_save, atomic_write_json, atomic_write_text
from contrastive_repro.utils import NonFiniteError, check_finite, get_device, seed_everything


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"t": torch.tensor([1.5, 2.0]), "n": np.float32(3.0), "tup": (1, 2)})
    assert json.loads(p.read_text()) == {"t": [1.5, 2.0], "n": 3.0, "tup": [1, 2]}
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]


def test_failed_write_keeps_old_file(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_text(p, "old")
    with pytest.raises(ValueError, match="non-finite"):
        atomic_write_json(p, {"loss": math.nan})
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["x.json"]


def test_atomic_torch_save_roundtrip(tmp_path):
    p = atomic_torch_save({"w": torch.arange(3)}, tmp_path / "c.pt")
    assert torch.equal(torch.load(p)["w"], torch.arange(3))


def test_check_finite_names_the_quantity():
    check_finite(torch.ones(3), "ok")
    with pytest.raises(NonFiniteError, match="train loss"):
        check_finite(torch.tensor([1.0, float("nan")]), "train loss")
    with pytest.raises(NonFiniteError, match="R@1"):
        check_finite(float("inf"), "R@1")


def test_seed_everything_repeats_and_rejects_bad_seed():
    seed_everything(3)
    a = torch.rand(2), np.random.rand()
    seed_everything(3)
    b = torch.rand(2), np.random.rand()
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    with pytest.raises(ValueError):
        seed_everything(-1)


def test_get_device_falls_back_to_cpu():
    assert get_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.warns(RuntimeWarning):
            assert get_device("cuda").type == "cpu"
        assert get_device().type == "cpu"
