"""Notebook 02's tables and claims (recipes/small_batch_study.py) on hand-made results: converged / capped cells,
the non-inferiority answer on converged cells only, and the emoji tables and verdicts."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from contrastive_repro.recipes import small_batch_study as sb
from contrastive_repro.stats import gate

SEEDS = [0, 1, 2, 3, 4]


def _cell(obj, probe, converged=True, steps=100):
    return {"converged": converged, "steps": steps, "d_objective": 0.001, "d_probe": 0.001,
            "readout": {"objective": list(obj), "probe": list(probe), "probe_lam": [0.01] * len(obj)}}


def _heads(capped=()):
    noise = np.array([0.001, -0.002, 0.0, 0.002, -0.001])
    out = {}
    for b in (8, 32, 128):
        arms = {}
        for a in ("conventional", "control", "decomposable"):
            obj = -2.0 + (0.05 if (a != "decomposable" and b == 8) else 0.0) + noise
            arms[a] = _cell(obj, 0.7 - (obj + 2.0) + noise, converged=(a, b) not in capped)
        out[str(b)] = {"arms": arms}
    return out


def test_frame_convergence_and_per_cell():
    df = sb.ssl_frame(_heads(capped={("control", 32)}), SEEDS)
    assert len(df) == 3 * 3 * 5 and set(df.columns) >= {"arm", "batch", "seed", "steps", "converged"}
    conv = sb.convergence_table(df)
    assert len(conv) == 9 and int(conv.converged.sum()) == 8
    per = sb.per_cell(df)
    assert ("control", 32, "objective") not in per and ("control", 8, "probe") in per
    assert len(sb.per_cell(df, converged_only=False)) == 18
    np.testing.assert_allclose(per[("conventional", 8, "objective")].mean(), -1.95)


def test_non_inferiority_and_claims():
    df = sb.ssl_frame(_heads(), SEEDS)
    per, conv = sb.per_cell(df), sb.convergence_table(df)
    bs = [8, 32, 128]
    ni = sb.non_inferiority(per, ["conventional", "control", "decomposable"], bs,
                            {"objective": 0.01, "probe": 0.01})
    assert ni[("objective", "decomposable")]["batch"] == 8          # matches everywhere
    assert ni[("objective", "conventional")]["batch"] == 32         # worse at 8 by 0.05 > margin
    b_test, v = sb.half_batch_test(ni, "objective", bs)
    assert b_test == 8 and v.verdict == "reproduced"
    gates = {m: gate(1.0, {"chance": 0.1}) for m in ("objective", "probe")}
    claims, summary, lines = sb.ssl_claims(per, conv, ni, bs, ["conventional", "control", "decomposable"],
                                           gates=gates, margins={"objective": 0.01, "probe": 0.01}, alpha=0.05,
                                           momentum=0.9, design="toy")
    by = {c["id"]: c for c in claims}
    assert by["dcl.ssl_frozen.half_batch.objective"]["verdict"] == "reproduced"
    assert by["dcl.ssl_frozen.small_batch_objective"]["verdict"] == "reproduced"          # 0.05 lower at B=8
    assert by["dcl.ssl_frozen.small_batch_running_vs_minibatch_e_step"]["verdict"] == "reproduced"
    assert "9/9 cells" in by["dcl.ssl_frozen.half_batch.objective"]["note"] and lines and summary


def test_capped_cells_make_their_claims_uninformative():
    df = sb.ssl_frame(_heads(capped={("decomposable", 8), ("conventional", 128)}), SEEDS)
    per, conv = sb.per_cell(df), sb.convergence_table(df)
    bs = [8, 32, 128]
    ni = sb.non_inferiority(per, ["conventional", "control", "decomposable"], bs, {"objective": 0.01, "probe": 0.01})
    assert ni[("objective", "decomposable")]["batch"] is None         # the reference is capped
    gates = {m: gate(1.0, {"chance": 0.1}) for m in ("objective", "probe")}
    claims, _, _ = sb.ssl_claims(per, conv, ni, bs, ["conventional", "control", "decomposable"], gates=gates,
                                 margins={"objective": 0.01, "probe": 0.01}, alpha=0.05, momentum=0.9, design="toy")
    by = {c["id"]: c for c in claims}
    assert by["dcl.ssl_frozen.half_batch.objective"]["verdict"] == "uninformative"
    assert by["dcl.ssl_frozen.small_batch_objective"]["verdict"] == "uninformative"      # decomposable@8 capped
    assert "capped, excluded: conventional@128, decomposable@8" in by["dcl.ssl_frozen.small_batch_objective"]["note"]


def test_vl_frame_table_and_claims():
    metrics = ["zs subgroup top1", "zs group top1", "5-shot subgroup", "i2t R@1", "t2i R@1"]
    vl = {}
    for s in SEEDS:
        vl[s] = {"clip": {m: 0.3 + 0.01 * s for m in metrics},
                 "decomposable": {m: 0.32 + 0.01 * s + 0.001 * (s % 2) for m in metrics},
                 "text-only ceiling": {"zs subgroup top1": 0.5, "zs group top1": 0.6},
                 "majority": {"zs subgroup top1": 0.1, "zs group top1": 0.2, "n_test": 100}}
    df = sb.vl_frame(vl, ["clip", "decomposable"])
    assert len(df) == 10
    table = sb.vl_table(vl, df, n_subgroups=50, n_groups=5)
    assert table.loc["zs subgroup top1", "chance"] == pytest.approx(0.02)
    assert table.loc["zs group top1", "text-only ceiling"] == pytest.approx(0.6)
    verdicts, claims, summary = sb.vl_claims(vl, df, table, alpha=0.05, gate_margin=0.01)
    assert verdicts["i2t R@1"].verdict == "reproduced" and verdicts["i2t R@1"].effect == pytest.approx(0.0204)
    assert [c["id"] for c in claims] == ["dcl.vl_frozen.zs_subgroup_top1", "dcl.vl_frozen.zs_group_top1",
                                         "dcl.vl_frozen.5_shot_subgroup", "dcl.vl_frozen.i2t_r1",
                                         "dcl.vl_frozen.t2i_r1"]
    assert all(c["verdict"] == "reproduced" for c in claims) and len(summary) == 10
    assert isinstance(table, pd.DataFrame)


def test_gates_and_figures_render():
    import matplotlib

    matplotlib.use("Agg")
    import torch

    df = sb.ssl_frame(_heads(capped={("control", 32)}), SEEDS)
    per, per_all = sb.per_cell(df), sb.per_cell(df, converged_only=False)
    g = sb.ssl_gates(df, 128, {"objective": [-1.0] * 5}, {"objective": [-1.5] * 5, "probe": [0.3] * 5},
                     torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 0]), 0.01)
    assert g["objective"].passed and g["probe"].passed and g["probe"].baselines["chance"] == 0.25
    readouts = {"objective": (-1, 0.01, "objective"), "probe": (+1, 0.01, "probe")}
    fig = sb.plot_batch_curves(per_all, per, [8, 32, 128], ["conventional", "control", "decomposable"], readouts,
                               [0.6] * 5)
    assert len(fig.axes) == 2
    v = {"a": sb.paired_verdict([0.1, 0.2, 0.3], [0.2, 0.25, 0.35])}
    assert len(sb.plot_paired_effects(v, "t").axes) == 1
