"""Each notebook's ``paper`` code path, end to end on tiny inputs (steps overridden), so that a broken path fails
CI instead of a user's GPU job. The notebooks run with papermill through ``tests/notebook_runner.py``.

Every test starts from ``configs/paper/<notebook>.yaml`` (``profile_params`` validates it against the notebook's
parameters cell), overrides only what makes the run tiny (steps, sizes, seeds, one dataset / backbone / loss), and
keeps the paper's mode: the end-to-end notebooks (02, 04, 07, 08) read ``DATA_ROOT`` trees in the real on-disk
formats built by ``tests/fixtures/data_trees.py``. What is checked beyond "it ran": metrics.json is complete for the
profile ``paper`` (run_notebook), the parameters that come from the paper config are the ones used, the expected
summary rows exist, and no temporary file is left behind.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from notebook_runner import ROOT, profile_params, run_notebook

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
import data_trees as ft  # noqa: E402


def _paper(notebook: str) -> dict:
    from reproduce.params import load_profile

    return load_profile("paper", ROOT / "configs")[notebook]


def _no_temp_files(results: Path) -> None:
    assert not [p for p in results.rglob("*") if p.name.startswith(".executing.") or p.suffix == ".tmp"]


def _metrics(rec: dict) -> set[str]:
    return {r["metric"] for r in rec["summary"]}


def _experiments(rec: dict) -> set[str]:
    return {r["experiment"] for r in rec["summary"]}


@pytest.mark.slow
def test_00_tour_paper_path(tmp_path):
    # the paper profile's model (width 64, 128-d embeddings) on a subset, steps cut; the notebook itself asserts
    # that training improves retrieval, which the first steps do not (R@1 of the random-init features first drops:
    # 20-40 steps of 32-64 items did not improve it, 60 steps of 32 items do), so 60 steps on batches of 32
    params = profile_params("00_tour", "paper", steps=60, n_train=1920, n_test=500, batch_size=32, device="cpu")
    assert params["width"] == 64 and params["embed_dim"] == 128  # from configs/paper/00_tour.yaml
    (tmp_path / "data").mkdir()
    rec = run_notebook("00_tour", params, results=tmp_path / "results", data_root=tmp_path / "data")
    assert rec["params"]["steps"] == 60 and rec["params"]["width"] == 64 and rec["metrics"]["steps"] == 60
    assert rec["metrics"]["after"]["R@1"] > rec["metrics"]["before"]["R@1"]
    assert {r["metric"] for r in rec["summary"]} >= {"test R@1 (trained)", "test MAP@R (trained)"}
    # the checkpoint folder is keyed on parameters and code, not on the seed alone
    ckpts = list((tmp_path / "results" / "00_tour" / "paper" / "checkpoints").glob("*/seed0/step_*.pt"))
    assert ckpts and len(ckpts[0].parent.parent.name) == 16
    assert json.loads((tmp_path / "results" / "00_tour" / "paper" / "metrics.json").read_text())["status"] == \
        "complete"


def _resnet50_weights(data_root: Path, rel: str) -> Path:
    """A random torchvision ResNet-50 state dict where the paper config expects the local ImageNet weights."""
    import torch
    import torchvision

    path = data_root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), path)
    return path


@pytest.mark.slow
def test_07_tcm_image_retrieval_paper_path(tmp_path):
    # end to end from DATA_ROOT: CUB-200's files (8 train classes, so train_dml's validation split holds out
    # classes, the open-set protocol), ResNet-50 from the local weights file the config names; 2 seeds x 1 step
    root = tmp_path / "data"
    ft.make_cub(root, class_ids=tuple(range(1, 9)) + (101, 102, 103), per_class=4)
    cfg = _paper("07_tcm_image_retrieval")
    _resnet50_weights(root, f"{cfg['pretrained_dir']}/{cfg['resnet50_weights']}")
    params = profile_params("07_tcm_image_retrieval", "paper", seeds=[0, 1], datasets=["cub200"],
                            backbones=["resnet50"], losses=["smooth_ap"], steps=1, batch_size=8, samples_per_class=2,
                            embed_dim=16, image_size=32, eval_every=1, num_workers=0, device="cpu")
    assert params["mode"] == "end_to_end" and params["lr_pretrained"] == cfg["lr_pretrained"]
    rec = run_notebook("07_tcm_image_retrieval", params, results=tmp_path / "results", data_root=root)
    p = rec["params"]
    assert p["mode"] == "end_to_end" and p["steps"] == 1 and p["datasets"] == ["cub200"]
    assert p["resnet50_weights"] == cfg["resnet50_weights"] and p["lr_pretrained"] == cfg["lr_pretrained"]
    assert "TCM grid cub200 | resnet50 | smooth_ap" in _experiments(rec)
    assert {"OPIS change (%)", "comparisons with lower OPIS (significant)"} <= _metrics(rec)
    ids = {c["id"] for c in rec["claims"]}
    assert {"tcm.grid.cub200.resnet50.smooth_ap.opis", "tcm.grid.cub200.resnet50.smooth_ap.r1"} <= ids
    assert all(c["n"] == 2 for c in rec["claims"] if c["id"].startswith("tcm.grid.cub200"))
    assert all("margins 0.9/0.5 as given" in c["test"] for c in rec["claims"] if c["id"].startswith("tcm.grid.cub"))
    _no_temp_files(tmp_path / "results")


@pytest.mark.slow
def test_08_accuracy_vs_threshold_consistency_paper_path(tmp_path):
    # end to end from DATA_ROOT (CUB-200's files) with the paper's five losses at two batch sizes (+ the TCM twins),
    # two steps each: fifteen trainings, so the small CNN instead of ResNet-50 (2 s a training on CPU; test_07 runs
    # the local ResNet-50 weights), and a large learning rate so that two steps of different losses give different
    # errors (the two-piece fit needs distinct values)
    root = tmp_path / "data"
    ft.make_cub(root, class_ids=tuple(range(1, 9)) + tuple(range(101, 109)), per_class=6)
    cfg = _paper("08_accuracy_vs_threshold_consistency")
    params = profile_params("08_accuracy_vs_threshold_consistency", "paper", seeds=[0], batch_sizes=[8, 16],
                            tcm_batch_size=8, steps=2, embed_dim=16, image_size=32, eval_every=1, num_workers=0,
                            samples_per_class=2, backbone="small_cnn", pretrained_path="", lr=0.05, device="cpu")
    assert params["losses"] == cfg["losses"] and params["mode"] == "end_to_end"
    rec = run_notebook("08_accuracy_vs_threshold_consistency", params, results=tmp_path / "results",
                       data_root=root)
    p = rec["params"]
    assert p["mode"] == "end_to_end" and p["dataset"] == "cub200" and p["losses"] == cfg["losses"]
    assert p["steps"] == 2 and p["embed_dim"] == 16 and p["tcm_pos_margin"] == 0.9
    assert {"delta BIC (line - two-piece)", "R@1 range (min)", "R@1 range (max)"} <= _metrics(rec)
    assert {c["id"] for c in rec["claims"]} == {"tcm.tradeoff.high_accuracy_slope", "tcm.tradeoff.low_accuracy_slope",
                                                "tcm.tradeoff.twins_opis"}
    assert len(rec["metrics"]["runs"]) == 15 and {r["batch_size"] for r in rec["metrics"]["runs"]} == {8, 16}
    _no_temp_files(tmp_path / "results")


@pytest.mark.slow
def test_06_tcm_mnist_toy_paper_path(tmp_path):
    # the paper profile's model (3-D sphere, 512 hidden) and margin candidates, two seeds, a few steps, fewer images
    cfg = _paper("06_tcm_mnist_toy")
    params = profile_params("06_tcm_mnist_toy", "paper", seeds=[0, 1], steps=2, n_per_class=30)
    rec = run_notebook("06_tcm_mnist_toy", params, results=tmp_path / "results")
    p = rec["params"]
    assert p["hidden"] == cfg["hidden"] == 512 and p["embed_dim"] == 3 and p["steps"] == 2
    assert p["arcface_margin_candidates"] == cfg["arcface_margin_candidates"]
    assert any(e.startswith("MNIST toy 3-D, ") for e in _experiments(rec))
    assert rec["claims"] and all(c["id"].startswith("tcm.mnist_toy.") for c in rec["claims"])
    _no_temp_files(tmp_path / "results")


def _cc3m_cifar(root: Path, n_train: int = 8, n_val: int = 4) -> None:
    """DATA_ROOT/cc3m/{train,val}.tsv (CC3M-style, filepath<TAB>title, images beside) + CIFAR-10/100 batches."""
    words = ["red", "blue", "green", "small", "large", "round", "square", "striped"]
    caps = [f"a {words[i % 8]} {words[(3 * i + 1) % 8]} thing" for i in range(n_train + n_val)]
    ft.make_image_text(root / "cc3m", name="train.tsv", captions=caps[:n_train])
    ft.make_image_text(root / "cc3m", name="val.tsv", captions=caps[n_train:], first_value=n_train + 1)
    ft.make_cifar(root, "cifar10")
    ft.make_cifar(root, "cifar100")


# 02's frozen-feature study (it runs at the paper profile too), tiny: a small pool, two batch sizes, a few steps
_TINY_02_FROZEN = dict(head_pool=120, head_test=40, head_resolution=32, head_views=2, head_pca_dim=16, head_proj_dim=8,
                       head_batch_sizes=[8, 16], head_steps_at_largest=2, val_pool=60, val_steps=2, vl_n_items=120,
                       vl_steps=2, vl_batch_size=16, vl_proj_dim=8)


@pytest.mark.slow
def test_02_small_batch_contrastive_paper_path(tmp_path):
    # mode end_to_end: the SSL sweep on ImageNet-style folders and the CLIP runs on a CC3M-style TSV with CIFAR
    # zero-shot, all from DATA_ROOT; the small CNN / the tiny open_clip preset instead of ResNet-50 / RN50, one
    # step per run; the paper's view mode (fresh views every step), losses, temperature and momentum
    root = tmp_path / "data"
    ft.make_image_folder(root / "imagenet" / "train", classes=("cat", "dog", "zebra", "yak"), per_class=4)
    ft.make_image_folder(root / "imagenet" / "val", classes=("cat", "dog", "zebra", "yak"), per_class=2)
    _cc3m_cifar(root)
    cfg = _paper("02_small_batch_contrastive")
    e2e = dict(cfg["end_to_end"], device="cpu", torch_threads=1, ckpt_every=0, ssl_image_size=32,
               ssl_batch_sizes=[4, 8], ssl_budget="steps", ssl_steps=1, ssl_n_test=8, ssl_backbone="small_cnn",
               ssl_proj_dim=16, ssl_num_workers=0, ssl_knn_k=3, ssl_eval_n_train=16, ssl_probe_Cs=[1.0],
               clip_preset="tiny", clip_image_size=32, clip_batch_size=4, clip_epochs=1.0, clip_shots=[1],
               clip_few_shot_draws=1, clip_n_probe_train=8, clip_n_retrieval=4)
    params = profile_params("02_small_batch_contrastive", "paper", seeds=[0, 1], workers=1, end_to_end=e2e,
                            head_arms=["conventional", "control", "decomposable"], **_TINY_02_FROZEN)
    assert params["mode"] == "end_to_end" and params["end_to_end"]["ssl_dataset"] == "image_folder"
    rec = run_notebook("02_small_batch_contrastive", params, results=tmp_path / "results", data_root=root)
    p = rec["params"]
    assert p["mode"] == "end_to_end" and p["end_to_end"]["clip_source"] == cfg["end_to_end"]["clip_source"]
    assert p["end_to_end"]["ssl_view_mode"] == "online" and p["end_to_end"]["ssl_temperature"] == 0.2
    e = rec["metrics"]["end_to_end"]
    assert set(e["ssl"]) == {"infonce|4", "infonce|8", "decomposable|4", "decomposable|8"}
    assert set(e["clip"]) == {"clip|0", "clip|1", "decomposable|0", "decomposable|1"}
    assert any(x.startswith("SSL end-to-end") for x in _experiments(rec))
    assert any(x.startswith("CLIP end-to-end") for x in _experiments(rec))
    ids = {c["id"] for c in rec["claims"]}
    assert "dcl.ssl_end_to_end.half_batch" in ids and any(i.startswith("dcl.vl_end_to_end.") for i in ids)
    _no_temp_files(tmp_path / "results")


@pytest.mark.slow
def test_04_clip_modality_structures_paper_path(tmp_path):
    # mode end_to_end on CC3M-style pairs with CIFAR-10/100 zero-shot and probes from DATA_ROOT: open_clip's tiny
    # preset instead of RN50, two steps per tower, CLIP and GC (the paper's fixed weight), two seeds; the paper's
    # prompt templates; a checkpoint every step so that the resumable path is taken
    root = tmp_path / "data"
    _cc3m_cifar(root)
    cfg = _paper("04_clip_modality_structures")
    params = profile_params("04_clip_modality_structures", "paper", seeds=[0, 1], methods=["clip", "gc"],
                            preset="tiny", image_size=32, context_length=16, epochs=1, batch_size=4, warmup_steps=1,
                            few_shot=[1], few_shot_draws=1, probe_Cs=[1.0], probe_max_iter=50, ckpt_every=1,
                            torch_threads=1, workers=1, device="cpu")
    assert params["mode"] == "end_to_end" and params["dataset"] == "cc3m" == cfg["dataset"]
    rec = run_notebook("04_clip_modality_structures", params, results=tmp_path / "results", data_root=root)
    p = rec["params"]
    assert p["mode"] == "end_to_end" and p["dataset"] == "cc3m" and p["templates"] == cfg["templates"]
    assert p["lr"] == cfg["lr"] and p["weight_decay"] == cfg["weight_decay"] and p["e2e_weights"]["gc"] == 0.25
    assert rec["summary"] and rec["claims"]
    assert any(c["id"].startswith("lms.clip.gc_vs_clip.") for c in rec["claims"])
    # one checkpoint folder per (seed, method): they shared one, and the second run refused the first one's checkpoint
    ckpts = tmp_path / "results" / "04_clip_modality_structures" / "paper" / "checkpoints"
    assert {d.name for d in ckpts.glob("*/*") if list(d.glob("step_*.pt"))} == {
        "seed0_clip", "seed0_gc", "seed1_clip", "seed1_gc"}
    _no_temp_files(tmp_path / "results")


@pytest.mark.slow
def test_01_synthetic_noise_study_paper_path(tmp_path):
    # generated data; the paper profile is the same study, larger: its batch size, its momentum candidates, its
    # heaviest noise and its bias noise, with a few steps, two seeds and few Monte-Carlo draws
    cfg = _paper("01_synthetic_noise_study")
    params = profile_params("01_synthetic_noise_study", "paper", seeds=[0, 1], noise_levels=[0.0, 1024.0], steps=4,
                            val_seeds=[100], val_steps=2, bias_batch_sizes=[2, 4], bias_draws=50, workers=1)
    assert params["batch_size"] == cfg["batch_size"] == 64
    rec = run_notebook("01_synthetic_noise_study", params, results=tmp_path / "results")
    p = rec["params"]
    assert p["batch_size"] == 64 and p["steps"] == 4 and p["momentum_candidates"] == cfg["momentum_candidates"]
    assert p["bias_noise"] == cfg["bias_noise"] and p["val_noise"] == cfg["val_noise"]
    assert {"synthetic, noise 0, B=64", "synthetic, noise 1024, B=64"} <= _experiments(rec)
    assert "decomposable: runs within 0.01 of 1.0" in _metrics(rec)
    assert {"dcl.synthetic.noise0.decomposable", "dcl.synthetic.noise1024.decomposable"} <= \
        {c["id"] for c in rec["claims"]}
    assert set(rec["metrics"]["momentum_validation"]["scores"]) == {str(m) for m in cfg["momentum_candidates"]}
    _no_temp_files(tmp_path / "results")


@pytest.mark.slow
def test_03_information_gap_paper_path(tmp_path):
    # generated scenes; the paper profile's probe settings shape, with tiny worlds, two gaps, two alignment scales
    cfg = _paper("03_information_gap")
    params = profile_params("03_information_gap", "paper", seeds=[0, 1], info_gaps=[0.0, 0.9], align_scales=[0.0, 1.0],
                            n_scenes=120, n_test=40, n_probe_train=60, image_size=32, steps=2, batch_size=32,
                            warmup_steps=1, probe_Cs=[1.0], probe_max_iter=50, workers=1)
    assert params["torch_threads"] == cfg["torch_threads"] == 0
    rec = run_notebook("03_information_gap", params, results=tmp_path / "results")
    p = rec["params"]
    assert p["n_scenes"] == 120 and p["steps"] == 2 and p["lr"] == 2e-3
    assert {"information gap (world)", "Fig. 2 alignment (world)"} <= _experiments(rec)
    ids = {c["id"] for c in rec["claims"]}
    assert {"lms.info_gap.gap.class", "lms.fig2.align_scale_1"} <= ids
    assert len(rec["metrics"]["units"]) == 2
    _no_temp_files(tmp_path / "results")


@pytest.mark.slow
def test_05_albef_modality_structures_paper_path(tmp_path):
    # generated scenes; the paper profile's three tasks (NLVR as well) and 128-d embeddings, a narrower fusion
    # encoder of depth 2 (> 1, as the paper's 4), two methods, tiny worlds, two steps of pre-training and fine-tuning
    cfg = _paper("05_albef_modality_structures")
    params = profile_params("05_albef_modality_structures", "paper", seeds=[0, 1], methods=["albef", "gc"],
                            n_scenes=120, image_size=32, width=64, fusion_depth=2, pretrain_steps=2, pretrain_batch=16,
                            finetune_steps=2, finetune_batch=16, eval_every=2, workers=1)
    assert params["tasks"] == cfg["tasks"] == ["vqa", "ve", "nlvr"]
    rec = run_notebook("05_albef_modality_structures", params, results=tmp_path / "results")
    p = rec["params"]
    assert p["embed_dim"] == cfg["embed_dim"] == 128 and p["tasks"] == cfg["tasks"] and p["fusion_depth"] == 2
    assert {"ALBEF-style fusion (world, frozen features): albef", "ALBEF-style fusion (world, frozen features): gc"} \
        <= _experiments(rec)
    assert {"vqa test acc. (%)", "ve test acc. (%)", "nlvr test acc. (%)"} <= _metrics(rec)
    assert {"lms.albef.gc.nlvr"} <= {c["id"] for c in rec["claims"]}
    _no_temp_files(tmp_path / "results")
