"""Information-gap recipe (contrastive_repro.recipes.info_gap) and the notebook-04 claim builder (lms_clip)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive_repro.recipes import frozen_clip as fc
from contrastive_repro.recipes import info_gap as ig
from contrastive_repro.recipes import lms_clip as lc


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_collapse_stats_by_hand():
    zv = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    zt = torch.tensor([[-1.0, 0.0], [0.0, 2.0]])  # pair 0 anti-aligned, pair 1 aligned (after normalising)
    s = ig.collapse_stats(zv, zt)
    assert s["anti_aligned"] == 0.5
    assert s["paired_cosine"] == pytest.approx(0.0) and s["unpaired_cosine"] == pytest.approx(0.0)


def test_supervised_tower_learns_its_labels():
    g = torch.Generator().manual_seed(0)
    y = np.arange(200) % 3
    x = torch.randn(200, 10, generator=g) + 3 * torch.eye(10)[y]
    cfg = fc.TowerConfig(width=16, embed_dim=4, steps=80, batch_size=32)
    model = ig.train_supervised(x, {"y": y}, cfg)
    z = fc.embed(model, x, "v")
    acc = ig.probe_targets(z[:100], z[100:], {"y": y[:100]}, {"y": y[100:]})["y"]
    assert acc > 0.9


def test_run_gap_unit_shapes_and_information_loss():
    g = torch.Generator().manual_seed(1)
    n = 240
    y = np.arange(n) % 4
    # the class is a weak direction among many strong nuisance directions of the image features
    nuis = torch.randn(n, 6, generator=g)
    x_v = torch.cat([2 * torch.eye(4)[y], 4 * nuis, torch.randn(n, 30, generator=g)], 1)
    full = torch.cat([3 * torch.eye(4)[y], 0.3 * torch.randn(n, 6, generator=g)], 1)  # the caption says the class
    empty = torch.cat([0.3 * torch.randn(n, 4, generator=g), nuis], 1)                 # ... or only the nuisance
    cfg = fc.TowerConfig(width=16, embed_dim=4, steps=80, batch_size=32, warmup_steps=5)
    out = ig.run_gap_unit(x_v, {0.0: full, 1.0: empty}, {"y": y}, x_v[:, :4], torch.randn(n, 40, generator=g), cfg,
                          seed=0, n_test=80, n_probe_train=100, align_scales=[0.0, 1.0], align_gap=0.0)
    assert set(out) == {"clip", "align", "supervised", "pixels", "random_init", "random_projection"}
    assert out["clip"][0.0]["y"] > out["clip"][1.0]["y"] + 0.2   # the gap removes what the captions carried
    assert out["supervised"]["y"] > out["clip"][1.0]["y"] + 0.1  # the single-modality model keeps it
    for s in (0.0, 1.0):
        r = out["align"][s]
        assert 0 <= r["ret/i2t_R@1"] <= r["ret/i2t_R@10"] <= 1 and 0 <= r["anti_aligned"] <= 1


def test_emoji_prompts():
    p = lc.emoji_prompts(["Smileys & Emotion", "Animals"], ["face-smiling", "animal-cat"],
                         ["Smileys & Emotion", "Animals"], ["face-smiling", "animal-cat"], ["an emoji of {}.", "{}"])
    assert p["subgroup"] == (["an emoji of face smiling.", "face smiling", "an emoji of animal cat.", "animal cat"],
                             [0, 0, 1, 1])
    assert p["group"][0][:2] == ["an emoji of smileys and emotion.", "smileys and emotion"]
    assert p["group"][1] == [0, 0, 0, 0, 1, 1, 1, 1]


def _unit(rng, shift):
    def scores(b):
        return {"zs/subgroup/balanced": 0.2 + b + rng.normal(0, 0.005), "zs/group/balanced": 0.4 + b,
                "probe": 0.5 + b + rng.normal(0, 0.005)}
    return {"clip": scores(0), "gc": scores(shift), "cyclip": scores(0.0), "majority": {"subgroup": 0.1, "group": 0.6},
            "gate/random_projection": {"zs/subgroup/balanced": 0.01, "zs/group/balanced": 0.11, "probe": 0.45}}


def test_paired_claims_directions_and_gates():
    rng = np.random.default_rng(0)
    units = [_unit(rng, 0.05) for _ in range(5)]
    paper = {"lms.table1.clip.cifar100": 15.0, "lms.table1.gc.cifar100": 22.0, "lms.table1.cyclip.cifar100": 15.1,
             "lms.table1.clip.cifar10": 45.0, "lms.table1.gc.cifar10": 56.0, "lms.table1.cyclip.cifar10": 43.0,
             "lms.table3.clip.linear_probe_mean14": 61.0, "lms.table3.gc.linear_probe_mean14": 64.0,
             "lms.table3.cyclip.linear_probe_mean14": 60.0}
    rows, table = lc.paired_claims(units, ["clip", "cyclip", "gc"], {"subgroup": 99, "group": 9}, alpha=0.05,
                                   gate_margin=1.0, test="t", paper_value=paper.get)
    by = {(r["comparison"], r["metric"][:12]): r for r in table}
    assert len(rows) == 9
    assert by[("gc vs clip", "zero-shot su")]["verdict"] == "reproduced"
    assert by[("gc vs clip", "zero-shot su")]["effect"] == pytest.approx(5.0, abs=0.5)
    assert by[("gc vs cyclip", "linear probe")]["verdict"] == "reproduced"
    # the paper's CyCLIP is below CLIP on CIFAR-10: direction "lowers"
    assert by[("cyclip vs clip", "zero-shot gr")]["paper direction"] == "lowers"
    # probe arms (~50 %) beat the random projection (45 %) by > 1 point: gate passes
    assert by[("gc vs clip", "linear probe")]["gate"]
    units[0]["gate/random_projection"]["probe"] = 0.9  # now the gate's mean is above the models
    _, table = lc.paired_claims(units, ["clip", "gc"], {"subgroup": 99, "group": 9}, alpha=0.05, gate_margin=1.0,
                                test="t", paper_value=paper.get)
    assert [r["verdict"] for r in table if r["metric"].startswith("linear")] == ["uninformative"]
