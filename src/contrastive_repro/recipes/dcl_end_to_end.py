"""The end-to-end path of notebook 02 (``mode = "end_to_end"``, the ``paper`` profile): the SSL batch-size sweep of
:mod:`contrastive_repro.recipes.ssl` and the two-tower CLIP runs of :mod:`contrastive_repro.recipes.clip_dcl`,
reported through :func:`contrastive_repro.stats.paired_verdict`.

Settings come as one dict (``end_to_end`` in the notebook, filled by ``configs/paper/02_small_batch_contrastive.yaml``);
:data:`DEFAULTS` are the former notebook defaults. Unknown keys raise an error naming them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..stats import gate, paired_verdict
from . import clip_dcl, ssl

__all__ = ["DEFAULTS", "settings", "run_end_to_end"]

DEFAULTS = dict(
    device="auto", data_root="", ckpt_every=0,
    ssl_dataset="fashion_mnist", ssl_folder_train="imagenet/train", ssl_folder_test="imagenet/val", ssl_image_size=28,
    ssl_losses=["infonce", "decomposable"], ssl_batch_sizes=[32, 128], ssl_budget="epochs", ssl_epochs=2.0,
    ssl_steps=0, ssl_n_train=1000, ssl_n_test=1000, ssl_backbone="small_cnn", ssl_width=8, ssl_num_blocks=3,
    ssl_proj_dim=64, ssl_lr=2e-3, ssl_lr_scaling="sqrt", ssl_lr_ref_batch=256, ssl_weight_decay=1e-4,
    ssl_temperature=0.2, ssl_infonce_form="symmetric", ssl_view_mode="bank", ssl_n_views=3, ssl_num_workers=0,
    ssl_knn_k=20, ssl_eval_n_train=0, ssl_probe_Cs=[0.01, 0.1, 1.0, 10.0], ssl_margin=0.01,
    dcl_momentum=0.5, dcl_e_step="mean", dcl_z_estimate="running", dcl_shape=1.0,
    clip_source="emoji", clip_preset="tiny", clip_losses=["clip", "decomposable"], clip_batch_size=64,
    clip_epochs=2.0, clip_lr=1e-3, clip_weight_decay=0.1, clip_learn_temperature=True, clip_temperature=0.07,
    clip_crop_scale_min=0.7, clip_image_size=32, clip_test_fraction=0.2, clip_split_seed=0, clip_shots=[1, 5, 10],
    clip_few_shot_draws=3, clip_n_probe_train=10000, clip_n_retrieval=5000, torch_threads=0,
)


def settings(overrides: dict | None) -> dict:
    """:data:`DEFAULTS` updated with ``overrides`` (unknown keys: ``ValueError`` naming them)."""
    overrides = dict(overrides or {})
    bad = sorted(set(overrides) - set(DEFAULTS))
    if bad:
        raise ValueError(f"end_to_end: unknown setting(s) {bad}; allowed: {sorted(DEFAULTS)}")
    return DEFAULTS | overrides


def _ssl_config(s: dict, loss: str, batch_size: int, seed: int) -> ssl.SSLConfig:
    return ssl.SSLConfig(loss=loss, batch_size=batch_size,
                         epochs=s["ssl_epochs"] if s["ssl_budget"] == "epochs" else 1.0,
                         steps=s["ssl_steps"] if s["ssl_budget"] == "steps" else 0, lr=s["ssl_lr"],
                         lr_scaling=s["ssl_lr_scaling"], lr_ref_batch=s["ssl_lr_ref_batch"],
                         weight_decay=s["ssl_weight_decay"], temperature=s["ssl_temperature"],
                         infonce_form=s["ssl_infonce_form"], dcl_shape=s["dcl_shape"],
                         dcl_z_estimate=s["dcl_z_estimate"], dcl_e_step=s["dcl_e_step"],
                         dcl_momentum=s["dcl_momentum"], backbone=s["ssl_backbone"], width=s["ssl_width"],
                         num_blocks=s["ssl_num_blocks"], proj_dim=s["ssl_proj_dim"], view_mode=s["ssl_view_mode"],
                         num_workers=s["ssl_num_workers"], knn_k=s["ssl_knn_k"], eval_n_train=s["ssl_eval_n_train"],
                         probe_Cs=tuple(s["ssl_probe_Cs"]), seed=seed, device=s["device"], ckpt_every=s["ckpt_every"])


def _clip_config(s: dict, loss: str, seed: int) -> clip_dcl.CLIPDCLConfig:
    return clip_dcl.CLIPDCLConfig(loss=loss, preset=s["clip_preset"], batch_size=s["clip_batch_size"],
                                  epochs=s["clip_epochs"], lr=s["clip_lr"], weight_decay=s["clip_weight_decay"],
                                  learn_temperature=s["clip_learn_temperature"], temperature=s["clip_temperature"],
                                  dcl_shape=s["dcl_shape"], dcl_z_estimate=s["dcl_z_estimate"],
                                  dcl_e_step=s["dcl_e_step"], dcl_momentum=s["dcl_momentum"],
                                  crop_scale=(s["clip_crop_scale_min"], 1.0), shots=tuple(s["clip_shots"]),
                                  few_shot_draws=s["clip_few_shot_draws"], seed=seed, device=s["device"],
                                  ckpt_every=s["ckpt_every"])


def run_end_to_end(run, seeds: Sequence[int], overrides: dict | None, alpha: float = 0.05) -> dict:
    """Run both end-to-end studies (each sub-run cached by ``run.cached``); returns ``{"metrics", "summary",
    "claims"}`` for ``run.finish``. Verdicts: the decomposable loss at half the largest batch vs the conventional
    loss at the largest (non-inferiority, margin ``ssl_margin``, linear probe), and decomposable vs CLIP per
    zero-shot top-1 / retrieval metric (superiority), paired over seeds."""
    import torch

    from reproduce.claims import claim_row

    s = settings(overrides)
    if s["torch_threads"] > 0:
        torch.set_num_threads(int(s["torch_threads"]))
    seeds = [int(x) for x in seeds]
    data = ssl.load_ssl_data(s["ssl_dataset"], n_train=s["ssl_n_train"], n_test=s["ssl_n_test"], seed=0,
                             root=s["data_root"] or None, train_dir=s["ssl_folder_train"],
                             test_dir=s["ssl_folder_test"],
                             image_size=None if s["ssl_dataset"] == "fashion_mnist" else s["ssl_image_size"])
    if s["ssl_view_mode"] == "bank":
        ssl.make_view_bank(data, n_views=s["ssl_n_views"], seed=0)
    res = {}
    for seed in seeds:
        for b in s["ssl_batch_sizes"]:
            for loss in s["ssl_losses"]:
                key = f"e2e_ssl_{loss}_b{b}_s{seed}"
                cfg = _ssl_config(s, loss, b, seed)
                res[(loss, b, seed)] = run.cached(key, lambda: ssl.train_ssl(data, cfg,
                                                                             ckpt_dir=run.checkpoint_dir / key))
    untrained_cfg = _ssl_config(s, s["ssl_losses"][0], min(s["ssl_batch_sizes"]), seeds[0])
    torch.manual_seed(seeds[0])
    untrained = run.cached("e2e_ssl_untrained", lambda: ssl.evaluate_model(
        ssl.build_model(untrained_cfg, data).to(torch.device("cuda" if torch.cuda.is_available() else "cpu")
                                                 if s["device"] == "auto" else torch.device(s["device"])),
        data, untrained_cfg))
    bs = sorted(s["ssl_batch_sizes"])
    summary, claims, metrics = [], [], {"ssl": {}, "clip": {}}
    for loss in s["ssl_losses"]:
        for b in bs:
            v = [res[(loss, b, x)]["linear_probe"] for x in seeds]
            metrics["ssl"][f"{loss}|{b}"] = {"linear_probe": v, "knn": [res[(loss, b, x)]["knn"] for x in seeds]}
            summary.append({"experiment": f"SSL end-to-end {data.name}, {loss}, B={b}", "metric": "linear probe",
                            "value": float(np.mean(v)), "n": len(seeds)})
    if {"infonce", "decomposable"} <= set(s["ssl_losses"]) and len(seeds) >= 2 and len(bs) >= 2:
        half = max([b for b in bs if b <= bs[-1] // 2], default=bs[0])
        a = [res[("infonce", bs[-1], x)]["linear_probe"] for x in seeds]
        bb = [res[("decomposable", half, x)]["linear_probe"] for x in seeds]
        g = gate(float(np.mean(a)), {"untrained encoder": float(untrained["linear_probe"])}, 0.0)
        claims.append(claim_row("dcl.ssl_end_to_end.half_batch", "dcl", "matches the conventional loss at about "
                                "half its batch size", f"end-to-end {s['ssl_backbone']}, decomposable@B={half} vs "
                                f"conventional@B={bs[-1]}", "linear probe (decomposable - conventional)",
                                paired_verdict(a, bb, +1, alpha, margin=s["ssl_margin"]), gates=[g],
                                paper_key="dcl.batch_size_claim"))
    cdata = (clip_dcl.load_emoji_data(size=s["clip_image_size"], test_fraction=s["clip_test_fraction"],
                                      split_seed=s["clip_split_seed"]) if s["clip_source"] == "emoji" else
             clip_dcl.load_paper_data(s["data_root"] or None, image_size=s["clip_image_size"],
                                      n_probe_train=s["clip_n_probe_train"], n_retrieval=s["clip_n_retrieval"]))
    cres = {}
    for seed in seeds:
        for loss in s["clip_losses"]:
            key = f"e2e_clip_{loss}_s{seed}"
            cfg = _clip_config(s, loss, seed)
            cres[(loss, seed)] = run.cached(key, lambda: clip_dcl.run_clip_dcl(cdata, cfg,
                                                                               ckpt_dir=run.checkpoint_dir / key))
    metrics["clip"] = {f"{loss}|{seed}": {"zeroshot": r["zeroshot"], "retrieval": r["retrieval"]}
                       for (loss, seed), r in cres.items()}
    if {"clip", "decomposable"} <= set(s["clip_losses"]) and len(seeds) >= 2:
        first = cres[("clip", seeds[0])]
        names = [f"zs {n} top1" for n in first["zeroshot"]] + [k for k in first["retrieval"] if k.endswith("R@1")]

        def val(r, name):
            return r["zeroshot"][name[3:-5]]["top1"] if name.startswith("zs ") else r["retrieval"][name]

        for name in names:
            a = [val(cres[("clip", x)], name) for x in seeds]
            bb = [val(cres[("decomposable", x)], name) for x in seeds]
            cid = "".join(c if c.isalnum() else "_" for c in name.lower())
            claims.append(claim_row(f"dcl.vl_end_to_end.{cid}", "dcl", "significant improvement in zero-shot "
                                    "classification and retrieval", f"end-to-end {s['clip_preset']} on {cdata.name}",
                                    f"{name} (decomposable - CLIP)", paired_verdict(a, bb, +1, alpha),
                                    paper_key="dcl.zeroshot_claim"))
            summary.append({"experiment": f"CLIP end-to-end {cdata.name}", "metric": f"{name}, decomposable - CLIP",
                            "value": float(np.mean(bb) - np.mean(a)), "n": len(seeds)})
    return {"metrics": metrics, "summary": summary, "claims": claims}
