"""Tables, claims and the emoji image-text part of notebook 02 (the small-batch study of the decomposable loss).

The training lives in :mod:`contrastive_repro.recipes.frozen_heads`; this module turns its results into the
notebook's tables, the non-inferiority answer ("the smallest batch at which the decomposable loss is not worse than
the conventional loss at the largest batch") and the claims-ledger rows. Cells that did not converge within their
step cap are reported and **excluded** from every verdict (they never stand in for a converged number).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..stats import chance_rate, gate, majority_rate, paired_verdict
from . import frozen_heads as fh

__all__ = ["ssl_frame", "convergence_table", "per_cell", "non_inferiority", "ssl_claims", "emoji_prompts",
           "vl_seed", "vl_frame", "vl_table", "vl_claims"]

READOUTS = ("objective", "probe")


# ------------------------------------------------------------------------------------------------- SSL heads
def ssl_frame(heads: dict, seeds: Sequence[int]) -> pd.DataFrame:
    """One row per (arm, batch, seed) from :func:`frozen_heads.converged_sweep` results ``{B: result}`` (keys may be
    ints or strings): the readout at the arm's final step, that step, ``converged`` and the doubling moves."""
    rows = []
    for b, r in heads.items():
        for arm, a in r["arms"].items():
            for i, s in enumerate(seeds):
                rows.append({"arm": arm, "batch": int(b), "seed": int(s), "steps": int(a["steps"]),
                             "converged": bool(a["converged"]), "objective": a["readout"]["objective"][i],
                             "probe": a["readout"]["probe"][i], "d_objective": a["d_objective"],
                             "d_probe": a["d_probe"]})
    return pd.DataFrame(rows).sort_values(["arm", "batch", "seed"]).reset_index(drop=True)


def convergence_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per (arm, batch): steps used, converged, mean readouts and the doubling moves (means over seeds)."""
    return df.groupby(["arm", "batch"]).agg(steps=("steps", "first"), converged=("converged", "first"),
                                            objective=("objective", "mean"), probe=("probe", "mean"),
                                            d_objective=("d_objective", "first"),
                                            d_probe=("d_probe", "first")).reset_index()


def per_cell(df: pd.DataFrame, converged_only: bool = True) -> dict:
    """``{(arm, batch, readout): per-seed array}`` (seed order); capped cells left out unless asked."""
    out = {}
    for (a, b), g in df.groupby(["arm", "batch"]):
        if converged_only and not bool(g.converged.iloc[0]):
            continue
        g = g.sort_values("seed")
        for m in READOUTS:
            out[(a, int(b), m)] = g[m].to_numpy()
    return out


def non_inferiority(per: dict, arms: Sequence[str], batch_sizes: Sequence[int], margins: dict,
                    alpha: float = 0.05) -> dict:
    """:func:`frozen_heads.non_inferior_batch` per readout and arm on converged cells only:
    ``{(readout, arm): {"batch", "verdicts"}}``; ``margins[readout]``; objective lower-is-better."""
    out = {}
    for m in READOUTS:
        cells = {(a, b): per[(a, b, m)] for a in arms for b in batch_sizes if (a, b, m) in per}
        for a in arms:
            out[(m, a)] = fh.non_inferior_batch(cells, batch_sizes, a, direction=-1 if m == "objective" else +1,
                                                margin=margins[m], alpha=alpha)
    return out


def half_batch_test(ni: dict, readout: str, batch_sizes: Sequence[int]) -> tuple[int, object]:
    """The batch at which the ledger tests the decomposable loss: the largest grid batch at most half the batch the
    conventional loss itself needs (the smallest grid batch when that is undefined), and its verdict (``None``
    when that cell did not converge)."""
    bs = sorted(batch_sizes)
    b_conv = ni[(readout, "conventional")]["batch"]
    below = [b for b in bs if b_conv is not None and b <= b_conv // 2]
    b_test = below[-1] if below else bs[0]
    return b_test, ni[(readout, "decomposable")]["verdicts"][b_test]


def ssl_claims(per: dict, conv: pd.DataFrame, ni: dict, batch_sizes: Sequence[int], arms: Sequence[str], *,
               gates: dict, margins: dict, alpha: float, momentum: float, design: str) -> tuple[list, list, list]:
    """Ledger rows of the SSL part: per readout the half-batch non-inferiority claim, and at the smallest batch the
    decomposable loss vs the conventional loss and vs the same-form control (objective). Cells that did not
    converge are excluded; a claim whose cells are missing becomes ``uninformative`` through a failed gate
    ("cells converged"). Returns ``(claims, summary, lines)`` (``lines``: what to print)."""
    from reproduce.claims import claim_row

    bs = sorted(batch_sizes)
    capped = [f"{a}@{b}" for a, b, c in conv[["arm", "batch", "converged"]].itertuples(index=False) if not c]
    conv_note = (f"converged (doubling moved < tol): {int(conv.converged.sum())}/{len(conv)} cells"
                 + (f"; capped, excluded: {', '.join(capped)}" if capped else ""))
    claims, summary, lines = [], [], []

    def usable(*cells):
        missing = [f"{a}@{b}" for a, b in cells if (a, b, "objective") not in per]
        return gate(0.0 if missing else 1.0, {"cells converged (" + (", ".join(missing) or "all") + ")": 0.5})

    def fake():                       # a placeholder verdict for a test whose cells did not converge
        return paired_verdict([0.0, 0.0], [0.0, 0.0])

    for m in READOUTS:
        b_test, v = half_batch_test(ni, m, bs)
        b_conv, b_dec = ni[(m, "conventional")]["batch"], ni[(m, "decomposable")]["batch"]
        resolves = gate(b_conv or 0, {"smallest batch on the grid (conventional already matches there)": bs[0]})
        note = (f"smallest non-inferior batch (margin {margins[m]:g}): "
                + ", ".join(f"{a} {ni[(m, a)]['batch']}" for a in arms)
                + f"; tested at B={b_test}; {conv_note}; E-step momentum {momentum} (validation pool); "
                f"{gates[m]}; {design}")
        lines.append(f"{m}: decomposable at B={b_test} vs conventional at B={bs[-1]}: {v}\n    {note}")
        claims.append(claim_row(f"dcl.ssl_frozen.half_batch.{m}", "dcl",
                                "matches the conventional loss at about half its batch size",
                                f"non-inferiority, decomposable@B={b_test} vs conventional@B={bs[-1]}",
                                f"{m} (decomposable - conventional)", v if v is not None else fake(),
                                gates=[gates[m], resolves, usable(("decomposable", b_test), ("conventional", bs[-1]))],
                                paper_key="dcl.batch_size_claim", note=note))
        for a in arms:
            for b in (bs[0], bs[-1]):
                if (a, b, m) in per:
                    summary.append({"experiment": f"SSL heads on frozen features, {a}, B={b}", "metric": m,
                                    "value": float(per[(a, b, m)].mean()), "std": float(per[(a, b, m)].std(ddof=1)),
                                    "n": len(per[(a, b, m)])})
    for ref, cid, claim, test_note in (
            ("conventional", "small_batch_objective", "the decomposable loss is better than the conventional one "
             "at a small batch (its gradient is not biased)", "paired over seeds x splits; lower is better"),
            ("control", "small_batch_running_vs_minibatch_e_step", "the running E-step removes the small-batch "
             "gradient bias (decomposable better than the same form with a minibatch E-step)",
             "control = positive left out, u = 1/Zhat of the batch (the conventional biased gradient)")):
        ok = (ref, bs[0], "objective") in per and ("decomposable", bs[0], "objective") in per
        v = paired_verdict(per[(ref, bs[0], "objective")], per[("decomposable", bs[0], "objective")],
                           direction=-1, alpha=alpha) if ok else fake()
        lines.append(f"at B={bs[0]}, decomposable vs {ref} (objective): {v if ok else 'cells did not converge'}")
        claims.append(claim_row(f"dcl.ssl_frozen.{cid}", "dcl", claim, f"same batch B={bs[0]}",
                                f"held-out objective (decomposable - {ref})", v,
                                gates=[gates["objective"], usable((ref, bs[0]), ("decomposable", bs[0]))],
                                note=f"{test_note}; {conv_note}"))
    return claims, summary, lines


# ------------------------------------------------------------------------------------------- emoji image-text
def emoji_prompts(emoji, text_features) -> tuple[torch.Tensor, list]:
    """Prompt features: one per sub-group (``"an emoji of {name}"``) and, per group, its own prompt plus its
    sub-groups' (an ensemble). ``text_features``: :func:`contrastive_repro.features.text_features`."""
    fp = text_features([f"an emoji of {s.replace('-', ' ')}" for s in emoji.subgroups] +
                       [f"an emoji of {g.lower()}" for g in emoji.groups], "emoji-prompts")["sentence"]
    p_sub, p_grp_own = fp[:len(emoji.subgroups)], fp[len(emoji.subgroups):]
    sub_of_group: dict = {}
    for s_name, g_name in dict(zip(emoji.subgroup_names, emoji.group_names)).items():
        sub_of_group.setdefault(emoji.groups.index(g_name), []).append(emoji.subgroups.index(s_name))
    return p_sub, [torch.cat([p_grp_own[g:g + 1], p_sub[sub_of_group.get(g, [])]]) for g in range(len(emoji.groups))]


def vl_seed(seed: int, fi, ft, captions, sub, grp, p_sub, p_grp, *, arms, test_fraction, batch_size, steps,
            proj_dim, tau, lr, momentum, shots) -> dict:
    """One seed of the image-text study: a family split, the heads of every arm, their held-out metrics, the
    text-only ceiling (caption -> nearest prompt by the frozen text encoder) and the majority rates."""
    tr, te = fh.family_split(captions, test_fraction, seed)
    out = {}
    for arm in arms:
        h = fh.train_clip_heads(arm, fi[tr], ft[tr], batch_size=batch_size, steps=steps, seeds=[seed],
                                proj_dim=proj_dim, tau=tau, lr=lr, momentum=momentum)
        out[arm] = fh.evaluate_clip_heads(h["w_img"][0], h["w_txt"][0], fi[te], ft[te], sub[te], grp[te], p_sub,
                                          p_grp, fi[tr], sub[tr], shots=shots, seed=seed)
    text_only = {}
    for name, zp, lab in (("subgroup", p_sub, sub[te]),
                          ("group", torch.stack([F.normalize(p, dim=-1).mean(0) for p in p_grp]), grp[te])):
        pred = fh.zero_shot(F.normalize(ft[te], dim=-1), F.normalize(zp, dim=-1))
        text_only[f"zs {name} top1"] = float((pred == lab).double().mean())
        text_only[f"zs {name} balanced"] = fh.balanced_top1(pred, lab)
    out["text-only ceiling"] = text_only
    out["majority"] = {"zs subgroup top1": majority_rate(sub[te], sub[tr]),
                       "zs group top1": majority_rate(grp[te], grp[tr]), "n_test": len(te)}
    return out


def vl_frame(vl: dict, arms: Sequence[str]) -> pd.DataFrame:
    """One row per (arm, seed) of the heads' metrics."""
    return pd.DataFrame([{"arm": a, "seed": int(s)} | m for s, r in vl.items() for a, m in r.items() if a in arms])


def vl_table(vl: dict, df: pd.DataFrame, n_subgroups: int, n_groups: int) -> pd.DataFrame:
    """Metric x column (arms, text-only ceiling, chance, majority), means over seeds."""
    metrics = [c for c in df.columns if c not in ("arm", "seed")]
    t = df.groupby("arm")[metrics].mean().T
    first = next(iter(vl.values()))
    t["text-only ceiling"] = pd.Series({k: np.mean([r["text-only ceiling"][k] for r in vl.values()])
                                        for k in first["text-only ceiling"]})
    t["chance"] = pd.Series({"zs subgroup top1": chance_rate(n_subgroups), "zs group top1": chance_rate(n_groups)})
    t["majority"] = pd.Series({k: np.mean([r["majority"][k] for r in vl.values()])
                               for k in ("zs subgroup top1", "zs group top1")})
    return t


def vl_claims(vl: dict, df: pd.DataFrame, table: pd.DataFrame, *, alpha: float, gate_margin: float
              ) -> tuple[dict, list, list]:
    """Paired verdicts decomposable vs CLIP per metric, and ledger rows for the headline metrics with their gates
    (chance / majority for zero-shot and few-shot, 1/n_test for retrieval). Returns ``(verdicts, claims,
    summary)``."""
    from reproduce.claims import claim_row

    metrics = [c for c in df.columns if c not in ("arm", "seed")]
    verdicts = {m: paired_verdict(df[df.arm == "clip"].sort_values("seed")[m],
                                  df[df.arm == "decomposable"].sort_values("seed")[m], direction=+1, alpha=alpha)
                for m in metrics}
    gates = {m: gate(table.loc[m, "clip"], {"chance": table.loc[m, "chance"], "majority": table.loc[m, "majority"]},
                     gate_margin) for m in ("zs subgroup top1", "zs group top1")}
    n_test = float(np.mean([r["majority"]["n_test"] for r in vl.values()]))
    gates |= {m: gate(table.loc[m, "clip"], {"chance": 1.0 / n_test}, gate_margin) for m in ("i2t R@1", "t2i R@1")}
    gates["5-shot subgroup"] = gate(table.loc["5-shot subgroup", "clip"],
                                    {"chance": table.loc["zs subgroup top1", "chance"],
                                     "majority": table.loc["zs subgroup top1", "majority"]}, gate_margin) \
        if "5-shot subgroup" in table.index else None
    claims = []
    for m in ("zs subgroup top1", "zs group top1", "5-shot subgroup", "i2t R@1", "t2i R@1"):
        if m not in verdicts:
            continue
        ceil = table.loc[m, "text-only ceiling"] if m in table.index else np.nan
        claims.append(claim_row(
            f"dcl.vl_frozen.{m.replace(' ', '_').replace('@', '').replace('-', '_').lower()}", "dcl",
            "significant improvement in zero-/few-shot classification and retrieval",
            f"emoji, frozen towers + linear heads, {len(vl)} seeds x family splits", f"{m} (decomposable - CLIP)",
            verdicts[m], gates=[gates[m]] if gates.get(m) is not None else [], paper_key="dcl.zeroshot_claim",
            note=f"CLIP {table.loc[m, 'clip']:.3f}, decomposable {table.loc[m, 'decomposable']:.3f}"
                 + ("" if np.isnan(ceil) else f", text-only ceiling {ceil:.3f}")))
    summary = [{"experiment": f"emoji image-text heads, {a}", "metric": m, "value": float(table.loc[m, a]),
                "n": len(vl)} for m in metrics for a in ("clip", "decomposable")]
    return verdicts, claims, summary


# ---------------------------------------------------------------------------------------------- gates, figures
def ssl_gates(df: pd.DataFrame, batch_size: int, untrained: dict, rand_readout: dict, labels, margin: float) -> dict:
    """Gates of the conventional loss at ``batch_size``: the probe against chance, the most common class and the
    same head on the random-init encoder; the objective against the untrained head and the random-init encoder."""
    top = {m: float(df[(df.arm == "conventional") & (df.batch == batch_size)][m].mean()) for m in READOUTS}
    n_classes = int(torch.as_tensor(labels).max()) + 1
    return {"probe": gate(top["probe"], {"chance": chance_rate(n_classes), "majority": majority_rate(labels),
                                         "random-init encoder + head": float(np.mean(rand_readout["probe"]))},
                          margin),
            "objective": gate(top["objective"], {"untrained head": float(np.mean(untrained["objective"])),
                                                 "random-init encoder + head":
                                                     float(np.mean(rand_readout["objective"]))},
                              margin, higher_is_better=False)}


def plot_batch_curves(per_all: dict, per: dict, batch_sizes, arms, readouts: dict, no_head, alpha: float = 0.05):
    """Per readout, each arm's mean and interval over seeds against the batch size (x: capped cells, excluded),
    the conventional loss's largest-batch value with the non-inferiority band, and the no-head probe.
    ``readouts[m] = (direction, margin, label)``. Returns the figure."""
    import matplotlib.pyplot as plt

    from ..stats import mean_ci

    bs = sorted(batch_sizes)
    fig, axes = plt.subplots(1, len(readouts), figsize=(5.5 * len(readouts), 3.8), squeeze=False)
    for ax, (m, (d, mg, label)) in zip(axes[0], readouts.items()):
        for a in arms:
            ci = np.array([mean_ci(per_all[(a, b, m)], alpha) for b in bs])
            line = ax.errorbar(bs, ci[:, 0], yerr=[ci[:, 0] - ci[:, 1], ci[:, 2] - ci[:, 0]], marker="o",
                               capsize=3, label=a)
            capped = [i for i, b in enumerate(bs) if (a, b, m) not in per]
            ax.plot(np.array(bs)[capped], ci[capped, 0], "x", ms=10, color=line[0].get_color())
        if ("conventional", bs[-1], m) in per:
            ref = per[("conventional", bs[-1], m)].mean()
            ax.axhline(ref, color="k", ls=":", lw=1)
            ax.axhspan(ref - d * mg, ref, color="0.85", zorder=0, label=f"non-inferiority margin {mg:g}")
        if m == "probe":
            ax.axhline(np.mean(no_head), color="tab:gray", ls="--", lw=1, label="frozen features, no head")
        ax.set_xscale("log", base=2)
        ax.set(xticks=bs, xticklabels=[str(b) for b in bs], xlabel="batch size B",
               title=label + " (x: capped, excluded)")
        ax.legend(fontsize=7)
    return fig


def plot_paired_effects(verdicts: dict, title: str):
    """Paired effects with their intervals, one point per metric (the emoji verdicts). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6))
    eff = pd.DataFrame({m: [v.effect, v.ci_low, v.ci_high] for m, v in verdicts.items()}, index=["e", "lo", "hi"]).T
    ax.errorbar(range(len(eff)), eff.e, yerr=[eff.e - eff.lo, eff.hi - eff.e], fmt="o", capsize=3)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(eff)), eff.index, rotation=45, ha="right")
    ax.set(ylabel="decomposable - CLIP (paired, 95% CI)", title=title)
    return fig
