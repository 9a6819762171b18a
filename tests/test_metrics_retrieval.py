"""Retrieval / classification metrics against hand-worked examples and pytorch-metric-learning."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from contrastive_repro.metrics import (build_zeroshot_classifier, few_shot_splits, image_text_recall, knn_accuracy,
                                       linear_probe_accuracy, map_at_r, recall_at_k, zero_shot_accuracy)
from contrastive_repro.utils import NonFiniteError


def on_circle(degrees, dtype=torch.float32):
    """Unit vectors in the plane; cosine similarity decreases with the angle between them (for |delta| <= 180)."""
    a = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(a), torch.sin(a)], 1).to(dtype)


# Six points at angles 0, 10, 25, 45, 100, 120 with labels 0, 1, 0, 1, 1, 1.
# Neighbours by angle (label), nearest first:
#   p0 (0,  L0): p1 10 (1), p2 25 (0), p3 45, p4 100, p5 120   -> first positive at rank 2
#   p1 (10, L1): p0 10 (0), p2 15 (0), p3 35 (1), ...         -> rank 3
#   p2 (25, L0): p1 15 (1), p3 20 (1), p0 25 (0)              -> rank 3
#   p3 (45, L1): p2 20 (0), p1 35 (1), p0 45 (0), p4 55 (1)    -> rank 2
#   p4 (100, L1): p5 20 (1), p3 55 (1), p2 75 (0)             -> rank 1
#   p5 (120, L1): p4 20 (1), p3 75 (1), p2 95 (0)             -> rank 1
# No two distances from the same point are equal, so there are no ties.
HAND = dict(angles=[0, 10, 25, 45, 100, 120], labels=[0, 1, 0, 1, 1, 1])


def test_recall_at_k_hand_example():
    x = on_circle(HAND["angles"])
    r = recall_at_k(x, HAND["labels"], ks=(1, 2, 3, 4, 8))
    # first-positive ranks 2, 3, 3, 2, 1, 1; k = 8 is capped at the 5 other samples
    assert r == pytest.approx({"R@1": 2 / 6, "R@2": 4 / 6, "R@3": 1.0, "R@4": 1.0, "R@8": 1.0})


def test_map_at_r_hand_example():
    # L0 has 2 samples (R = 1), L1 has 4 (R = 3).
    #   p0: top1 = p1 (miss) -> 0                 p2: top1 = p1 (miss) -> 0
    #   p1: top3 = p0, p2, p3 -> hit at 3: (1/3)/3 = 1/9
    #   p3: top3 = p2, p1, p0 -> hit at 2: (1/2)/3 = 1/6
    #   p4: top3 = p5, p3, p2 -> hits at 1, 2: (1 + 1)/3 = 2/3       p5: same, 2/3
    # MAP@R = (1/9 + 1/6 + 4/3) / 6 = 29/108
    x = on_circle(HAND["angles"])
    assert map_at_r(x, HAND["labels"]) == pytest.approx(29 / 108)
    assert map_at_r(x, HAND["labels"], chunk_size=4) == pytest.approx(29 / 108)
    pml = _pml_scores(x, torch.tensor(HAND["labels"]))
    assert pml["mean_average_precision_at_r"] == pytest.approx(29 / 108)
    assert pml["precision_at_1"] == pytest.approx(2 / 6)


def test_recall_with_separate_gallery_and_lone_queries():
    # queries: q0 at 0 (L0), q1 at 90 (L1), q2 at 45 (L5, absent from the gallery)
    # gallery: g0 at 10 (L1), g1 at 30 (L0), g2 at 80 (L1), g3 at 200 (L2)
    #   q0: g0 (L1), g1 (L0) -> rank 2       q1: g2 (L1) -> rank 1       q2: lone
    q, ql = on_circle([0, 90, 45]), [0, 1, 5]
    g, gl = on_circle([10, 30, 80, 200]), [1, 0, 1, 2]
    r = recall_at_k(q, ql, ks=(1, 2), gallery_embeddings=g, gallery_labels=gl)
    assert r == pytest.approx({"R@1": 1 / 2, "R@2": 1.0})
    r = recall_at_k(q, ql, ks=(1, 2), gallery_embeddings=g, gallery_labels=gl, exclude_lone_queries=False)
    assert r == pytest.approx({"R@1": 1 / 3, "R@2": 2 / 3})
    # MAP@R: q0 has R = 1 (g1) and its top1 is g0 -> 0; q1 has R = 2 (g0, g2), top2 = g2 (10 deg, hit), g1 (60 deg,
    # miss) -> (1/1)/2 = 1/2; q2 is lone -> (0 + 1/2) / 2
    assert map_at_r(q, ql, gallery_embeddings=g, gallery_labels=gl) == pytest.approx(1 / 4)
    with pytest.raises(ValueError):
        recall_at_k(q, ql, gallery_embeddings=g)


def _pml_scores(x, lab):
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              knn_func=CustomKNN(CosineSimilarity()), device=torch.device("cpu"))
    return calc.get_accuracy(x, lab)


def test_recall_and_map_at_r_match_pml():
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 12, (500,), generator=g)
    lab[:3] = torch.tensor([100, 101, 102])  # lone queries: PML leaves them out, so do we
    x = torch.randn(12, 16, generator=g)[lab % 12] + 1.3 * torch.randn(500, 16, generator=g)
    pml = _pml_scores(x, lab)
    assert recall_at_k(x, lab, ks=(1,))["R@1"] == pytest.approx(pml["precision_at_1"], abs=1e-12)
    assert map_at_r(x, lab) == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-10)
    assert map_at_r(x, lab, chunk_size=37) == pytest.approx(pml["mean_average_precision_at_r"], abs=1e-10)
    # bf16 and numpy inputs are accepted
    assert 0 < recall_at_k(x.to(torch.bfloat16), lab)["R@1"] <= 1
    assert recall_at_k(x.numpy(), lab.numpy()) == recall_at_k(x, lab)


def test_image_text_recall_hand_example():
    # images at 0, 90, 180; captions (image): c0 100 (0), c1 20 (0), c2 170 (1), c3 185 (2), c4 60 (2)
    # image -> text, captions by distance:
    #   img0: c1 (img0)                                   -> rank 1
    #   img1: c0 10 (img0), c4 30 (img2), c1 70 (img0), c2 80 (img1)  -> rank 4
    #   img2: c3 5 (img2)                                 -> rank 1
    # text -> image:
    #   c0: img1 10, img2 80, img0 100 -> rank 3;  c1: img0 -> 1;  c2: img2 10, img1 80 -> 2;
    #   c3: img2 -> 1;  c4: img1 30, img0 60, img2 120 -> 3
    imgs, txts = on_circle([0, 90, 180]), on_circle([100, 20, 170, 185, 60])
    r = image_text_recall(imgs, txts, [0, 0, 1, 2, 2], ks=(1, 2, 3))
    expected = {"i2t_R@1": 2 / 3, "i2t_R@2": 2 / 3, "i2t_R@3": 2 / 3,
                "t2i_R@1": 2 / 5, "t2i_R@2": 3 / 5, "t2i_R@3": 1.0}
    expected["mean_recall"] = sum(expected.values()) / 6
    assert r == pytest.approx(expected)
    assert image_text_recall(imgs, txts, [0, 0, 1, 2, 2], ks=(1, 2, 3), chunk_size=1) == pytest.approx(expected)
    r10 = image_text_recall(imgs, txts, [0, 0, 1, 2, 2])  # k = 5, 10 exceed the sets: everything is found
    assert r10["i2t_R@10"] == 1.0 and r10["t2i_R@5"] == 1.0


def test_image_text_recall_image_without_caption_is_left_out():
    imgs, txts = on_circle([0, 90, 180]), on_circle([5, 95])
    r = image_text_recall(imgs, txts, [0, 1], ks=(1,))
    assert r["i2t_R@1"] == 1.0 and r["t2i_R@1"] == 1.0
    with pytest.raises(ValueError):
        image_text_recall(imgs, txts, [0, 3])


def test_zero_shot_accuracy_hand_example():
    # classes at 0, 120, 240; images: 10 (label 0) -> class 0; 100 (label 1) -> class 1;
    # 200 (label 0): class 2 (40), class 1 (80), class 0 (160) -> correct only at k = 3
    acc = zero_shot_accuracy(on_circle([10, 100, 200]), on_circle([0, 120, 240]), [0, 1, 0], topk=(1, 2, 3, 5))
    assert acc == pytest.approx({"top1": 2 / 3, "top2": 2 / 3, "top3": 1.0, "top5": 1.0})


def test_build_zeroshot_classifier_averages_normalized_prompts():
    table = {"a photo of a cat": [3.0, 0.0], "a drawing of a cat": [0.0, 0.5],
             "a photo of a dog": [-2.0, 0.0], "a drawing of a dog": [-1.0, -1.0]}

    def tokenizer(texts):
        return list(texts)

    def encode(tokens):
        return torch.tensor([table[t] for t in tokens])

    w = build_zeroshot_classifier(encode, tokenizer, ["cat", "dog"],
                                  ["a photo of a {}", lambda c: f"a drawing of a {c}"])
    cat = torch.tensor([1.0, 0.0]) + torch.tensor([0.0, 1.0])
    dog = torch.tensor([-1.0, 0.0]) + torch.tensor([-1.0, -1.0]) / math.sqrt(2)
    torch.testing.assert_close(w, torch.stack([cat / cat.norm(), dog / dog.norm()]))


def test_knn_accuracy_votes_ties_and_temperature():
    tr, ytr = on_circle([0, 10, 20, 90, 95, 180]), [0, 0, 1, 1, 1, 2]
    # test at 5 (label 0): neighbours 0 (L0), 10 (L0), 20 (L1) -> L0. test at 52 (label 1): 20 (L1), 90 (L1), 10 (L0)
    assert knn_accuracy(tr, ytr, on_circle([5, 52]), [0, 1], k=3) == 1.0
    # k = 2 at 14: 10 (L0, 4 deg) and 20 (L1, 6 deg) tie 1-1; the larger similarity sum (L0) wins
    assert knn_accuracy(tr, ytr, on_circle([14]), [0], k=2) == 1.0
    assert knn_accuracy(tr, ytr, on_circle([16]), [1], k=2) == 1.0
    # majority says L1 (30 and 33 deg away), similarity weighting with a small temperature says L0 (2 deg away)
    tr2, y2 = on_circle([0, 30, 33]), [0, 1, 1]
    assert knn_accuracy(tr2, y2, on_circle([2]), [1], k=3) == 1.0
    assert knn_accuracy(tr2, y2, on_circle([2]), [0], k=3, temperature=0.01) == 1.0


def _blobs(n_per, n_cls=4, dim=8, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(n_cls, dim, generator=g)
    y = torch.arange(n_cls).repeat_interleave(n_per)
    return centers[y] + spread * torch.randn(len(y), dim, generator=g), y


def test_linear_probe_accuracy():
    xtr, ytr = _blobs(40)
    g = torch.Generator().manual_seed(5)  # test points: jittered copies of every other training point
    xte = xtr[::2] + 0.1 * torch.randn(xtr[::2].shape, generator=g)
    yte = ytr[::2]
    det = linear_probe_accuracy(xtr, ytr, xte, yte, Cs=(1e-3, 1e-1, 10.0), return_details=True)
    assert det["accuracy"] >= 0.95 and det["validated"]
    assert set(det["val_accuracy"]) == {1e-3, 1e-1, 10.0}
    # the choice of C never looks at the test set
    det2 = linear_probe_accuracy(xtr, ytr, xte, yte.flip(0), Cs=(1e-3, 1e-1, 10.0), return_details=True)
    assert det2["C"] == det["C"] and det2["val_accuracy"] == det["val_accuracy"]
    # one sample per class: no validation split possible -> default C
    idx, _ = few_shot_splits(ytr, 1, seed=0)
    d1 = linear_probe_accuracy(xtr[idx], ytr[idx], xte, yte, Cs=(0.1, 1.0), default_C=0.5, return_details=True)
    assert d1["C"] == 0.5 and not d1["validated"]
    assert 0.0 <= linear_probe_accuracy(xtr, ytr, xte, yte, Cs=(1.0,), preprocess="l2") <= 1.0


def test_few_shot_splits():
    y = np.array([0] * 5 + [1] * 7 + [2] * 3)
    sup, rest = few_shot_splits(y, 2, seed=3)
    assert len(sup) == 6 and np.bincount(y[sup]).tolist() == [2, 2, 2]
    assert len(np.intersect1d(sup, rest)) == 0 and len(sup) + len(rest) == len(y)
    assert np.array_equal(few_shot_splits(y, 2, seed=3)[0], sup)
    with pytest.raises(ValueError):
        few_shot_splits(y, 4)
    sup_t, _ = few_shot_splits(torch.tensor(y), 1, seed=0)
    assert np.bincount(y[sup_t]).tolist() == [1, 1, 1]


def test_non_finite_inputs_raise():
    x = on_circle(HAND["angles"])
    x[2, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        recall_at_k(x, HAND["labels"])
    with pytest.raises(NonFiniteError):
        map_at_r(x, HAND["labels"])
    with pytest.raises(NonFiniteError):
        knn_accuracy(x, HAND["labels"], x, HAND["labels"])
    with pytest.raises(ValueError):
        recall_at_k(x[:1], [0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x, y = _blobs(30, n_cls=5, seed=2, spread=3.0)
    assert recall_at_k(x.cuda(), y.cuda()) == recall_at_k(x, y)
    assert map_at_r(x.cuda(), y.cuda()) == pytest.approx(map_at_r(x, y))
    assert knn_accuracy(x.cuda(), y.cuda(), x.cuda(), y.cuda(), k=5) == knn_accuracy(x, y, x, y, k=5)


# ------------------------------------------------------------------------------------------ bad input is named
def test_zero_shot_rejects_labels_out_of_range_and_mismatched_sizes():
    from contrastive_repro.metrics.retrieval import zero_shot_accuracy

    img, cls = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\).*\[2, 5\]"):
        zero_shot_accuracy(img, cls, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\).*\[-1\]"):
        zero_shot_accuracy(img, cls, torch.tensor([0, 1, -1, 0]))
    with pytest.raises(ValueError, match="image_features has feature size 3 but class_text_features has 5"):
        zero_shot_accuracy(img, torch.randn(2, 5), torch.tensor([0, 1, 1, 0]))


def test_knn_rejects_mismatched_sizes_and_unknown_test_classes():
    from contrastive_repro.metrics.retrieval import knn_accuracy

    xtr, ytr = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="train_x has feature size 3 but test_x has 4"):
        knn_accuracy(xtr, ytr, torch.randn(2, 4), torch.tensor([0, 1]), k=2)
    with pytest.raises(ValueError, match=r"test_y has classes that never occur in train_y.*\[7\]"):
        knn_accuracy(xtr, ytr, torch.randn(2, 3), torch.tensor([0, 7]), k=2)


def test_integer_embeddings_are_refused():
    from contrastive_repro.metrics import evaluate_retrieval
    from contrastive_repro.metrics.retrieval import knn_accuracy, zero_shot_accuracy

    ints = torch.randint(0, 5, (6, 3))
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(TypeError, match="train_x must be floating-point embeddings, got dtype torch.int64"):
        knn_accuracy(ints, labels, torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="class_text_features must be floating-point"):
        zero_shot_accuracy(torch.randn(6, 3), ints[:3], labels % 3)
    with pytest.raises(ValueError, match="embeddings must be a 2-D floating tensor.*int64"):
        evaluate_retrieval(ints, labels)


def test_evaluate_retrieval_with_only_singleton_classes_is_an_error():
    from contrastive_repro.metrics import evaluate_retrieval

    with pytest.raises(ValueError, match="every class has one sample.*6 classes for 6 samples"):
        evaluate_retrieval(torch.randn(6, 3), torch.arange(6))
