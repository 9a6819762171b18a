r"""CLIP-style two-tower pre-training on image-caption pairs, with the latent-modality-structure regularizers of
Jiang et al. (CVPR 2023), an information-gap alignment term, and the evaluation helpers the notebooks use.

Objective (one batch of N pairs; :math:`z` are L2-normalised features, :math:`s` the learned logit scale)

.. math::

    L = L_{base} + \sum_r w_r L_r + \alpha\, L_{align}

* :math:`L_{base}`: CLIP's :math:`(L_{V2T} + L_{T2V})/2` (``base="clip"``) or the paper's
  :math:`L_{Con} = (L_{V2T} + L_{T2V} + L_{V2V} + L_{T2T})/4` (``base="clip+inmodal"``), whose in-modal terms use an
  augmented view as the positive: images by random resized crop + horizontal flip (:func:`crop_flip`, the paper's
  "flip and crop") or by picking another pre-rendered view of the same scene (``image_aug="views"``, for the
  generated world); captions by EDA-style random word deletion and swap (:func:`eda_augment`).
* :math:`L_r`, :math:`r \in` {cyclip, separation, bridge, gc}: the terms of
  :class:`contrastive_repro.losses.modality.ModalityStructureLoss` (formulas in that module). The deep-feature
  separation term needs modality-independent features :math:`z^i`; :class:`CLIPTwoTower` adds one linear head per
  tower that maps the tower's *pre-projection* pooled feature (ViT: the ``ln_post`` output at the class token; text
  transformer: the ``ln_final`` output at the end-of-text token; ModifiedResNet: the spatial mean of ``layer4``) to
  the embedding size, normalised.
* :math:`L_{align}` (the paper's Fig. 2 "tighter alignment" term :math:`1/\langle z_T, z_V\rangle^2`), computed by
  :func:`alignment_term` as a **mean over the batch of the per-pair term**, smoothed by ``eps`` so it stays finite
  for a pair whose features are orthogonal (at initialisation the paired cosines are near 0):

  .. math::  L_{align} = \frac1N \sum_j \frac{1}{\langle z_{Tj}, z_{Vj}\rangle^2 + \epsilon}

  It is minimised by :math:`|\langle z_{Tj}, z_{Vj}\rangle| \to 1`, i.e. by collapsing each image onto its caption.
  ``eps = 0`` gives the paper's formula exactly (and is allowed), but then one near-orthogonal pair makes the loss
  and its gradient explode.

Tokenizer: open_clip's BPE. :class:`ClipTokenizer` can restrict the embedding table to the BPE ids that occur in a
given text collection (training captions, evaluation captions, prompts), with the end-of-text id kept the largest
(open_clip pools the text at the argmax id). This is a speed-up only: a BPE id that never occurs in training keeps its
initial embedding (up to weight decay) either way, and the 49,408-row table (3.2M parameters, each updated by AdamW
every step) dominates the cost of the tiny CPU models.

Evaluation helpers return plain dicts: :func:`zero_shot_eval`, :func:`linear_probe_eval`, :func:`few_shot_eval`,
:func:`retrieval_eval` (image->text and text->image Recall@1/5/10), :func:`modality_stats` (modality gap
:math:`\|\overline{z_V} - \overline{z_T}\|`, mean paired cosine) and :func:`evaluate_suite` to run them all.

Paper-scale data: :func:`load_paper_data` reads a CC3M-style TSV and CIFAR-10/100 from ``DATA_ROOT`` and raises
:class:`~contrastive_repro.data.errors.DatasetNotFoundError` (with the expected layout) when they are missing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses.modality import REGULARIZERS, ModalityStructureLoss
from ..utils import check_finite

__all__ = [
    "OPENAI_MEAN", "OPENAI_STD", "BASES", "IMAGE_AUGS", "TEXT_AUGS",
    "eda_words", "eda_augment", "ClipTokenizer", "crop_flip", "PairData", "FilePairs", "to_model_input",
    "CLIPTwoTower", "alignment_term", "CLIPObjective", "CLIPPretrainConfig", "TrainedCLIP", "build_model",
    "needs_augmented_views", "make_batch_fn", "train_clip", "train_image_only",
    "embed_images", "embed_texts", "class_text_features", "zero_shot_eval", "linear_probe_eval", "few_shot_eval",
    "retrieval_eval",
    "modality_gap", "modality_stats", "pca_2d", "ZeroShotTask", "ProbeTask", "EvalSuite", "evaluate_suite",
    "PAPER_LAYOUT", "load_paper_data", "RETRIEVAL_LAYOUT", "load_retrieval_data",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BASES = ("clip", "clip+inmodal")
IMAGE_AUGS = ("crop_flip", "views", "views+crop_flip", "none")
TEXT_AUGS = ("eda", "none")


# ----------------------------------------------------------------------------------------------------------------
# text augmentation: EDA-style random deletion and swap
# ----------------------------------------------------------------------------------------------------------------
def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) or rng is None:
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


def eda_words(words: Sequence, rng, p_delete: float = 0.1, n_swap: int = 1) -> list:
    """EDA's random deletion then random swap on a sequence of words (any items: strings or token-id lists).

    Deletion: every word is dropped independently with probability ``p_delete``; if all would be dropped, one word
    chosen at random is kept (EDA's rule). Swap: ``n_swap`` times, two positions drawn at random are exchanged
    (nothing for fewer than two words). Synonym replacement and random insertion, EDA's other two operations, need
    WordNet and are not used. Deterministic for a given ``rng`` state (a numpy ``Generator`` or an int seed).
    """
    if not 0.0 <= p_delete < 1.0:
        raise ValueError(f"p_delete must lie in [0, 1), got {p_delete}")
    if n_swap < 0:
        raise ValueError(f"n_swap must be >= 0, got {n_swap}")
    rng = _as_rng(rng)
    words = list(words)
    if not words:
        return []
    if p_delete > 0:
        keep = rng.random(len(words)) >= p_delete
        if not keep.any():
            keep[rng.integers(len(words))] = True
        words = [w for w, k in zip(words, keep) if k]
    for _ in range(n_swap):
        if len(words) < 2:
            break
        i, j = rng.choice(len(words), size=2, replace=False)
        words[i], words[j] = words[j], words[i]
    return words


def eda_augment(caption: str, rng, p_delete: float = 0.1, n_swap: int = 1) -> str:
    """An EDA-style augmented caption: :func:`eda_words` on the whitespace-separated words, joined by spaces.

    ``rng``: a numpy ``Generator`` (advanced in place) or an int seed (the same seed gives the same output).
    """
    return " ".join(eda_words(caption.split(), rng, p_delete, n_swap))


# ----------------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------------
class ClipTokenizer:
    """open_clip's BPE tokenizer, optionally restricted to the ids that occur in ``vocab_texts``.

    ``ClipTokenizer(context_length)`` gives exactly ``open_clip``'s ``SimpleTokenizer`` output (ids 0..49407, zero
    padding, ``<start_of_text>`` ... ``<end_of_text>``, truncation that keeps the end token). With ``vocab_texts``,
    every BPE id occurring in them gets a compact id: 0 = padding, 1 = unknown (a BPE id not in ``vocab_texts``),
    2.. = the ids in increasing order, then start-of-text and end-of-text as the two largest ids, so that open_clip's
    ``argmax`` text pooling still finds the end token. ``vocab_size`` is the embedding-table size to build.

    Texts are encoded word by word (open_clip's BPE never merges across whitespace, so this equals encoding the whole
    string): :meth:`encode_words` returns one id list per word, :meth:`assemble` builds the padded row from word id
    lists, which lets EDA augmentation work on pre-encoded words (:func:`eda_words`) without re-running BPE.
    """

    def __init__(self, context_length: int, vocab_texts: Iterable[str] | None = None):
        from open_clip.tokenizer import SimpleTokenizer

        if context_length < 2:
            raise ValueError("context_length must be >= 2")
        self.context_length = int(context_length)
        self.base = SimpleTokenizer(context_length=self.context_length)
        self._word_cache: dict[str, list[list[int]]] = {}
        self._bpe_cache: dict[str, list[int]] = {}
        self.compact = vocab_texts is not None
        if self.compact:
            ids = set()
            for text in vocab_texts:
                for w in self._bpe_words(text):
                    ids.update(w)
            ids.discard(self.base.sot_token_id)
            ids.discard(self.base.eot_token_id)
            ordered = sorted(ids)
            self.remap = {bpe: k + 2 for k, bpe in enumerate(ordered)}
            self.pad_id, self.unk_id = 0, 1
            self.sot_id, self.eot_id = len(ordered) + 2, len(ordered) + 3
            self.vocab_size = len(ordered) + 4
        else:
            self.remap = None
            self.pad_id, self.unk_id = 0, None
            self.sot_id, self.eot_id = self.base.sot_token_id, self.base.eot_token_id
            self.vocab_size = self.base.vocab_size

    def _bpe_word(self, word: str) -> list[int]:
        """BPE ids of one already-cleaned word (open_clip's ``encode`` without its per-call text cleaning)."""
        hit = self._bpe_cache.get(word)
        if hit is None:
            import regex

            b = self.base
            hit = []
            for token in regex.findall(b.pat, word):
                token = "".join(b.byte_encoder[c] for c in token.encode("utf-8"))
                hit.extend(b.encoder[t] for t in b.bpe(token).split(" "))
            self._bpe_cache[word] = hit
        return hit

    def _bpe_words(self, text: str) -> list[list[int]]:
        return [self._bpe_word(w) for w in self.base.clean_fn(text).split()]

    def encode_words(self, text: str) -> list[list[int]]:
        """Token ids of ``text``, one list per whitespace-separated word (cached)."""
        hit = self._word_cache.get(text)
        if hit is None:
            words = self._bpe_words(text)
            if self.remap is not None:
                words = [[self.remap.get(t, self.unk_id) for t in w] for w in words]
            if len(self._word_cache) > 500_000:
                self._word_cache.clear()
            hit = self._word_cache[text] = words
        return hit

    def assemble(self, words: Sequence[Sequence[int]]) -> torch.Tensor:
        """``LongTensor [context_length]``: start, the words' ids, end, zero padding (truncated keeping the end)."""
        ids = [self.sot_id] + [t for w in words for t in w] + [self.eot_id]
        if len(ids) > self.context_length:
            ids = ids[:self.context_length]
            ids[-1] = self.eot_id
        out = torch.zeros(self.context_length, dtype=torch.long)
        out[:len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.stack([self.assemble(self.encode_words(t)) for t in texts])


# ----------------------------------------------------------------------------------------------------------------
# image augmentation and pair data
# ----------------------------------------------------------------------------------------------------------------
def crop_flip(images: torch.Tensor, generator: torch.Generator | None = None, scale: tuple[float, float] = (0.5, 1.0),
              ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
              out_size: int | None = None) -> torch.Tensor:
    """Batched random resized crop + horizontal flip (independent per image), one ``roi_align`` call.

    ``images``: float ``[B, C, H, W]``. Each crop has area fraction ``U(scale)`` and aspect ratio log-uniform in
    ``ratio`` (clipped to the image), a uniform position, and is resampled bilinearly (one sample at each output
    pixel centre) to ``out_size`` (default ``H``); then flipped left-right with probability 0.5 when ``flip``.
    Deterministic given ``generator``.
    """
    from torchvision.ops import roi_align

    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float [B, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    size = int(out_size or h)
    u = torch.rand(b, 5, generator=generator)
    area = (scale[0] + (scale[1] - scale[0]) * u[:, 0]) * h * w
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(log_r)
    cw = torch.sqrt(area * r).clamp(max=w)
    ch = torch.sqrt(area / r).clamp(max=h)
    x0 = (w - cw) * u[:, 2]
    y0 = (h - ch) * u[:, 3]
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    out = roi_align(images, boxes.to(images.device, images.dtype), output_size=(size, size), spatial_scale=1.0,
                    sampling_ratio=1, aligned=True)
    if flip:
        mask = (u[:, 4] < 0.5).to(images.device)[:, None, None, None]
        out = torch.where(mask, out.flip(-1), out)
    return out


def to_model_input(images: torch.Tensor, image_size: int | None = None,
                   mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> torch.Tensor:
    """uint8 (or float in [0, 1]) ``[B, 3, H, W]`` -> float32, resized to ``image_size`` if it differs, normalised."""
    x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    if image_size is not None and (x.shape[-1] != image_size or x.shape[-2] != image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    s = torch.tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - m) / s


@dataclass
class PairData:
    """In-memory image-caption pairs: ``images`` uint8 ``[N, 3, H, W]``, ``captions`` (N strings).

    ``views``: optional further renders of the same images (each uint8 ``[N, 3, H, W]``), e.g.
    ``World.rerender(seed)``, used by ``image_aug="views"``: the augmented view of image i is ``views[k][i]`` for a
    random k.
    """

    images: torch.Tensor
    captions: list
    views: list | None = None

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(self.images.shape)}")
        if len(self.captions) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.captions)} captions")
        self.captions = list(self.captions)
        for v in self.views or []:
            if v.shape != self.images.shape:
                raise ValueError(f"a view has shape {tuple(v.shape)}, images {tuple(self.images.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_views(self) -> int:
        """Renders per image: the original plus ``views``."""
        return 1 + len(self.views or [])

    def get_images(self, idx: torch.Tensor, view: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 images ``idx``; ``view[b]`` picks render ``view[b]`` (0 = the original, k = ``views[k-1]``)."""
        if view is None or not self.views:
            return self.images[idx]
        stack = [self.images] + list(self.views)
        out = self.images[idx].clone()
        for k in range(1, len(stack)):
            sel = view == k
            if bool(sel.any()):
                out[sel] = stack[k][idx[sel]]
        return out


class FilePairs:
    """Image-caption pairs read from image files (e.g. the rows of a CC3M / COCO table).

    ``get_images(idx)`` loads the images (``loader``: path -> PIL image), resizes the shorter side to
    ``image_size`` and center-crops, returning uint8 ``[B, 3, image_size, image_size]``. Sequential loading: fine for
    checking the code path; paper-scale runs want a DataLoader with workers in front of it.
    """

    n_views = 1
    views = None

    def __init__(self, paths: Sequence, captions: Sequence[str], image_size: int, loader: Callable | None = None):
        if len(paths) != len(captions):
            raise ValueError(f"{len(paths)} image paths but {len(captions)} captions")
        from ..data import pil_loader

        self.paths, self.captions = list(paths), list(captions)
        self.image_size = int(image_size)
        self.loader = loader or pil_loader

    @classmethod
    def from_dataset(cls, dataset, image_size: int) -> "FilePairs":
        """From an :class:`~contrastive_repro.data.ImageTextDataset` (its ``paths``, ``captions``, ``loader``)."""
        return cls(dataset.paths, dataset.captions, image_size, dataset.loader)

    def __len__(self) -> int:
        return len(self.captions)

    def get_images(self, idx: torch.Tensor, view=None) -> torch.Tensor:
        from PIL import Image

        size = self.image_size
        out = torch.empty(len(idx), 3, size, size, dtype=torch.uint8)
        for b, i in enumerate(torch.as_tensor(idx).tolist()):
            img = self.loader(self.paths[i]).convert("RGB")
            s = size / min(img.size)
            img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))),
                             Image.Resampling.BICUBIC)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
            out[b] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return out


# ----------------------------------------------------------------------------------------------------------------
# model: open_clip two-tower (+ separation heads)
# ----------------------------------------------------------------------------------------------------------------
class CLIPTwoTower(nn.Module):
    """An open_clip ``CLIP`` plus, when ``separation_heads``, one linear head per tower giving the paper's
    modality-independent features :math:`z^i` (see the module docstring for which tower feature feeds them).

    ``forward(images, tokens, images_aug=None, tokens_aug=None)`` returns a dict with normalised ``z_v``, ``z_t``
    (and ``z_v_aug``, ``z_t_aug`` when the augmented inputs are given; clean and augmented inputs go through each
    tower as one batch; ``tokens=None`` runs the image tower only), ``zi_v``, ``zi_t`` (``zi_v_aug``, ``zi_t_aug``) with the heads, and ``logit_scale`` (the
    multiplicative :math:`\\exp(\\text{logit\\_scale})`, clamped at 100 as CLIP does).
    """

    def __init__(self, clip: nn.Module, separation_heads: bool = False):
        super().__init__()
        self.clip = clip
        self.separation_heads = bool(separation_heads)
        self._taps: dict[str, torch.Tensor] = {}
        self._hooks = []
        if self.separation_heads:
            embed_dim = int(clip.text_projection.shape[1] if isinstance(clip.text_projection, torch.Tensor)
                            else clip.text_projection.out_features)
            v_mod, v_width, self._v_pool = self._image_tap(clip.visual)
            t_width = int(clip.ln_final.normalized_shape[0])
            self.head_v = nn.Linear(v_width, embed_dim)
            self.head_t = nn.Linear(t_width, embed_dim)
            self._hooks.append(v_mod.register_forward_hook(self._store("v")))
            self._hooks.append(clip.ln_final.register_forward_hook(self._store("t")))

    def _store(self, key):
        def hook(_module, _inputs, output):
            self._taps[key] = output
        return hook

    @staticmethod
    def _image_tap(visual: nn.Module):
        """(module to hook, its feature width, pooling function) for a ViT or a ModifiedResNet image tower."""
        if hasattr(visual, "ln_post") and hasattr(visual, "transformer"):
            width = int(visual.ln_post.normalized_shape[0])
            pool_type = getattr(visual, "pool_type", "tok")

            def pool(x):
                if x.ndim == 2:  # final_ln_after_pool: ln_post already saw the pooled feature
                    return x
                if pool_type == "tok":
                    return x[:, 0]
                if pool_type == "avg":
                    return x[:, 1:].mean(1)
                return x.mean(1)
            return visual.ln_post, width, pool
        if hasattr(visual, "layer4") and hasattr(visual, "attnpool"):
            return visual.layer4, int(visual.attnpool.k_proj.in_features), lambda x: x.mean(dim=(2, 3))
        raise TypeError(f"separation heads support open_clip VisionTransformer and ModifiedResNet towers, not "
                        f"{type(visual).__name__}")

    @property
    def image_size(self) -> int:
        size = getattr(self.clip.visual, "image_size", 224)
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp().clamp(max=100.0)

    def _image(self, x):
        z = F.normalize(self.clip.encode_image(x), dim=-1)
        zi = None
        if self.separation_heads:
            zi = F.normalize(self.head_v(self._v_pool(self._taps.pop("v"))), dim=-1)
        return z, zi

    def _text(self, tokens):
        from open_clip.transformer import text_global_pool

        z = F.normalize(self.clip.encode_text(tokens), dim=-1)
        zi = None
        if self.separation_heads:
            h = text_global_pool(self._taps.pop("t"), tokens, getattr(self.clip, "text_pool_type", "argmax"),
                                 eos_token_id=getattr(self.clip, "text_eos_id", None))
            zi = F.normalize(self.head_t(h), dim=-1)
        return z, zi

    def forward(self, images, tokens=None, images_aug=None, tokens_aug=None) -> dict:
        out = {"logit_scale": self.logit_scale()}
        n = images.shape[0]
        z, zi = self._image(images if images_aug is None else torch.cat([images, images_aug]))
        out["z_v"], out["z_v_aug"] = (z, None) if images_aug is None else (z[:n], z[n:])
        if zi is not None:
            out["zi_v"], out["zi_v_aug"] = (zi, None) if images_aug is None else (zi[:n], zi[n:])
        if tokens is None:  # image tower only
            return out
        m = tokens.shape[0]
        z, zi = self._text(tokens if tokens_aug is None else torch.cat([tokens, tokens_aug]))
        out["z_t"], out["z_t_aug"] = (z, None) if tokens_aug is None else (z[:m], z[m:])
        if zi is not None:
            out["zi_t"], out["zi_t_aug"] = (zi, None) if tokens_aug is None else (zi[:m], zi[m:])
        return out


# ----------------------------------------------------------------------------------------------------------------
# objective
# ----------------------------------------------------------------------------------------------------------------
def alignment_term(z_v: torch.Tensor, z_t: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    r"""The Fig. 2 alignment term: :math:`\frac1N \sum_j 1 / (\langle z_{Tj}, z_{Vj}\rangle^2 + \epsilon)`.

    ``z_v``, ``z_t``: ``[N, d]`` paired features, used as given (pass normalised features: then the inner product
    is the paired cosine and the term lies in :math:`[1/(1+\epsilon), 1/\epsilon]`). ``eps >= 0`` smooths the
    paper's :math:`1/\langle z_T, z_V\rangle^2` (``eps = 0``) where a pair is near-orthogonal.
    """
    if z_v.shape != z_t.shape or z_v.ndim != 2:
        raise ValueError(f"z_v and z_t must be paired [N, d] tensors, got {tuple(z_v.shape)}, {tuple(z_t.shape)}")
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    cos = (z_v * z_t).sum(-1)
    return (1.0 / (cos.square() + eps)).mean()


class CLIPObjective(nn.Module):
    """:class:`ModalityStructureLoss` (base + weighted regularizers) plus ``align_scale`` x :func:`alignment_term`.

    ``forward(features)`` takes :meth:`CLIPTwoTower.forward`'s dict and returns ``(total, parts)`` with the
    detached parts of the modality loss, ``"align"`` (unweighted, always computed for monitoring) and ``"total"``.
    """

    def __init__(self, base: str = "clip", regularizers: Mapping[str, float] | None = None, align_scale: float = 0.0,
                 align_eps: float = 0.1, **loss_options):
        super().__init__()
        self.loss = ModalityStructureLoss(base=base, regularizers=dict(regularizers or {}), **loss_options)
        self.align_scale = float(align_scale)
        if not (math.isfinite(self.align_scale) and self.align_scale >= 0):
            raise ValueError(f"align_scale must be finite and >= 0, got {align_scale}")
        self.align_eps = float(align_eps)

    def forward(self, f: Mapping[str, torch.Tensor]):
        total, parts = self.loss(f["z_v"], f["z_t"], f["logit_scale"], z_v_aug=f.get("z_v_aug"),
                                 z_t_aug=f.get("z_t_aug"), zi_v=f.get("zi_v"), zi_v_aug=f.get("zi_v_aug"),
                                 zi_t=f.get("zi_t"), zi_t_aug=f.get("zi_t_aug"))
        align = alignment_term(f["z_v"].float(), f["z_t"].float(), self.align_eps)
        if self.align_scale > 0:
            total = total + self.align_scale * align
        parts = dict(parts)
        parts["align"] = align.detach()
        parts["total"] = total.detach()
        check_finite(total, "CLIPObjective total")
        return total, parts


# ----------------------------------------------------------------------------------------------------------------
# the recipe
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CLIPPretrainConfig:
    """Everything :func:`train_clip` needs besides the data.

    Model: ``preset`` of :data:`contrastive_repro.models.clip.CLIP_PRESETS` with ``model_overrides`` merged in
    (e.g. ``{"vision_cfg": {"patch_size": 4}}``; not allowed for ``paper-rn50``); ``compact_vocab`` restricts the
    text embedding table to the BPE ids of the training captions + ``vocab_texts`` (see :class:`ClipTokenizer`).
    Objective: ``base``, ``regularizers`` (name -> weight), ``loss_options`` (keyword arguments of
    :class:`ModalityStructureLoss`, e.g. ``bridge_t``), ``align_scale`` / ``align_eps``.
    Views: ``image_aug`` (one of :data:`IMAGE_AUGS`), ``crop_scale``, ``flip``; ``text_aug`` (``"eda"`` or
    ``"none"``) with ``eda_p_delete``, ``eda_n_swap``. Optimisation: AdamW (``weight_decay`` on >= 2-D weights
    only), linear warm-up then cosine, ``grad_clip``; ``amp`` as in :class:`~contrastive_repro.training.TrainConfig`.
    """

    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    compact_vocab: bool = True
    steps: int = 100
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 10
    grad_clip: float | None = 1.0
    base: str = "clip"
    regularizers: dict = field(default_factory=dict)
    loss_options: dict = field(default_factory=dict)
    align_scale: float = 0.0
    align_eps: float = 0.1
    image_aug: str = "crop_flip"
    crop_scale: tuple = (0.5, 1.0)
    flip: bool = True
    text_aug: str = "eda"
    eda_p_delete: float = 0.1
    eda_n_swap: int = 1
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    ckpt_dir: str | None = None
    ckpt_every: int = 0

    def __post_init__(self):
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")
        unknown = set(self.regularizers) - set(REGULARIZERS)
        if unknown:
            raise ValueError(f"unknown regularizer(s) {sorted(unknown)}; allowed: {', '.join(REGULARIZERS)}")
        if self.image_aug not in IMAGE_AUGS:
            raise ValueError(f"image_aug must be one of {IMAGE_AUGS}, got {self.image_aug!r}")
        if self.text_aug not in TEXT_AUGS:
            raise ValueError(f"text_aug must be one of {TEXT_AUGS}, got {self.text_aug!r}")
        if self.steps < 0 or self.batch_size < 2:
            raise ValueError("steps must be >= 0 and batch_size >= 2")
        self.crop_scale = tuple(self.crop_scale)
        self.regularizers = {k: float(v) for k, v in self.regularizers.items()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainedCLIP:
    """A trained model with its tokenizer, the config and the per-step history of the training loop."""

    model: CLIPTwoTower
    tokenizer: ClipTokenizer
    config: CLIPPretrainConfig
    history: list

    def loss_curve(self, key: str = "loss", points: int = 50) -> list[list[float]]:
        """``[[step, value], ...]`` subsampled to about ``points`` entries (for JSON results)."""
        h = [r for r in self.history if key in r]
        if not h:
            return []
        stride = max(1, len(h) // points)
        rows = h[::stride] + ([h[-1]] if (len(h) - 1) % stride else [])
        return [[int(r["step"]), float(r[key])] for r in rows]


def needs_augmented_views(cfg: CLIPPretrainConfig) -> bool:
    """In-modal base, Brownian bridge and separation need augmented views; GC uses them when given."""
    return cfg.base == "clip+inmodal" or any(r in cfg.regularizers for r in ("bridge", "separation", "gc"))


def build_model(cfg: CLIPPretrainConfig, vocab_size: int | None = None) -> CLIPTwoTower:
    """The open_clip model of ``cfg`` (text table of ``vocab_size`` rows when given) wrapped in
    :class:`CLIPTwoTower`, with separation heads when the ``separation`` regularizer is on."""
    from ..models.clip import CLIP_PRESETS, build_clip

    preset = CLIP_PRESETS.get(cfg.preset)
    if preset is None:
        raise ValueError(f"unknown CLIP preset {cfg.preset!r}; choose one of {sorted(CLIP_PRESETS)}")
    if "open_clip_model" in preset:
        if cfg.model_overrides:
            raise ValueError(f"preset {cfg.preset!r} takes no model_overrides")
        clip = build_clip(cfg.preset)
    else:
        overrides = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.model_overrides.items()}
        if vocab_size is not None:
            overrides["text_cfg"] = dict(overrides.get("text_cfg", {}), vocab_size=int(vocab_size))
        clip = build_clip(cfg.preset, **overrides)
    return CLIPTwoTower(clip, separation_heads="separation" in cfg.regularizers)


def _epoch_batches(n: int, batch_size: int, seed: int):
    from ..training import epoch_index_batches

    cache: dict[int, list] = {}

    def batch_indices(i: int) -> torch.Tensor:
        per_epoch = max(1, n // batch_size)
        epoch, k = divmod(i, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_index_batches(n, batch_size, epoch=epoch, seed=seed)
        return cache[epoch][k]
    return batch_indices


def _pick_views(n_views: int, b: int, gen: torch.Generator, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """A random render index per item (0 = original); different from ``exclude`` when there are >= 2 renders."""
    if n_views <= 1:
        return torch.zeros(b, dtype=torch.long)
    if exclude is None:
        return torch.randint(0, n_views, (b,), generator=gen)
    return (exclude + 1 + torch.randint(0, n_views - 1, (b,), generator=gen)) % n_views


def _render(pairs, idx, view, cfg: CLIPPretrainConfig, gen: torch.Generator, image_size: int,
            crop: bool) -> torch.Tensor:
    """Model-ready images ``idx`` from renders ``view``, randomly cropped and flipped when ``crop``."""
    x = to_model_input(pairs.get_images(idx, view), image_size)
    return crop_flip(x, gen, scale=cfg.crop_scale, flip=cfg.flip) if crop else x


def _uses_views(cfg: CLIPPretrainConfig, pairs) -> bool:
    if cfg.image_aug not in ("views", "views+crop_flip"):
        return False
    if getattr(pairs, "n_views", 1) < 2:
        raise ValueError(f"image_aug={cfg.image_aug!r} needs PairData.views (further renders of the images)")
    return True


def make_batch_fn(pairs, tokenizer: ClipTokenizer, cfg: CLIPPretrainConfig, image_size: int,
                  augmented: bool | None = None) -> Callable[[int], dict]:
    """``batch_fn(i)`` -> the ``i``-th training batch: ``images`` (normalised float), ``tokens``, and with
    augmented views ``images_aug`` / ``tokens_aug``. A pure function of ``i`` and ``cfg.seed`` (exact resume)."""
    augmented = needs_augmented_views(cfg) if augmented is None else augmented
    batch_indices = _epoch_batches(len(pairs), cfg.batch_size, cfg.seed)
    captions = pairs.captions
    views = augmented and _uses_views(cfg, pairs)
    crop = cfg.image_aug in ("crop_flip", "views+crop_flip")

    def batch_fn(i: int) -> dict:
        idx = batch_indices(i)
        words = [tokenizer.encode_words(captions[j]) for j in idx.tolist()]
        clean = to_model_input(pairs.get_images(idx), image_size)
        batch = {"images": clean, "tokens": torch.stack([tokenizer.assemble(w) for w in words])}
        if augmented:
            gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + 7919 * int(i) + 1)
            if views:  # another render of the scene than the clean one (render 0)
                anchor = torch.zeros(len(idx), dtype=torch.long)
                view = _pick_views(pairs.n_views, len(idx), gen, exclude=anchor)
                batch["images_aug"] = _render(pairs, idx, view, cfg, gen, image_size, crop)
            else:  # the clean images, cropped and flipped (no second read of image files)
                batch["images_aug"] = crop_flip(clean, gen, scale=cfg.crop_scale, flip=cfg.flip) if crop else clean
            if cfg.text_aug == "eda":
                rng = np.random.default_rng([int(cfg.seed), int(i), 0xEDA])
                batch["tokens_aug"] = torch.stack([
                    tokenizer.assemble(eda_words(w, rng, cfg.eda_p_delete, cfg.eda_n_swap)) for w in words])
            else:
                batch["tokens_aug"] = batch["tokens"].clone()
        return batch
    return batch_fn


def _optimizer(model: nn.Module, cfg: CLIPPretrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "logit_scale" not in name else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def _train_config(cfg: CLIPPretrainConfig, ckpt_dir):
    from ..training import TrainConfig

    return TrainConfig(max_steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
                       warmup_steps=min(cfg.warmup_steps, max(cfg.steps - 1, 0)), lr_schedule="cosine",
                       grad_clip=cfg.grad_clip, amp=cfg.amp, log_every=0, ckpt_dir=ckpt_dir,
                       ckpt_every=cfg.ckpt_every, seed=cfg.seed, device=cfg.device, progress=False)


def _tokenizer_for(pairs, cfg: CLIPPretrainConfig, context_length: int, vocab_texts: Iterable[str]):
    if cfg.compact_vocab:
        return ClipTokenizer(context_length, vocab_texts=list(pairs.captions) + list(vocab_texts))
    return ClipTokenizer(context_length)


def _context_length(cfg: CLIPPretrainConfig) -> int:
    from ..models.clip import clip_config

    c = clip_config(cfg.preset)
    tc = dict(c.get("text_cfg", {}))
    tc.update(cfg.model_overrides.get("text_cfg", {}))
    return int(tc.get("context_length", 77))


def train_clip(pairs, cfg: CLIPPretrainConfig, vocab_texts: Iterable[str] = ()) -> TrainedCLIP:
    """Train a two-tower model on ``pairs`` (:class:`PairData` or :class:`FilePairs`) with ``cfg``'s objective.

    ``vocab_texts``: every other text the model will read (evaluation captions, zero-shot prompts), so that the
    compact vocabulary covers them. Returns a :class:`TrainedCLIP` (model in eval mode).
    """
    from ..training import train

    torch.manual_seed(cfg.seed)
    tokenizer = _tokenizer_for(pairs, cfg, _context_length(cfg), vocab_texts)
    model = build_model(cfg, tokenizer.vocab_size if cfg.compact_vocab else None)
    objective = CLIPObjective(cfg.base, cfg.regularizers, cfg.align_scale, cfg.align_eps, **cfg.loss_options)
    augmented = needs_augmented_views(cfg)
    batch_fn = make_batch_fn(pairs, tokenizer, cfg, model.image_size, augmented)

    def step_fn(m, batch):
        feats = m(batch["images"], batch["tokens"], batch.get("images_aug"), batch.get("tokens_aug"))
        total, parts = objective(feats)
        keep = {k: v for k, v in parts.items() if k in ("con", "v2t", "t2v", "v2v", "t2t", "align", "cyclip",
                                                          "sep", "bridge", "gc")}
        keep["logit_scale"] = feats["logit_scale"].detach()
        return total, keep

    history = train(model, step_fn, batch_fn, _train_config(cfg, cfg.ckpt_dir), optimizer=_optimizer(model, cfg))
    model.eval()
    return TrainedCLIP(model, tokenizer, cfg, history)


def train_image_only(pairs, cfg: CLIPPretrainConfig, vocab_texts: Iterable[str] = ()) -> TrainedCLIP:
    r"""The single-modality baseline: the same two-tower model, but only its image tower is trained, with the
    in-modal (SimCLR-style) contrastive loss between two augmented views of each image,

    .. math:: L = \tfrac12\,(\ell(z^{a_1}_V, z^{a_2}_V) + \ell(z^{a_2}_V, z^{a_1}_V)),

    :math:`\ell` the InfoNCE of :func:`~contrastive_repro.losses.modality.contrastive_base_loss` with the learned
    logit scale, the views drawn by ``cfg.image_aug`` (for ``"views"``, two *different* renders of the scene).
    Same optimiser, steps and batch size as :func:`train_clip`; the captions are never read (the text tower stays at
    its initialisation). ``cfg``'s objective fields are ignored.
    """
    from ..training import train

    torch.manual_seed(cfg.seed)
    tokenizer = _tokenizer_for(pairs, cfg, _context_length(cfg), vocab_texts)
    cfg_img = dataclasses.replace(cfg, regularizers={}, base="clip", align_scale=0.0)
    model = build_model(cfg_img, tokenizer.vocab_size if cfg.compact_vocab else None)
    batch_indices = _epoch_batches(len(pairs), cfg.batch_size, cfg.seed)
    size = model.image_size

    views = _uses_views(cfg, pairs)
    crop = cfg.image_aug in ("crop_flip", "views+crop_flip")
    if not (views or crop):
        raise ValueError("the image-only baseline needs an image augmentation (image_aug other than 'none')")

    def batch_fn(i: int) -> dict:
        idx = batch_indices(i)
        gen = torch.Generator().manual_seed(int(cfg.seed) * 1_000_003 + 7919 * int(i) + 2)
        zero = torch.zeros(len(idx), dtype=torch.long)
        first = _pick_views(pairs.n_views, len(idx), gen) if views else zero
        second = _pick_views(pairs.n_views, len(idx), gen, exclude=first) if views else zero
        return {"view1": _render(pairs, idx, first, cfg, gen, size, crop),
                "view2": _render(pairs, idx, second, cfg, gen, size, crop)}

    def step_fn(m, batch):
        feats = m(batch["view1"], None, batch["view2"])  # image tower only (through forward, for DDP)
        z1, z2, scale = feats["z_v"], feats["z_v_aug"], feats["logit_scale"]
        n = z1.shape[0]
        logits = scale * z1 @ z2.T
        target = torch.arange(n, device=z1.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, {"logit_scale": scale.detach()}

    # the text tower gets no gradient; keep it out of the optimiser so weight decay does not shrink it
    for p in model.clip.parameters():
        p.requires_grad_(False)
    for p in model.clip.visual.parameters():
        p.requires_grad_(True)
    model.clip.logit_scale.requires_grad_(True)
    history = train(model, step_fn, batch_fn, _train_config(cfg, cfg.ckpt_dir), optimizer=_optimizer(model, cfg))
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return TrainedCLIP(model, tokenizer, cfg, history)


# ----------------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def embed_images(model: CLIPTwoTower, images, batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
    """Image features ``[N, d]`` (float32, CPU) of uint8 images ``[N, 3, H, W]`` (resized to the model's input
    size when needed) or of a pairs object with ``get_images``."""
    was = model.training
    model.eval()
    dev = _device_of(model)
    n = len(images)
    out = []
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(s + batch_size, n))
        x = images[idx] if isinstance(images, torch.Tensor) else images.get_images(idx)
        out.append(model.encode_image(to_model_input(x, model.image_size).to(dev), normalize=normalize).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 0)


@torch.no_grad()
def embed_texts(model: CLIPTwoTower, tokenizer: ClipTokenizer, texts: Sequence[str], batch_size: int = 256,
                normalize: bool = True) -> torch.Tensor:
    """Text features ``[N, d]`` (float32, CPU)."""
    was = model.training
    model.eval()
    dev = _device_of(model)
    out = [model.encode_text(tokenizer(list(texts[s:s + batch_size])).to(dev), normalize=normalize).float().cpu()
           for s in range(0, len(texts), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, 0)


def class_text_features(model: CLIPTwoTower, tokenizer: ClipTokenizer, classnames: Sequence,
                        templates: Sequence[str]) -> torch.Tensor:
    """Zero-shot class embeddings ``[C, d]``: CLIP's prompt ensembling. A class is a name or a list of names
    (synonyms); its embedding is the normalised mean of the normalised embeddings of every ``template.format(name)``
    (all templates x all of its names)."""
    prompts, owner = [], []
    for c, names in enumerate(classnames):
        for name in ([names] if isinstance(names, str) else list(names)):
            for t in templates:
                prompts.append(t.format(name))
                owner.append(c)
    if not prompts:
        raise ValueError("no class names / templates")
    emb = embed_texts(model, tokenizer, prompts)
    owner_t = torch.tensor(owner)
    sums = torch.zeros(len(classnames), emb.shape[1]).index_add_(0, owner_t, emb)
    return F.normalize(sums / torch.bincount(owner_t, minlength=len(classnames)).clamp(min=1)[:, None], dim=-1)


def zero_shot_eval(model: CLIPTwoTower, tokenizer: ClipTokenizer, image_features: torch.Tensor, labels,
                   classnames: Sequence, templates: Sequence[str], topk: Sequence[int] = (1, 5)) -> dict:
    """Zero-shot top-k accuracy by text prompts (:func:`class_text_features`: prompt ensembling over ``templates``,
    each with one ``{}``, and over a class's synonyms when it is given as a list of names).

    Returns ``{"top1": ..., "top5": ..., "n_classes": C}`` (fractions)."""
    from ..metrics import zero_shot_accuracy

    cls = class_text_features(model, tokenizer, classnames, templates)
    out = zero_shot_accuracy(image_features, cls, labels, topk=topk)
    out["n_classes"] = len(classnames)
    return out


DEFAULT_CS = (1e-2, 1e-1, 1.0, 10.0, 100.0)


@contextlib.contextmanager
def _one_blas_thread():
    """sklearn's L-BFGS on small problems is dominated by BLAS thread hand-offs (on a loaded 2-core machine a
    400 x 64 probe took 15 s with 2 OpenBLAS threads and 0.26 s with one): run it single-threaded. sklearn's
    convergence warnings (an unregularised probe on separable features never "converges") and its
    "many classes for few samples" warning (one-shot probes) are silenced here; ``max_iter`` bounds the work."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="sklearn")
        warnings.filterwarnings("ignore", message=".*number of unique classes.*")
        warnings.filterwarnings("ignore", message=".*failed to converge.*")
        yield


def linear_probe_eval(train_x, train_y, test_x, test_y, Cs: Sequence[float] = DEFAULT_CS, seed: int = 0,
                      max_iter: int = 100) -> dict:
    """Logistic-regression probe on frozen features (C chosen on a validation split of the *training* set, see
    :func:`~contrastive_repro.metrics.linear_probe_accuracy`). Returns ``{"accuracy", "C"}``.

    ``max_iter`` caps L-BFGS: the library's tolerance (1e-6) is rarely reached on these features, so the cost is
    ``max_iter`` iterations per fit; on the emoji sub-group probe (2,923 x 64, 99 classes) 100 iterations gave the
    same accuracy as 500 within 0.3 points at a fifth of the time."""
    from ..metrics import linear_probe_accuracy

    with _one_blas_thread():
        d = linear_probe_accuracy(train_x, train_y, test_x, test_y, Cs=Cs, seed=seed, max_iter=max_iter,
                                  return_details=True)
    return {"accuracy": d["accuracy"], "C": d["C"]}


def few_shot_eval(train_x, train_y, test_x, test_y, shots: Sequence[int] = (1, 5), n_draws: int = 3, C: float = 1.0,
                  seed: int = 0, max_iter: int = 100) -> dict:
    """k-shot linear probes: for each k, ``n_draws`` support sets of k training items per class (classes with at
    least k training items; the test items of those classes are scored), logistic regression with fixed ``C``
    (one-shot sets cannot be split for validation). Returns ``{"{k}shot": mean accuracy, "{k}shot_std": std over
    draws, "{k}shot_classes": number of classes}`` (``None`` accuracies when fewer than two classes have k items)."""
    from ..metrics import few_shot_splits, linear_probe_accuracy

    tx = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    ty = np.asarray(torch.as_tensor(train_y)).reshape(-1)
    ex = torch.as_tensor(np.asarray(test_x, dtype=np.float32))
    ey = np.asarray(torch.as_tensor(test_y)).reshape(-1)
    out = {}
    for k in shots:
        classes, counts = np.unique(ty, return_counts=True)
        ok = classes[counts >= k]
        tr_mask, te_mask = np.isin(ty, ok), np.isin(ey, ok)
        if len(ok) < 2 or not te_mask.any():
            out[f"{k}shot"], out[f"{k}shot_std"], out[f"{k}shot_classes"] = None, None, int(len(ok))
            continue
        tr_idx = np.flatnonzero(tr_mask)
        accs = []
        for draw in range(n_draws):
            sup, _ = few_shot_splits(ty[tr_idx], int(k), seed=seed * 1000 + draw)
            sel = tr_idx[sup]
            with _one_blas_thread():
                accs.append(linear_probe_accuracy(tx[sel], ty[sel], ex[te_mask], ey[te_mask], Cs=(C,),
                                                  max_iter=max_iter))
        out[f"{k}shot"] = float(np.mean(accs))
        out[f"{k}shot_std"] = float(np.std(accs))
        out[f"{k}shot_classes"] = int(len(ok))
    return out


def retrieval_eval(image_features, text_features, text_to_image=None, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Image->text and text->image Recall@k (fractions) and their mean; one caption per image unless
    ``text_to_image`` says otherwise (see :func:`~contrastive_repro.metrics.image_text_recall`)."""
    from ..metrics import image_text_recall

    if text_to_image is None:
        text_to_image = torch.arange(len(text_features))
    return image_text_recall(image_features, text_features, text_to_image, ks=ks)


def modality_gap(z_v: torch.Tensor, z_t: torch.Tensor) -> float:
    r"""The modality gap :math:`\| \frac1N\sum_j z_{Vj} - \frac1M\sum_k z_{Tk} \|` of L2-normalised features."""
    z_v, z_t = F.normalize(z_v.float(), dim=-1), F.normalize(z_t.float(), dim=-1)
    return float((z_v.mean(0) - z_t.mean(0)).norm())


def modality_stats(z_v: torch.Tensor, z_t: torch.Tensor) -> dict:
    """Geometry of normalised features: ``modality_gap`` (:func:`modality_gap`), ``paired_cosine`` (mean of
    :math:`\\langle z_{Vj}, z_{Tj}\\rangle` over paired rows), ``paired_cosine_abs`` (mean of its absolute value: the
    alignment term acts on :math:`\\langle z_{Vj}, z_{Tj}\\rangle^2`, so anti-aligned pairs count as aligned) and
    ``unpaired_cosine`` (mean over j != k). The paired statistics are ``None`` unless there are as many texts as
    images."""
    z_v, z_t = F.normalize(z_v.float(), dim=-1), F.normalize(z_t.float(), dim=-1)
    s = z_v @ z_t.T
    n, m = s.shape
    paired = paired_abs = None
    if n == m:
        diag = torch.diagonal(s)
        paired, paired_abs = float(diag.mean()), float(diag.abs().mean())
    off = float((s.sum() - torch.diagonal(s).sum()) / max(n * m - min(n, m), 1))
    return {"modality_gap": modality_gap(z_v, z_t), "paired_cosine": paired, "paired_cosine_abs": paired_abs,
            "unpaired_cosine": off}


def pca_2d(z_v: torch.Tensor, z_t: torch.Tensor, max_points: int = 400, seed: int = 0) -> dict:
    """A joint 2-D PCA of both modalities' normalised features (fitted on their union), subsampled to
    ``max_points`` pairs: ``{"v": [[x, y], ...], "t": [...], "explained": [r1, r2]}`` (JSON-friendly)."""
    z_v, z_t = F.normalize(z_v.float(), dim=-1), F.normalize(z_t.float(), dim=-1)
    both = torch.cat([z_v, z_t])
    mu = both.mean(0)
    _, s, vt = torch.linalg.svd(both - mu, full_matrices=False)
    proj = (both - mu) @ vt[:2].T
    n = len(z_v)
    pick = np.sort(np.random.default_rng(seed).permutation(n)[:max_points])
    var = s.square()
    return {"v": proj[:n][pick].round(decimals=4).tolist(), "t": proj[n:][pick].round(decimals=4).tolist(),
            "explained": (var[:2] / var.sum()).tolist()}


@dataclass
class ZeroShotTask:
    """Zero-shot classification of ``images`` (uint8 tensor) into ``classnames`` (each a name or a list of
    synonyms) by ``templates``."""

    images: Any
    labels: Any
    classnames: Sequence[str]
    templates: Sequence[str] = ("a photo of a {}.",)


@dataclass
class ProbeTask:
    """Linear (and few-shot) probe on the image features: train on ``train_images``, score on ``test_images``."""

    train_images: Any
    train_labels: Any
    test_images: Any
    test_labels: Any


@dataclass
class EvalSuite:
    """What :func:`evaluate_suite` computes. ``retrieval``: ``(images, captions)`` pairs (one caption per image)."""

    zero_shot: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict)
    retrieval: tuple | None = None
    few_shot: Sequence[int] = ()
    few_shot_draws: int = 3
    few_shot_C: float = 1.0
    probe_Cs: Sequence[float] = DEFAULT_CS
    probe_max_iter: int = 100
    pca: bool = False


def evaluate_suite(model: CLIPTwoTower, tokenizer: ClipTokenizer, suite: EvalSuite, seed: int = 0) -> dict:
    """Run every task of ``suite``; returns a flat dict with keys ``zs/<task>/top1``, ``zs/<task>/top5``,
    ``probe/<task>``, ``probe/<task>/C``, ``fewshot/<task>/<k>shot`` (+ ``_std``), ``ret/i2t_R@k``, ``ret/t2i_R@k``,
    ``ret/mean_recall``, ``modality_gap``, ``paired_cosine``, ``paired_cosine_abs``, ``unpaired_cosine`` (retrieval
    set) and, with
    ``suite.pca``, ``pca`` (see :func:`pca_2d`). Image features of the same tensor object are computed once."""
    cache: dict[int, torch.Tensor] = {}

    def feats(images):
        key = id(images)
        if key not in cache:
            cache[key] = embed_images(model, images)
        return cache[key]

    out: dict[str, Any] = {}
    for name, task in suite.zero_shot.items():
        r = zero_shot_eval(model, tokenizer, feats(task.images), task.labels, task.classnames, task.templates)
        out[f"zs/{name}/top1"], out[f"zs/{name}/top5"] = r["top1"], r.get("top5")
    for name, task in suite.probes.items():
        ftr, fte = feats(task.train_images), feats(task.test_images)
        r = linear_probe_eval(ftr, task.train_labels, fte, task.test_labels, Cs=suite.probe_Cs, seed=seed,
                              max_iter=suite.probe_max_iter)
        out[f"probe/{name}"], out[f"probe/{name}/C"] = r["accuracy"], r["C"]
        if suite.few_shot:
            fs = few_shot_eval(ftr, task.train_labels, fte, task.test_labels, shots=suite.few_shot,
                               n_draws=suite.few_shot_draws, C=suite.few_shot_C, seed=seed,
                               max_iter=suite.probe_max_iter)
            out.update({f"fewshot/{name}/{k}": v for k, v in fs.items()})
    if suite.retrieval is not None:
        images, captions = suite.retrieval
        zv, zt = feats(images), embed_texts(model, tokenizer, list(captions))
        out.update({f"ret/{k}": v for k, v in retrieval_eval(zv, zt).items()})
        out.update(modality_stats(zv, zt))
        if suite.pca:
            out["pca"] = pca_2d(zv, zt, seed=seed)
    return out


# ----------------------------------------------------------------------------------------------------------------
# paper-scale data (DATA_ROOT)
# ----------------------------------------------------------------------------------------------------------------
PAPER_LAYOUT = """\
DATA_ROOT/
  cc3m/train.tsv      CC3M training pairs, tab-separated with a header "filepath<TAB>title"
  cc3m/val.tsv        CC3M validation pairs (image-text retrieval), same columns
  cc3m/images/...     the image files the tables point to (paths relative to the table's folder)
  cifar-10-batches-py/    CIFAR-10 python batches (zero-shot and linear probe)
  cifar-100-python/       CIFAR-100 python files"""


def _cifar_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous(), ds.labels.clone()


def load_paper_data(data_root: str | Path | None = None, train_table: str = "cc3m/train.tsv",
                    val_table: str | None = "cc3m/val.tsv", zeroshot: Sequence[str] = ("cifar10", "cifar100"),
                    image_size: int = 224, check_files: bool = False) -> dict:
    """The paper-profile data from ``DATA_ROOT`` (``data_root`` or ``$DATA_ROOT``): nothing is downloaded.

    Returns ``{"train": FilePairs, "val": FilePairs | None, "zeroshot": {name: {"train_images", "train_labels",
    "test_images", "test_labels", "classnames"}}}`` (CIFAR images as uint8 tensors). A missing table or CIFAR folder
    raises :class:`~contrastive_repro.data.errors.DatasetNotFoundError` naming the path and the expected layout
    (:data:`PAPER_LAYOUT`); the tables are checked first, so an empty ``DATA_ROOT`` fails before anything is read.
    """
    from ..data import CIFAR10, CIFAR100, ImageTextDataset
    from ..data.errors import DatasetNotFoundError, data_root as _data_root

    root = _data_root(data_root)
    tables = {"train": root / train_table}
    if val_table:
        tables["val"] = root / val_table
    for name, path in tables.items():
        if not path.is_file():
            raise DatasetNotFoundError(f"CC3M {name} table", path, PAPER_LAYOUT,
                                       "set DATA_ROOT (or the notebook's data_root parameter) to the folder "
                                       "holding it; nothing is downloaded")
    loaders = {"cifar10": CIFAR10, "cifar100": CIFAR100}
    unknown = [z for z in zeroshot if z not in loaders]
    if unknown:
        raise ValueError(f"unknown zero-shot set(s) {unknown}; allowed: {sorted(loaders)}")
    zs = {}
    for name in zeroshot:
        tr, te = loaders[name]("train", root=root), loaders[name]("test", root=root)
        tri, trl = _cifar_tensors(tr)
        tei, tel = _cifar_tensors(te)
        zs[name] = {"train_images": tri, "train_labels": trl, "test_images": tei, "test_labels": tel,
                    "classnames": [c.replace("_", " ") for c in te.classes]}
    train = FilePairs.from_dataset(ImageTextDataset(tables["train"], check_files=check_files), image_size)
    val = FilePairs.from_dataset(ImageTextDataset(tables["val"], check_files=check_files), image_size) \
        if val_table else None
    return {"train": train, "val": val, "zeroshot": zs}


RETRIEVAL_LAYOUT = """\
DATA_ROOT/
  coco/train.tsv          training pairs, tab-separated with a header "filepath<TAB>caption" (one row per caption;
                          an image with 5 captions has 5 rows)
  flickr30k/test.tsv      held-out retrieval pairs, same columns (1,000 images x 5 captions for Flickr30K test)
  <the image files the tables point to, paths relative to each table's folder>"""


def load_retrieval_data(data_root: str | Path | None = None, train_table: str = "coco/train.tsv",
                        eval_table: str = "flickr30k/test.tsv", image_size: int = 224,
                        check_files: bool = False) -> dict:
    """Training pairs and a zero-shot retrieval set (e.g. COCO -> Flickr30K, the paper's Fig. 2) from ``DATA_ROOT``.

    Returns ``{"train": FilePairs, "eval_images": FilePairs of the distinct eval images (first caption each),
    "eval_captions": every eval caption, "text_to_image": LongTensor (caption -> image index)}``. Missing tables raise
    :class:`~contrastive_repro.data.errors.DatasetNotFoundError` with :data:`RETRIEVAL_LAYOUT`.
    """
    from ..data import ImageTextDataset
    from ..data.errors import DatasetNotFoundError, data_root as _data_root

    root = _data_root(data_root)
    for name, rel in (("train", train_table), ("eval", eval_table)):
        if not (root / rel).is_file():
            raise DatasetNotFoundError(f"image-text {name} table", root / rel, RETRIEVAL_LAYOUT,
                                       "set DATA_ROOT (or the notebook's data_root parameter); nothing is downloaded")
    train = FilePairs.from_dataset(ImageTextDataset(root / train_table, caption_col=None, check_files=check_files),
                                   image_size)
    ev = ImageTextDataset(root / eval_table, check_files=check_files)
    index: dict[str, int] = {}
    first_caption: list[str] = []
    t2i = []
    for path, cap in zip(ev.paths, ev.captions):
        key = str(path)
        if key not in index:
            index[key] = len(index)
            first_caption.append(cap)
        t2i.append(index[key])
    images = FilePairs(list(index), first_caption, image_size, ev.loader)
    return {"train": train, "eval_images": images, "eval_captions": list(ev.captions),
            "text_to_image": torch.tensor(t2i, dtype=torch.long)}
