"""Retrieval and classification metrics on embeddings: Recall@k, MAP@R, image-text recall, zero-shot, probes.

Every function takes tensors (CPU or CUDA; float32, float64, bf16 or fp16, upcast to float32) or numpy arrays and
returns Python floats. Accuracies and recalls are **fractions in [0, 1]**; multiply by 100 to compare with the
papers' tables. Similarities are cosine similarities of L2-normalized embeddings, computed in chunks of query rows
so that memory is O(chunk x gallery) rather than O(queries x gallery). Ties in similarity are broken by
``torch.topk`` (unspecified order), which is the only way two correct implementations can disagree.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ._common import (as_tensor, check_ks, check_label_range, check_same_dim, default_chunk, dense_labels,
                      float_embeddings, int_labels, l2_normalize)

__all__ = [
    "recall_at_k",
    "map_at_r",
    "image_text_recall",
    "zero_shot_accuracy",
    "build_zeroshot_classifier",
    "linear_probe_accuracy",
    "knn_accuracy",
    "few_shot_splits",
]


# ----------------------------------------------------------------------------------------------------------------
# metric learning: Recall@k and MAP@R
# ----------------------------------------------------------------------------------------------------------------
def _query_gallery(embeddings, labels, gallery_embeddings, gallery_labels):
    q = float_embeddings(embeddings, "embeddings")
    ql = int_labels(labels, q.shape[0], "labels", device=q.device)
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("give both gallery_embeddings and gallery_labels, or neither")
    same = gallery_embeddings is None
    if same:
        g, gl = q, ql
    else:
        g = float_embeddings(gallery_embeddings, "gallery_embeddings", dtype=q.dtype, device=q.device)
        gl = int_labels(gallery_labels, g.shape[0], "gallery_labels", device=q.device)
        if g.shape[1] != q.shape[1]:
            raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    qn = l2_normalize(q)
    gn = qn if same else l2_normalize(g)
    # number of same-label gallery items of each query (itself excluded in the leave-one-out case)
    uniq, counts = torch.unique(gl, return_counts=True)
    pos = torch.searchsorted(uniq, ql).clamp_(max=uniq.numel() - 1)
    n_rel = torch.where(uniq[pos] == ql, counts[pos], torch.zeros_like(pos)) - int(same)
    return qn, ql, gn, gl, same, n_rel


def _masked_sims(qn_chunk, gn, start, same):
    sim = qn_chunk @ gn.T
    if same:
        r = torch.arange(sim.shape[0], device=sim.device)
        sim[r, start + r] = float("-inf")  # leave-one-out: the query never retrieves itself
    return sim


def recall_at_k(embeddings, labels, ks: Sequence[int] = (1, 2, 4, 8), gallery_embeddings=None,
                gallery_labels=None, chunk_size: int | None = None,
                exclude_lone_queries: bool = True) -> dict[str, float]:
    """Recall@k of metric learning (Oh Song et al. 2016): the fraction of queries that have at least one
    same-label item among their k nearest gallery items (cosine similarity of L2-normalized embeddings).

    Without a gallery the embeddings are searched against themselves, leaving the query out (leave-one-out).
    Queries without any same-label gallery item ("lone" queries, e.g. a class of one sample in leave-one-out) are
    left out of the average when ``exclude_lone_queries`` (the convention of PML's ``precision_at_1``); otherwise
    they count as misses. A k larger than the gallery (minus the query) behaves as the gallery size.

    Returns ``{"R@1": ..., "R@2": ..., ...}`` (fractions).
    """
    ks = check_ks(ks)
    qn, ql, gn, gl, same, n_rel = _query_gallery(embeddings, labels, gallery_embeddings, gallery_labels)
    n_avail = gn.shape[0] - int(same)
    if n_avail < 1:
        raise ValueError("the gallery is empty (after leaving the query out)")
    kmax = min(max(ks), n_avail)
    chunk = chunk_size or default_chunk(gn.shape[0])
    hits = torch.zeros(len(ks), dtype=torch.int64, device=qn.device)
    valid_all = n_rel > 0 if exclude_lone_queries else torch.ones_like(n_rel, dtype=torch.bool)
    for s in range(0, qn.shape[0], chunk):
        e = min(s + chunk, qn.shape[0])
        idx = _masked_sims(qn[s:e], gn, s, same).topk(kmax, dim=1).indices
        match = gl[idx] == ql[s:e, None]
        valid = valid_all[s:e]
        first_hit = torch.where(match.any(1), match.int().argmax(1), torch.full_like(idx[:, 0], kmax))
        for j, k in enumerate(ks):
            hits[j] += ((first_hit < min(k, kmax)) & valid).sum()
    n_valid = int(valid_all.sum())
    if n_valid == 0:
        raise ValueError("no query has a same-label item in the gallery")
    return {f"R@{k}": float(hits[j]) / n_valid for j, k in enumerate(ks)}


def map_at_r(embeddings, labels, gallery_embeddings=None, gallery_labels=None,
             chunk_size: int | None = None) -> float:
    """MAP@R (Musgrave, Belongie & Lim 2020, "A metric learning reality check").

    For a query with R same-label gallery items (R = class size - 1 in leave-one-out),
    ``AP@R = (1/R) * sum_{i=1..R} P(i) * rel(i)`` where rel(i) says whether the i-th nearest item has the query's
    label and P(i) is the precision among the first i. MAP@R is the mean over queries with R >= 1 (lone queries
    are left out, as in PML's AccuracyCalculator). Each chunk takes the top ``max R`` of its queries with
    ``torch.topk``, so a dataset with a very large class costs O(chunk x max R) extra memory and topk time.
    """
    qn, ql, gn, gl, same, n_rel = _query_gallery(embeddings, labels, gallery_embeddings, gallery_labels)
    chunk = chunk_size or default_chunk(gn.shape[0])
    total = torch.zeros((), dtype=torch.float64, device=qn.device)
    valid_all = n_rel > 0
    for s in range(0, qn.shape[0], chunk):
        e = min(s + chunk, qn.shape[0])
        r = n_rel[s:e]
        if not bool((r > 0).any()):
            continue
        k = int(r.max())
        idx = _masked_sims(qn[s:e], gn, s, same).topk(k, dim=1).indices
        total += _ap_at_r(gl[idx] == ql[s:e, None], r).sum()
    n_valid = int(valid_all.sum())
    if n_valid == 0:
        raise ValueError("no query has a same-label item in the gallery")
    return float(total) / n_valid


def _ap_at_r(match: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Per-query AP@R from the sorted match matrix [q, k>=max r]; 0 where r == 0."""
    k = match.shape[1]
    ranks = torch.arange(1, k + 1, device=match.device, dtype=torch.float64)
    rel = match & (ranks[None, :] <= r[:, None])
    prec = rel.cumsum(1).to(torch.float64) / ranks
    return (prec * rel).sum(1) / r.clamp(min=1).to(torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# image-text retrieval and zero-shot classification
# ----------------------------------------------------------------------------------------------------------------
def image_text_recall(image_features, text_features, text_to_image, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int | None = None) -> dict[str, float]:
    """Image->text and text->image Recall@k with several captions per image (COCO/Flickr protocol).

    ``text_to_image[j]`` is the index of the image described by caption j. Image->text: an image is correct at k
    if any of its captions is among its k most similar captions; images without a caption are left out.
    Text->image: a caption is correct at k if its image is among its k most similar images.
    Returns ``{"i2t_R@k": ..., "t2i_R@k": ..., "mean_recall": mean of all of them}`` (fractions).
    """
    ks = check_ks(ks)
    img = l2_normalize(float_embeddings(image_features, "image_features"))
    txt = l2_normalize(float_embeddings(text_features, "text_features", dtype=img.dtype, device=img.device))
    if img.shape[1] != txt.shape[1]:
        raise ValueError(f"image dim {img.shape[1]} != text dim {txt.shape[1]}")
    t2i = int_labels(text_to_image, txt.shape[0], "text_to_image", device=img.device)
    n_img, n_txt = img.shape[0], txt.shape[0]
    if n_txt and (int(t2i.min()) < 0 or int(t2i.max()) >= n_img):
        raise ValueError("text_to_image must hold image indices in [0, n_images)")
    out: dict[str, float] = {}
    # image -> text
    has_caption = torch.bincount(t2i, minlength=n_img) > 0
    n_valid = int(has_caption.sum())
    if n_valid == 0:
        raise ValueError("no image has a caption")
    k_it = min(max(ks), n_txt)
    hits = torch.zeros(len(ks), dtype=torch.int64, device=img.device)
    chunk = chunk_size or default_chunk(n_txt)
    for s in range(0, n_img, chunk):
        e = min(s + chunk, n_img)
        idx = (img[s:e] @ txt.T).topk(k_it, dim=1).indices
        match = t2i[idx] == torch.arange(s, e, device=img.device)[:, None]
        first = torch.where(match.any(1), match.int().argmax(1), torch.full_like(idx[:, 0], k_it))
        for j, k in enumerate(ks):
            hits[j] += (first < min(k, k_it)).sum()
    for j, k in enumerate(ks):
        out[f"i2t_R@{k}"] = float(hits[j]) / n_valid
    # text -> image
    k_ti = min(max(ks), n_img)
    hits = torch.zeros(len(ks), dtype=torch.int64, device=img.device)
    chunk = chunk_size or default_chunk(n_img)
    for s in range(0, n_txt, chunk):
        e = min(s + chunk, n_txt)
        idx = (txt[s:e] @ img.T).topk(k_ti, dim=1).indices
        match = idx == t2i[s:e, None]
        first = torch.where(match.any(1), match.int().argmax(1), torch.full_like(idx[:, 0], k_ti))
        for j, k in enumerate(ks):
            hits[j] += (first < min(k, k_ti)).sum()
    for j, k in enumerate(ks):
        out[f"t2i_R@{k}"] = float(hits[j]) / max(n_txt, 1)
    out["mean_recall"] = float(np.mean([v for v in out.values()]))
    return out


def zero_shot_accuracy(image_features, class_text_features, labels,
                       topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Zero-shot top-k accuracy: predict the classes whose text embedding (``class_text_features`` [C, d], e.g. from
    :func:`build_zeroshot_classifier`) is most cosine-similar to the image embedding. A k >= C is always correct.
    Returns ``{"top1": ..., "top5": ...}`` (fractions)."""
    ks = check_ks(topk, "topk")
    img = l2_normalize(float_embeddings(image_features, "image_features"))
    cls = l2_normalize(float_embeddings(class_text_features, "class_text_features", dtype=img.dtype,
                                        device=img.device))
    check_same_dim(img, cls, "image_features", "class_text_features")
    y = int_labels(labels, img.shape[0], "labels", device=img.device)
    if img.shape[0] == 0:
        raise ValueError("no images")
    check_label_range(y, cls.shape[0], "labels")
    kmax = min(max(ks), cls.shape[0])
    pred = (img @ cls.T).topk(kmax, dim=1).indices
    correct = pred == y[:, None]
    return {f"top{k}": float(correct[:, :min(k, kmax)].any(1).double().mean()) for k in ks}


def _module_device(fn) -> torch.device | None:
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        for p in owner.parameters():
            return p.device
    return None


@torch.no_grad()
def build_zeroshot_classifier(encode_text_fn: Callable, tokenizer: Callable, classnames: Iterable[str],
                              templates: Iterable[str | Callable[[str], str]],
                              device: torch.device | str | None = None) -> torch.Tensor:
    """Class embeddings for zero-shot classification (CLIP's prompt ensembling).

    For each class, every template (a string with ``{}`` or a callable ``classname -> prompt``) is filled in,
    tokenized with ``tokenizer(list_of_prompts)``, embedded with ``encode_text_fn(tokens)``; the prompt embeddings
    are L2-normalized, averaged, and the mean is L2-normalized again. Tokens go to ``device`` (by default, the
    device of the module that owns ``encode_text_fn`` when it is a bound method, else they stay where they are).
    Returns a float32 tensor [C, d].
    """
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty")
    device = torch.device(device) if device is not None else _module_device(encode_text_fn)
    rows = []
    for name in classnames:
        prompts = [t(name) if callable(t) else t.format(name) for t in templates]
        tokens = tokenizer(prompts)
        if device is not None and isinstance(tokens, torch.Tensor):
            tokens = tokens.to(device)
        elif device is not None and isinstance(tokens, dict):
            tokens = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in tokens.items()}
        emb = encode_text_fn(tokens)
        emb = l2_normalize(float_embeddings(emb, "text embeddings", dtype=torch.float32))
        rows.append(l2_normalize(emb.mean(0, keepdim=True))[0])
    if not rows:
        raise ValueError("classnames is empty")
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------------------------
# probes: linear (logistic regression) and k-NN; few-shot subsets
# ----------------------------------------------------------------------------------------------------------------
def _numpy_features(x, name):
    return float_embeddings(x, name, dtype=torch.float64).cpu().numpy()


def _numpy_labels(y, n, name):
    return int_labels(y, n, name).cpu().numpy()


def linear_probe_accuracy(train_x, train_y, test_x, test_y,
                          Cs: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4),
                          val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
                          preprocess: str | None = "standardize", default_C: float = 1.0,
                          return_details: bool = False):
    """Linear-probe accuracy: multinomial logistic regression (sklearn, L-BFGS) on frozen features.

    The inverse regularization strength C is chosen from ``Cs`` by accuracy on a stratified validation split of
    ``val_fraction`` carved from the *training* set (the test set is never looked at); ties go to the smaller C.
    The model is then refit on the whole training set with that C and scored on the test set. When the training set
    cannot be split (a class with fewer than 2 samples, or fewer validation samples than classes) or ``Cs`` has one
    value, ``default_C`` (or that value) is used without validation.

    ``preprocess``: ``"standardize"`` (mean/std of the training features), ``"l2"`` (L2-normalize rows) or ``None``.
    CLIP's probe used raw features and a finer C search; standardizing makes one C grid fit all feature scales.
    Returns the test accuracy (fraction), or a dict with ``accuracy``, ``C``, ``val_accuracy`` when
    ``return_details``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    xtr, xte = _numpy_features(train_x, "train_x"), _numpy_features(test_x, "test_x")
    ytr, yte = _numpy_labels(train_y, len(xtr), "train_y"), _numpy_labels(test_y, len(xte), "test_y")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError("train_x and test_x have different feature sizes")
    if preprocess == "standardize":
        mu, sd = xtr.mean(0), xtr.std(0)
        sd[sd < 1e-12] = 1.0
        xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    elif preprocess == "l2":
        xtr = xtr / np.maximum(np.linalg.norm(xtr, axis=1, keepdims=True), 1e-12)
        xte = xte / np.maximum(np.linalg.norm(xte, axis=1, keepdims=True), 1e-12)
    elif preprocess is not None:
        raise ValueError(f"unknown preprocess {preprocess!r}")
    Cs = sorted(float(c) for c in Cs)
    if not Cs or any(c <= 0 for c in Cs):
        raise ValueError("Cs must be positive")

    def fit(x, y, C):
        return LogisticRegression(C=C, max_iter=max_iter, tol=1e-6).fit(x, y)

    classes, counts = np.unique(ytr, return_counts=True)
    if len(classes) < 2:
        raise ValueError("the training set needs at least 2 classes")
    n_val = int(math.ceil(val_fraction * len(ytr)))
    can_split = len(Cs) > 1 and counts.min() >= 2 and len(classes) <= n_val <= len(ytr) - len(classes)
    val_acc: dict[float, float] = {}
    if can_split:
        xa, xb, ya, yb = train_test_split(xtr, ytr, test_size=n_val, stratify=ytr, random_state=seed)
        for C in Cs:
            val_acc[C] = float((fit(xa, ya, C).predict(xb) == yb).mean())
        best_C = max(Cs, key=lambda c: (val_acc[c], -c))
    else:
        best_C = Cs[0] if len(Cs) == 1 else float(default_C)
    acc = float((fit(xtr, ytr, best_C).predict(xte) == yte).mean())
    if return_details:
        return {"accuracy": acc, "C": best_C, "val_accuracy": val_acc, "validated": bool(can_split)}
    return acc


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20, temperature: float | None = None,
                 chunk_size: int | None = None) -> float:
    """k-NN classification accuracy with cosine similarity (the SSL "k-NN monitor").

    Each test sample takes its k most similar training samples. With ``temperature=None`` each neighbour gives one
    vote and ties between classes go to the class with the larger summed similarity; with a temperature T each
    neighbour votes with weight ``exp(similarity / T)`` (Wu et al. 2018; T=0.07 is common). Returns a fraction.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    xtr = l2_normalize(float_embeddings(train_x, "train_x"))
    xte = l2_normalize(float_embeddings(test_x, "test_x", dtype=xtr.dtype, device=xtr.device))
    check_same_dim(xtr, xte, "train_x", "test_x")
    ytr = int_labels(train_y, xtr.shape[0], "train_y", device=xtr.device)
    yte = int_labels(test_y, xte.shape[0], "test_y", device=xtr.device)
    if xtr.shape[0] == 0 or xte.shape[0] == 0:
        raise ValueError("empty train or test set")
    uniq, ytr_d = dense_labels(ytr)
    unseen = yte[~torch.isin(yte, uniq)]
    if unseen.numel():
        raise ValueError(f"test_y has classes that never occur in train_y (a k-NN classifier cannot predict "
                         f"them): {sorted(set(unseen.tolist()))[:10]}")
    n_cls = uniq.numel()
    k = min(k, xtr.shape[0])
    chunk = chunk_size or default_chunk(xtr.shape[0])
    correct = 0
    for s in range(0, xte.shape[0], chunk):
        e = min(s + chunk, xte.shape[0])
        sims, idx = (xte[s:e] @ xtr.T).topk(k, dim=1)
        sims = sims.to(torch.float64)
        nb = ytr_d[idx]
        if temperature is None:
            # votes dominate (each vote is worth more than any possible similarity sum), similarity breaks ties
            w = (2 * k + 1) + sims
        else:
            if temperature <= 0:
                raise ValueError("temperature must be > 0")
            w = torch.exp((sims - 1.0) / temperature)  # shifted for range; the argmax is unchanged
        scores = torch.zeros(e - s, n_cls, dtype=torch.float64, device=xtr.device).scatter_add_(1, nb, w)
        pred = uniq[scores.argmax(1)]
        correct += int((pred == yte[s:e]).sum())
    return correct / xte.shape[0]


def few_shot_splits(labels, shots: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``shots`` samples of every class (without replacement, reproducibly from ``seed``).

    Returns ``(support_idx, rest_idx)``: sorted int64 index arrays of the drawn samples and of all the others.
    Raises ``ValueError`` if a class has fewer than ``shots`` samples. Draw several few-shot training sets by
    changing ``seed``.
    """
    if int(shots) < 1:
        raise ValueError("shots must be >= 1")
    y = np.asarray(as_tensor(labels, "labels").cpu().numpy()).reshape(-1)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < shots:
            raise ValueError(f"class {c!r} has {len(members)} samples, fewer than shots={shots}")
        chosen.append(rng.choice(members, size=int(shots), replace=False))
    support = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    mask = np.ones(len(y), dtype=bool)
    mask[support] = False
    return support, np.flatnonzero(mask).astype(np.int64)
