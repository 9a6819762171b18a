"""The CVPR 2023 CLIP study (notebook 04) around :mod:`.frozen_clip`: emoji zero-shot prompts, the claims of
Table 1 / Table 3 as paired verdicts with gates, and the end-to-end open_clip path of the ``paper`` profile."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..stats import chance_rate, gate, paired_verdict

__all__ = ["emoji_study_data", "emoji_prompts", "CLAIM_METRICS", "RESULT_KEYS", "paired_claims", "end_to_end_unit", "result_rows",
           "summary_rows", "verdict_lines", "plot_verdicts", "plot_geometry"]

#: The columns of notebook 04's results table (accuracies shown in %, the geometry as is).
RESULT_KEYS = ("zs/subgroup/top1", "zs/subgroup/balanced", "zs/group/top1", "zs/group/balanced",
               "text/subgroup/balanced", "text/group/balanced", "ret/i2t_R@1", "ret/i2t_R@5", "ret/i2t_R@10",
               "ret/t2i_R@1", "ret/t2i_R@5", "ret/t2i_R@10", "probe", "fewshot/1shot", "fewshot/5shot",
               "modality_gap", "paired_cosine", "unpaired_cosine")
_GEOMETRY = ("modality_gap", "paired_cosine", "unpaired_cosine")

#: (result key, label, paper table key template, paper column) of the claims of notebook 04.
CLAIM_METRICS = (
    ("zs/subgroup/balanced", "zero-shot sub-group (99) balanced acc.", "lms.table1.{m}.cifar100", "CIFAR-100"),
    ("zs/group/balanced", "zero-shot group (9) balanced acc.", "lms.table1.{m}.cifar10", "CIFAR-10"),
    ("probe", "linear probe sub-group acc.", "lms.table3.{m}.linear_probe_mean14", "14-dataset linear probe"),
)


def emoji_prompts(groups: Sequence[str], subgroups: Sequence[str], group_of_item: Sequence[str],
                  subgroup_of_item: Sequence[str], templates: Sequence[str]) -> dict:
    """Zero-shot prompt texts per task: ``{"subgroup": (texts, class_of_text), "group": (...)}``. A sub-group's
    prompts fill its name ("face-smiling" -> "face smiling") into every template; a group's prompt ensemble uses the
    group name and the names of its sub-groups (the captions never contain group names)."""
    name = lambda s: s.replace("-", " ").replace("&", "and").lower()  # noqa: E731
    sub = [(t.format(name(s)), i) for i, s in enumerate(subgroups) for t in templates]
    members = {g: sorted({name(s) for gg, s in zip(group_of_item, subgroup_of_item) if gg == g}) for g in groups}
    grp = [(t.format(n), i) for i, g in enumerate(groups) for n in [name(g)] + members[g] for t in templates]
    return {"subgroup": ([p for p, _ in sub], [c for _, c in sub]), "group": ([p for p, _ in grp], [c for _, c in grp])}


def emoji_study_data(n_items: int = 0, resolution: int = 64, feature_views: int = 2,
                     templates: Sequence[str] = ("an emoji of {}.", "{}")) -> dict:
    """Everything notebook 04's frozen study needs, from the shared feature cache: the emoji (all, or a seeded subset
    of ``n_items``), :class:`~.frozen_clip.FeaturePairs` of the frozen image (``final``) and caption features with
    ``feature_views`` views, a random-init encoder's image features (``rand_v``, the gate), the zero-shot prompt
    features per task (``prompts[task] = (features, class of each prompt)``), ``labels`` and ``n_classes`` per task.
    The full set uses the project's standard cache keys ("emoji-64px", "emoji-captions")."""
    from ..data import load_emoji
    from ..features import image_features, text_features
    from .frozen_clip import FeaturePairs

    ds = load_emoji(size=64)
    if n_items:
        ds = ds.subset(np.sort(np.random.default_rng(0).permutation(len(ds))[:n_items]))
    sub = f"-sub{n_items}" if n_items else ""
    fi = image_features(ds.images, f"emoji-64px{sub}", layers=("final", "mid"), resolution=resolution,
                        views=feature_views)
    ft = text_features(ds.captions, f"emoji-captions{sub}", views=feature_views)
    rand_v = image_features(ds.images, f"emoji-64px{sub}", layers=("final",), resolution=resolution,
                            pretrained=False)["final"]
    text = emoji_prompts(ds.groups, ds.subgroups, ds.group_names, ds.subgroup_names, templates)
    pf = text_features(text["subgroup"][0] + text["group"][0], "emoji-prompts")["sentence"]
    n_sub = len(text["subgroup"][0])
    return {"ds": ds, "feats": FeaturePairs(fi["final"], ft["sentence"], fi.get("view_final"), ft.get("view_sentence")),
            "rand_v": rand_v, "prompts": {"subgroup": (pf[:n_sub], text["subgroup"][1]),
                                          "group": (pf[n_sub:], text["group"][1])},
            "labels": {"subgroup": ds.subgroup_labels.numpy(), "group": ds.group_labels.numpy()},
            "n_classes": {"subgroup": len(ds.subgroups), "group": len(ds.groups)}}


def _vals(units: Sequence[Mapping], method: str, key: str) -> np.ndarray:
    return np.array([100.0 * float(u[method][key]) for u in units])


def _baselines(units: Sequence[Mapping], key: str, n_classes: Mapping[str, int]) -> dict:
    """The trivial baselines of a metric (in %): chance, the majority class (top-1 only; balanced accuracy of a
    constant answer is chance), and the gate models of the units that have the metric."""
    task = key.split("/")[1] if key.startswith("zs/") else "subgroup"
    out = {"chance": 100 * chance_rate(n_classes[task])}
    if not key.endswith("balanced"):
        out["majority"] = 100 * float(np.mean([u["majority"][task] for u in units]))
    for g in ("gate/random_projection", "gate/random_init"):
        if all(g in u and key in u[g] for u in units):
            out[g.split("/")[1]] = float(np.mean(_vals(units, g, key)))
    return out


def paired_claims(units: Sequence[Mapping], methods: Sequence[str], n_classes: Mapping[str, int], *, alpha: float,
                  gate_margin: float, test: str, paper_value) -> tuple[list[dict], list[dict]]:
    """Claim rows (``reproduce.claims.claim_row``) and a flat verdict table for notebook 04: every regularizer vs
    CLIP on each metric of :data:`CLAIM_METRICS` in the direction of the paper's own numbers, and GC vs CyCLIP.

    ``units``: the per-unit results of :func:`.frozen_clip.run_unit`; effects are in accuracy points (b - a). Each
    arm must beat its trivial baselines (:func:`_baselines`) by ``gate_margin`` points, else ``uninformative``.
    ``paper_value(key)`` reads ``configs/paper_numbers.yaml``.
    """
    from reproduce.claims import claim_row

    pairs = [(m, "clip") for m in methods if m != "clip"]
    if "gc" in methods and "cyclip" in methods:
        pairs.append(("gc", "cyclip"))
    rows, table = [], []
    for key, label, pkey, column in CLAIM_METRICS:
        base = _baselines(units, key, n_classes)
        gates = {m: gate(float(np.mean(_vals(units, m, key))), base, gate_margin) for m in methods}
        for b, a in pairs:
            pa, pb = paper_value(pkey.format(m=a)), paper_value(pkey.format(m=b))
            direction = 1 if pb >= pa else -1
            v = paired_verdict(_vals(units, a, key), _vals(units, b, key), direction=direction, alpha=alpha)
            word = "raises" if direction > 0 else "lowers"
            row = claim_row(f"lms.clip.{b}_vs_{a}.{key.replace('/', '_')}", "lms",
                            f"{b} {word} {column} accuracy vs {a} (paper {pb:.2f} vs {pa:.2f})", test,
                            f"{label}, points ({b} - {a})", v, gates=[gates[a], gates[b]],
                            paper_key=pkey.format(m=b), comparable=False)
            rows.append(row)
            table.append({"comparison": f"{b} vs {a}", "metric": label, "paper direction": word,
                          "effect": v.effect, "ci_low": v.ci_low, "ci_high": v.ci_high, "n": v.n, "mde": v.mde,
                          "verdict": row["verdict"], "gate": all(g.passed for g in (gates[a], gates[b]))})
    return rows, table


def end_to_end_unit(train_pairs, suite, cfg_kw: Mapping, methods: Sequence[str], weights: Mapping[str, float],
                    seed: int, vocab_texts: Sequence[str] = (), task_alias: Mapping[str, str] | None = None) -> dict:
    """The ``paper`` profile: each method trained end to end with open_clip (``clip_pretrain.train_clip``,
    regularizer weights fixed in ``weights``) and scored by ``clip_pretrain.evaluate_suite``; the keys are mapped
    to those of :func:`.frozen_clip.run_unit` (``zs/<task>/balanced`` = top-1: the CIFAR test sets are balanced;
    ``probe`` = the first probe task); ``task_alias`` renames zero-shot tasks (``{"cifar100": "subgroup"}``)."""
    from . import clip_pretrain as cp

    out = {"chosen": {m: weights.get(m) for m in methods if m != "clip"}, "majority": {}, "first_step": {}}
    for m in methods:
        ckpt = {"ckpt_dir": f"{cfg_kw['ckpt_dir']}/seed{seed}_{m}"} if cfg_kw.get("ckpt_dir") else {}  # one per run
        cfg = cp.CLIPPretrainConfig(**dict(cfg_kw, seed=seed, regularizers={} if m == "clip" else {m: weights[m]},
                                           **ckpt))
        trained = cp.train_clip(train_pairs, cfg, vocab_texts=vocab_texts)
        res = cp.evaluate_suite(trained.model, trained.tokenizer, suite, seed=seed)
        first = trained.history[0] if trained.history else {}
        out["first_step"][m] = {k: float(v) for k, v in first.items() if isinstance(v, (int, float))}
        for t in suite.zero_shot:
            res[f"zs/{t}/balanced"] = res[f"zs/{t}/top1"]
        first = next(iter(suite.probes))
        res["probe"] = res[f"probe/{first}"]
        for t, alias in (task_alias or {}).items():
            res.update({k.replace(f"zs/{t}/", f"zs/{alias}/"): v for k, v in list(res.items())
                        if k.startswith(f"zs/{t}/")})
        out[m] = res
    for t, task in suite.zero_shot.items():
        labels = np.asarray(task.labels)
        out["majority"][(task_alias or {}).get(t, t)] = float(np.mean(labels == np.bincount(labels).argmax()))
    return out


def run_end_to_end(run, p: Mapping) -> list[dict]:
    """All units of the ``paper`` profile (``mode="end_to_end"``): data (``p["dataset"]``: the CC3M / CIFAR layout
    of ``clip_pretrain.load_paper_data`` under ``p["data_root"]``, or the emoji pixels split by item), then one
    cached :func:`end_to_end_unit` per seed. ``p`` holds notebook 04's parameters."""
    from ..data import load_emoji
    from . import clip_pretrain as cp

    templates = list(p["templates"])
    if p["dataset"] == "cc3m":
        data = cp.load_paper_data(p["data_root"] or None, image_size=p["image_size"])
        train_pairs, vocab, alias = data["train"], [], {"cifar100": "subgroup", "cifar10": "group"}
        zero_shot = {k: cp.ZeroShotTask(v["test_images"], v["test_labels"], v["classnames"], templates)
                     for k, v in data["zeroshot"].items()}
        probes = {k: cp.ProbeTask(v["train_images"], v["train_labels"], v["test_images"], v["test_labels"])
                  for k, v in data["zeroshot"].items() if k == "cifar100"}
        val = data["val"]
        retrieval = (val, val.captions) if val is not None else None
    else:
        ds = load_emoji(p["image_size"])
        tr, te = ds.split(by="item", test_fraction=p["test_fraction"], seed=0)
        train_pairs, alias = cp.PairData(tr.images, tr.captions), {}
        pr = emoji_prompts(ds.groups, ds.subgroups, ds.group_names, ds.subgroup_names, ["{}"])
        names = {t: [[n for n, c in zip(*pr[t]) if c == i] for i in range(max(pr[t][1]) + 1)] for t in pr}
        zero_shot = {"subgroup": cp.ZeroShotTask(te.images, te.subgroup_labels, names["subgroup"], templates),
                     "group": cp.ZeroShotTask(te.images, te.group_labels, names["group"], templates)}
        probes = {"subgroup": cp.ProbeTask(tr.images, tr.subgroup_labels, te.images, te.subgroup_labels)}
        retrieval = (te.images, te.captions)
        vocab = [t.format(n) for task in zero_shot.values() for ns in task.classnames for n in ns for t in templates]
        vocab += list(te.captions)
    steps = p["steps"] if p["epochs"] <= 0 else max(1, p["epochs"] * len(train_pairs) // p["batch_size"])
    suite = cp.EvalSuite(zero_shot=zero_shot, probes=probes, retrieval=retrieval, few_shot=tuple(p["few_shot"]),
                         few_shot_draws=p["few_shot_draws"], probe_Cs=tuple(p["probe_Cs"]),
                         probe_max_iter=p["probe_max_iter"])
    overrides = {} if p["preset"] == "paper-rn50" else {"text_cfg": {"context_length": p["context_length"]},
                                                        "vision_cfg": {"image_size": p["image_size"]}}
    cfg_kw = dict(preset=p["preset"], model_overrides=overrides, compact_vocab=p["dataset"] != "cc3m", steps=steps,
                  batch_size=p["batch_size"], lr=p["lr"], weight_decay=p["weight_decay"],
                  warmup_steps=p["warmup_steps"], base=p["base"],
                  loss_options={"bridge_t": p["bridge_t"], "uniformity_t": p["uniformity_t"]},
                  image_aug=p["image_aug"], text_aug="eda", device=p["device"], ckpt_every=p["ckpt_every"],
                  ckpt_dir=str(run.checkpoint_dir) if p["ckpt_every"] else None)
    units = []
    for s in p["seeds"]:
        units.append(run.cached(f"e2e_seed{s}", lambda s=s: _json(end_to_end_unit(
            train_pairs, suite, cfg_kw, p["methods"], p["e2e_weights"], s, vocab, alias))))
    return units


def _json(x):
    from .albef_world import json_safe

    return json_safe(x)


def result_rows(units: Sequence[Mapping], arms: Sequence[str], keys: Sequence[str] = RESULT_KEYS) -> list[dict]:
    """``{"arm": arm, key: "mean ± sd"}`` per arm over units: accuracies in % with one decimal, the geometry
    (:data:`_GEOMETRY`) with three; a key missing in any unit of an arm is left out of that arm's row."""
    rows = []
    for arm in arms:
        row = {"arm": arm}
        for k in keys:
            v = [u[arm].get(k) for u in units if arm in u]
            if len(v) != len(units) or any(x is None for x in v):
                continue
            scale, nd = (1, 3) if k in _GEOMETRY else (100, 1)
            sd = scale * np.std(v, ddof=1) if len(v) > 1 else 0.0
            row[k] = f"{scale * np.mean(v):.{nd}f} ± {sd:.{nd}f}"
        rows.append(row)
    return rows


def summary_rows(units: Sequence[Mapping], methods: Sequence[str], mode: str) -> list[dict]:
    """The long-table rows of ``run.finish``: each claim metric (%, :data:`CLAIM_METRICS`) and the modality gap per
    method, mean and sd over units."""
    out = []
    for m in methods:
        exp = f"CLIP + modality structure (emoji, {mode}): {m}"
        for key, label, pkey, _ in CLAIM_METRICS:
            v = _vals(units, m, key)
            out.append({"experiment": exp, "metric": f"{label} (%)", "value": float(v.mean()),
                        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                        "paper_key": pkey.format(m=m), "note": "ours: emoji, frozen encoders; paper: CC3M RN50"})
        g = np.array([float(u[m]["modality_gap"]) for u in units])
        out.append({"experiment": exp, "metric": "modality gap", "value": float(g.mean()),
                    "std": float(g.std(ddof=1)) if len(g) > 1 else 0.0, "n": len(g), "higher_is_better": False})
    return out


def verdict_lines(table: Sequence[Mapping]) -> list[str]:
    """One printed line per row of :func:`paired_claims`' table: effect, 95 % interval, MDE and verdict."""
    return [f"  {r['comparison']:>20} | {r['metric']:<40} | paper {r['paper direction']:<6} | {r['effect']:+6.2f} "
            f"[{r['ci_low']:+6.2f}, {r['ci_high']:+6.2f}] | MDE {r['mde']:4.2f} | {r['verdict']}" for r in table]


def plot_verdicts(table: Sequence[Mapping]):
    """One panel per metric: each comparison's paired difference with its 95 % interval, coloured by verdict."""
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in table))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        part = [r for r in table if r["metric"] == metric]
        for y, r in enumerate(part):
            c = {"reproduced": "C2", "opposite": "C3"}.get(r["verdict"], "gray")
            ax.errorbar([r["effect"]], [y], xerr=[[r["effect"] - r["ci_low"]], [r["ci_high"] - r["effect"]]], fmt="o",
                        color=c, capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set(yticks=range(len(part)), yticklabels=[f"{r['comparison']} ({r['paper direction']})" for r in part],
               xlabel="paired difference, points (95% CI)", title=metric)
    fig.suptitle("green: reproduced, red: opposite, gray: inconclusive / uninformative")
    fig.tight_layout()
    return fig


def plot_geometry(unit: Mapping, methods: Sequence[str]):
    """Joint 2-D PCA of held-out images and captions per method of one unit (those with a ``pca`` entry), titled
    with the modality gap; ``None`` when no method has one."""
    import matplotlib.pyplot as plt

    show = [m for m in methods if "pca" in unit[m]]
    if not show:
        return None
    fig, axes = plt.subplots(1, len(show), figsize=(3.2 * len(show), 3.2), squeeze=False)
    for ax, m in zip(axes[0], show):
        p = unit[m]["pca"]
        ax.scatter(*np.array(p["v"]).T, s=5, alpha=0.6, label="image")
        ax.scatter(*np.array(p["t"]).T, s=7, alpha=0.6, marker="x", label="text")
        ax.set(title=f"{m}: gap {unit[m]['modality_gap']:.2f}", xticks=[], yticks=[])
    axes[0][0].legend(fontsize=8, markerscale=2)
    fig.tight_layout()
    return fig
