"""Information-gap recipe (contrastive_repro.recipes.info_gap) and the notebook-04 claim builder (lms_clip)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive_repro.recipes import frozen_clip as fc
from contrastive_repro.recipes import info_gap as ig
from contrastive_repro.recipes import lms_clip as lc


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    assert set(out) == {"clip", "align", "supervised", "pixels", "random_init", "random_projection", "cpu_seconds"}
    assert out["cpu_seconds"]["train"] > 0 and out["cpu_seconds"]["probe"] > 0
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


def test_world_captions_match_generate_world():
    from contrastive_repro.data import generate_world

    kw = dict(image_size=32, vqa_per_scene=0, ve_per_scene=0, nlvr_per_scene=0)
    w0 = generate_world(40, seed=3, info_gap=0.0, **kw)
    for g in (0.0, 0.5, 0.9):
        assert ig.world_captions(w0, g) == generate_world(40, seed=3, info_gap=g, **kw).captions


def test_run_gap_unit_pca_and_scale0_reuse():
    g = torch.Generator().manual_seed(2)
    n = 160
    y = np.arange(n) % 4
    x_v = torch.cat([3 * torch.eye(4)[y], torch.randn(n, 20, generator=g)], 1)
    caps = {0.0: torch.cat([3 * torch.eye(4)[y], 0.3 * torch.randn(n, 3, generator=g)], 1)}
    cfg = fc.TowerConfig(width=16, embed_dim=4, steps=20, batch_size=32, warmup_steps=2)
    out = ig.run_gap_unit(x_v, caps, {"y": y}, x_v[:, :4], torch.randn(n, 10, generator=g), cfg, seed=1, n_test=40,
                          n_probe_train=60, align_scales=[0.0], pca_dim=6)
    # the scale-0 Fig. 2 model is the gap-0 CLIP model: train it again by hand on the same PCA inputs
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    te, tr = perm[:40], perm[40:]
    xp = fc.FeaturePairs(x_v, torch.zeros(n, 1)).pca_images(tr, 6).x_v
    assert xp.shape == (n, 6)
    c = fc.TowerConfig(**{**cfg.__dict__, "seed": 1, "base": "clip", "regularizers": {}})
    model, _ = fc.train_towers(fc.FeaturePairs(xp[tr], caps[0.0][tr]), c)
    zv, zt = fc.embed(model, xp[te], "v"), fc.embed(model, caps[0.0][te], "t")
    assert out["align"][0.0]["paired_cosine"] == pytest.approx(float((zv * zt).sum(1).mean()), abs=1e-6)


def _gap_units():
    # accuracies (fractions) per unit: CLIP loses 10 points from gap 0 to 0.9 on "class", the supervised model is at
    # 0.9; on "cell" the pixels are at 0.99 (a gate no model beats)
    units = []
    for i in range(4):
        e = 0.01 * i
        units.append({"clip": {"0.0": {"class": 0.7 + e, "cell": 0.7}, "0.9": {"class": 0.6 + e, "cell": 0.6 + e}},
                      "supervised": {"class": 0.9 + e, "cell": 0.9}, "random_projection": {"class": 0.5, "cell": 0.5},
                      "pixels": {"class": 0.4, "cell": 0.99}, "random_init": {"class": 0.2, "cell": 0.8},
                      "align": {"0.0": {k: 0.5 for k in ig.ALIGN_KEYS}, "1.0": {k: 0.3 + e for k in ig.ALIGN_KEYS}}})
    return units


def test_part1_rows_and_gap_claims_by_hand():
    units = _gap_units()
    targets = {"class": np.array([0, 1, 2, 3, 3]), "cell": np.array([0, 0, 1, 1, 1])}
    rows = ig.part1_rows(units, targets, ["class", "cell"], [0.0, 0.9])
    by = {(r["task"], r["arm"]): r for r in rows}
    assert by[("class", "CLIP, gap 0")]["acc"] == pytest.approx(71.5)          # 70 + mean(0, 1, 2, 3)
    assert by[("class", "CLIP, gap 0")]["std"] == pytest.approx(np.std([70, 71, 72, 73], ddof=1))
    assert by[("cell", "majority")]["acc"] == pytest.approx(60.0)              # 3 of 5 labels are 1
    assert [r["arm"] for r in rows if r["task"] == "cell"] == ["CLIP, gap 0", "CLIP, gap 0.9", "supervised",
                                                               "random_projection", "pixels", "random_init",
                                                               "majority"]
    claims, summary, lines = ig.gap_claims(units, targets, {"class": "class", "cell": "cell"}, ("class", "cell"),
                                           [0.0, 0.9], alpha=0.05, gate_margin=2.0)
    by = {c["id"]: c for c in claims}
    assert by["lms.info_gap.gap.class"]["effect"] == pytest.approx(-10.0)
    assert by["lms.info_gap.gap.class"]["verdict"] == "reproduced"
    assert by["lms.info_gap.vs_single.class"]["effect"] == pytest.approx(-30.0)
    assert by["lms.info_gap.gap.cell"]["verdict"] == "uninformative"
    assert any("pixels gate (99.0 %)" in line for line in lines)
    assert len(summary) == 2 * 3


def test_align_claims_non_superiority_and_gate():
    units = _gap_units()
    rows = ig.align_rows(units, [0.0, 1.0])
    assert rows[1]["ret/mean_recall"] == pytest.approx(0.315)
    claims, summary, lines = ig.align_claims(units, [0.0, 1.0], n_test=100, align_gap=0.0, alpha=0.05, margin=1.0,
                                             gate_margin=2.0)
    assert len(claims) == 1 and claims[0]["effect"] == pytest.approx(-18.5)   # 31.5 - 50 points
    assert claims[0]["verdict"] == "reproduced" and claims[0]["gate_passed"]
    # random ranking of 100 captions: mean of R@1/5/10 = 16/3/100 = 5.3 %, below 50 % by far
    assert "5.333" in claims[0]["gate"]
    assert summary[0]["value"] == pytest.approx(31.5)


def test_info_gap_plots_return_figures():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = _gap_units()
    f1 = ig.plot_probe_vs_gap(units, {"class": "class", "cell": "cell"}, [0.0, 0.9])
    f2 = ig.plot_alignment(units, [0.0, 1.0])
    assert len(f1.axes) == 2 and len(f2.axes) == 2
    plt.close("all")


def test_lms_result_rows_summary_and_lines_by_hand():
    units = [{"clip": {"probe": 0.5, "modality_gap": 0.2, "zs/group/balanced": 0.4, "zs/subgroup/balanced": 0.1}},
             {"clip": {"probe": 0.6, "modality_gap": 0.4, "zs/group/balanced": 0.5, "zs/subgroup/balanced": 0.2}}]
    rows = lc.result_rows(units, ["clip"], ["probe", "modality_gap", "ret/i2t_R@1"])
    sd = 100 * np.std([0.5, 0.6], ddof=1)
    assert rows == [{"arm": "clip", "probe": f"55.0 ± {sd:.1f}", "modality_gap": f"0.300 ± {np.std([.2, .4], ddof=1):.3f}"}]
    summ = lc.summary_rows(units, ["clip"], "frozen")
    assert [s["metric"] for s in summ][-1] == "modality gap" and summ[-1]["value"] == pytest.approx(0.3)
    assert summ[0]["value"] == pytest.approx(15.0) and summ[0]["paper_key"] == "lms.table1.clip.cifar100"
    table = [{"comparison": "gc vs clip", "metric": "m", "paper direction": "raises", "effect": 1.0, "ci_low": -0.5,
              "ci_high": 2.5, "mde": 2.0, "verdict": "inconclusive"}]
    assert "MDE 2.00" in lc.verdict_lines(table)[0]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    assert len(lc.plot_verdicts(table + [dict(table[0], metric="n")]).axes) == 2
    assert lc.plot_geometry(units[0], ["clip"]) is None
    u = {"clip": {"pca": {"v": [[0, 1], [1, 0]], "t": [[0, 0], [1, 1]]}, "modality_gap": 0.1}}
    assert len(lc.plot_geometry(u, ["clip"]).axes) == 1
    plt.close("all")
