"""VQA v2 / NLVR2 / SNLI-VE / Karpathy-split loaders on tiny fixture trees written in the released formats."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contrastive_repro.data.errors import CorruptDatasetError, DatasetNotFoundError, EmptyDatasetError
from contrastive_repro.data.vl_benchmarks import (NLVR2, SNLIVE, VE_LABELS, KarpathyRetrieval, VQAv2,
                                                  build_answer_vocab, normalize_answer, vqa_accuracy)


def _img(path: Path, value: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((6, 6, 3), value, dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _red(img: Image.Image) -> int:
    return int(np.asarray(img)[2, 2, 0])


# ------------------------------------------------------------------------------------------------ fixture trees
def make_vqav2(root: Path, split: str = "val2014") -> None:
    d = root / "vqav2"
    d.mkdir(parents=True, exist_ok=True)
    qs = [{"image_id": 42, "question": "What color is the cat?", "question_id": 420},
          {"image_id": 42, "question": "How many cats?", "question_id": 421},
          {"image_id": 7, "question": "Is it raining?", "question_id": 70}]
    (d / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "questions": qs,
         "license": {}}))
    answers = {420: ["black"] * 6 + ["gray"] * 2 + ["dark"] * 2, 421: ["2"] * 4 + ["two"] * 3 + ["3"] * 3,
               70: ["no"] * 10}
    anns = [{"question_id": qid, "image_id": qid // 10, "question_type": "what", "answer_type": "other",
             "multiple_choice_answer": Counter(a).most_common(1)[0][0], "answers": [{"answer": x, "answer_confidence": "yes",
                                                                     "answer_id": i + 1} for i, x in enumerate(a)]}
            for qid, a in answers.items()]
    if not split.startswith("test"):
        (d / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(
            {"info": {}, "data_type": "mscoco", "data_subtype": split, "annotations": anns, "license": {}}))
    folder = "test2015" if split.startswith("test") else split
    for iid, v in ((42, 200), (7, 70)):
        _img(root / "coco" / folder / f"COCO_{folder}_{iid:012d}.jpg", v, "JPEG")


def make_nlvr2(root: Path) -> None:
    d = root / "nlvr2"
    d.mkdir(parents=True, exist_ok=True)
    train = [{"identifier": "train-10171-0-0", "sentence": "One image shows exactly two dogs.", "label": "True",
              "directory": 10, "left_url": "http://x", "right_url": "http://y"},
             {"identifier": "train-10171-0-1", "sentence": "Both images show a cat.", "label": "False",
              "directory": 10}]
    (d / "train.json").write_text("\n".join(json.dumps(r) for r in train) + "\n")
    dev = [{"identifier": "dev-850-0-0", "sentence": "There are birds.", "label": "False"}]
    (d / "dev.json").write_text(json.dumps(dev[0]) + "\n\n")
    _img(d / "images" / "train" / "10" / "train-10171-0-img0.png", 10)
    _img(d / "images" / "train" / "10" / "train-10171-0-img1.png", 11)
    _img(d / "images" / "dev" / "dev-850-0-img0.png", 20)
    _img(d / "images" / "dev" / "dev-850-0-img1.png", 21)


def make_snli_ve(root: Path) -> None:
    d = root / "snli_ve"
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"Flickr30K_ID": "3416050480", "sentence1": "premise", "sentence2": "A dog runs.",
             "gold_label": "entailment", "pairID": "1"},
            {"Flickr30K_ID": "3416050480", "sentence2": "A dog sleeps.", "gold_label": "contradiction"},
            {"Flickr30K_ID": "1000092795", "sentence2": "Two men are friends.", "gold_label": "neutral"},
            {"Flickr30K_ID": "1000092795", "sentence2": "Unlabelled.", "gold_label": "-"}]
    (d / "snli_ve_test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _img(root / "flickr30k" / "flickr30k-images" / "3416050480.jpg", 34, "JPEG")
    _img(root / "flickr30k" / "flickr30k-images" / "1000092795.jpg", 100, "JPEG")


def make_karpathy(root: Path) -> None:
    d = root / "karpathy"
    d.mkdir(parents=True, exist_ok=True)
    coco = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test", "imgid": 0,
         "cocoid": 391895, "sentences": [{"raw": "A man riding a bike. ", "tokens": ["a"]}, {"raw": "A cyclist."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "split": "restval",
         "sentences": [{"raw": "restval caption"}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000002.jpg", "split": "train",
         "sentences": [{"raw": "train caption"}]}]}
    (d / "dataset_coco.json").write_text(json.dumps(coco))
    flickr = {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "Two young guys."}]}]}
    (d / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    _img(root / "coco" / "val2014" / "COCO_val2014_000000391895.jpg", 91, "JPEG")
    _img(root / "coco" / "val2014" / "COCO_val2014_000000000001.jpg", 1, "JPEG")
    _img(root / "coco" / "train2014" / "COCO_train2014_000000000002.jpg", 2, "JPEG")
    _img(root / "flickr30k" / "flickr30k-images" / "1000092795.jpg", 100, "JPEG")


# ------------------------------------------------------------------------------------------------------- VQA v2
def test_vqav2_reads_questions_answers_and_images(tmp_path, monkeypatch):
    make_vqav2(tmp_path)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    ds = VQAv2("val2014")
    assert len(ds) == 3
    r = ds.records[0]
    assert (r.question_id, r.image_id, r.question, r.answer) == (420, 42, "What color is the cat?", "black")
    assert r.image_path == tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg"
    img, q, answers = ds[2]
    assert isinstance(img, Image.Image) and abs(_red(img) - 70) <= 3 and q == "Is it raining?"
    assert answers == ["no"] * 10


def test_vqav2_test_split_has_no_answers(tmp_path):
    make_vqav2(tmp_path, "test-dev2015")
    ds = VQAv2("test-dev2015", root=tmp_path)
    assert all(r.answers == [] and r.answer is None for r in ds.records)
    assert ds.records[0].image_path.parent.name == "test2015"


def test_vqav2_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as ei:
        VQAv2("train2014", root=tmp_path)
    msg = str(ei.value)
    assert "v2_OpenEnded_mscoco_train2014_questions.json" in msg and "DATA_ROOT/vqav2/" in msg
    make_vqav2(tmp_path)
    (tmp_path / "coco" / "val2014" / "COCO_val2014_000000000007.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match="1 of 2 image files are missing"):
        VQAv2("val2014", root=tmp_path)
    assert len(VQAv2("val2014", root=tmp_path, check_files=False)) == 3
    with pytest.raises(ValueError):
        VQAv2("val", root=tmp_path)


def test_vqav2_corrupt_file(tmp_path):
    make_vqav2(tmp_path)
    (tmp_path / "vqav2" / "v2_mscoco_val2014_annotations.json").write_text("{not json")
    with pytest.raises(CorruptDatasetError):
        VQAv2("val2014", root=tmp_path)


def test_vqa_accuracy_matches_the_official_leave_one_out_formula():
    # by hand: 10 answers, k humans said "black": each left-out subset has k or k-1 matches
    answers = ["black"] * 2 + ["gray"] * 8
    # leaving out a "black": 1 match -> 1/3; leaving out a "gray": 2 matches -> 2/3
    assert vqa_accuracy("black", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("gray", answers) == pytest.approx(1.0)
    assert vqa_accuracy("Black.", ["black"] * 3 + ["x"] * 7) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("two", ["2"] * 10) == 1.0  # number words normalised
    assert vqa_accuracy("dog", []) == 0.0
    assert normalize_answer("The Dog!") == "dog" and normalize_answer("3.5") == "3.5"
    assert normalize_answer("dont know") == "don't know"


def test_build_answer_vocab_orders_by_frequency():
    vocab = build_answer_vocab([["yes", "yes", "no"], ["No", "two", "2"], ["cat"]], top_k=3)
    assert vocab == ["2", "no", "yes"]  # "2" x2 (two -> 2), "no" x2, "yes" x2: ties alphabetical


# -------------------------------------------------------------------------------------------------------- NLVR2
def test_nlvr2_pairs_labels_and_directories(tmp_path, monkeypatch):
    make_nlvr2(tmp_path)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    tr = NLVR2("train")
    assert len(tr) == 2 and tr.labels == [1, 0]
    r = tr.records[0]
    assert r.left_path == tmp_path / "nlvr2" / "images" / "train" / "10" / "train-10171-0-img0.png"
    assert r.right_path.name == "train-10171-0-img1.png"
    left, right, sentence, label = tr[0]
    assert (_red(left), _red(right), label) == (10, 11, 1) and sentence.startswith("One image")
    dev = NLVR2("dev")  # blank lines are skipped; no directory field
    assert len(dev) == 1 and dev.records[0].left_path.parent == tmp_path / "nlvr2" / "images" / "dev"


def test_nlvr2_missing_and_bad_label(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="test1.json"):
        NLVR2("test1", root=tmp_path)
    make_nlvr2(tmp_path)
    (tmp_path / "nlvr2" / "images" / "dev" / "dev-850-0-img1.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="dev-850-0-img1.png"):
        NLVR2("dev", root=tmp_path)
    (tmp_path / "nlvr2" / "train.json").write_text(json.dumps(
        {"identifier": "train-1-0-0", "sentence": "s", "label": "maybe"}) + "\n")
    with pytest.raises(CorruptDatasetError, match="neither True nor False"):
        NLVR2("train", root=tmp_path, check_files=False)


# ------------------------------------------------------------------------------------------------------ SNLI-VE
def test_snli_ve_labels_and_images(tmp_path, monkeypatch):
    make_snli_ve(tmp_path)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    ds = SNLIVE("test")
    assert len(ds) == 3 and ds.n_dropped == 1  # the "-" gold label is dropped
    assert ds.labels == [VE_LABELS.index("entailment"), VE_LABELS.index("contradiction"),
                         VE_LABELS.index("neutral")] == [0, 2, 1]
    img, hyp, label = ds[2]
    assert abs(_red(img) - 100) <= 3 and hyp == "Two men are friends." and label == 1
    with pytest.raises(DatasetNotFoundError, match="snli_ve_train.jsonl"):
        SNLIVE("train")


def test_snli_ve_empty_split(tmp_path):
    make_snli_ve(tmp_path)
    (tmp_path / "snli_ve" / "snli_ve_dev.jsonl").write_text(
        json.dumps({"Flickr30K_ID": "1", "sentence2": "x", "gold_label": "-"}) + "\n")
    with pytest.raises(EmptyDatasetError):
        SNLIVE("dev", root=tmp_path)


# --------------------------------------------------------------------------------------------------- Karpathy
def test_karpathy_coco_and_flickr(tmp_path, monkeypatch):
    make_karpathy(tmp_path)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    te = KarpathyRetrieval("coco", "test")
    assert len(te) == 1 and te.images[0].captions == ["A man riding a bike.", "A cyclist."]
    assert te.images[0].path == tmp_path / "coco" / "val2014" / "COCO_val2014_000000391895.jpg"
    texts, t2i = te.pairs()
    assert texts == ["A man riding a bike.", "A cyclist."] and t2i == [0, 0]
    img, caps = te[0]
    assert abs(_red(img) - 91) <= 3 and len(caps) == 2
    assert len(KarpathyRetrieval("coco", "train")) == 2  # train + restval
    assert len(KarpathyRetrieval("coco", "train", include_restval=False)) == 1
    fl = KarpathyRetrieval("flickr30k", "test")
    assert fl.images[0].path == tmp_path / "flickr30k" / "flickr30k-images" / "1000092795.jpg"
    with pytest.raises(EmptyDatasetError):
        KarpathyRetrieval("flickr30k", "val")


def test_karpathy_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as ei:
        KarpathyRetrieval("flickr30k", "test", root=tmp_path)
    assert "dataset_flickr30k.json" in str(ei.value) and "sentences" in str(ei.value)
