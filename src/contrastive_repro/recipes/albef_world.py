r"""ALBEF with and without the latent-modality-structure regularizers: pre-train, then fine-tune and evaluate on
retrieval, VQA, two-image reasoning (NLVR2-style) and visual entailment (SNLI-VE-style).

The recipe of notebook ``05_albef_modality_structures`` (Jiang et al., CVPR 2023, Table 4; ``FACTS.md`` section B).

Pre-training (:func:`pretrain`): ALBEF's ITC + ITM + MLM (:meth:`~contrastive_repro.models.albef.ALBEF.
forward_pretrain`) plus ``reg_weight`` times one regularizer of :mod:`contrastive_repro.losses.modality` computed on
the *unimodal* features of the batch, the paper's augmented features being those of the **momentum encoders** on an
augmented view of the pair (a re-rendered image and a re-worded caption for the generated world):

* ``"none"``        plain ALBEF;
* ``"separation"``  :func:`~contrastive_repro.losses.modality.separation_loss` on ``z_v, z_t`` and the modality-
  independent features ``zi_v, zi_t`` of the extra heads (``ALBEFConfig.sep_heads``) against their momentum copies
  ``zi_v_aug, zi_t_aug``; ``logit_scale`` = ALBEF's ``1/temp``, detached (the regularizer does not move the
  temperature); uniformity ``t = 2``;
* ``"bridge"``      :func:`~contrastive_repro.losses.modality.brownian_bridge_loss`, ``L_Br = mean_j ||z^a_Vj -
  normalize(t z_Vj + (1-t) z_Tj)||^2`` with ``t = 0.25`` and ``z^a_V`` the momentum image feature (no gradient:
  the bridge point moves towards it);
* ``"gc"``          :func:`~contrastive_repro.losses.modality.geometric_consistency_loss`, ``L_GC + L^a_GC`` with
  ``z^a`` the momentum features, the paper's ``1/N`` normalisation (``gc_reduction="batch"``).

Short runs from random weights (ours, see :class:`PretrainConfig`): ``queue_warmup_steps`` keeps the feature queue
empty for the first steps and ``reg_start_steps`` / ``reg_ramp_steps`` switch the regularizer on late, because at
random initialisation every feature sits at nearly one point, where a queue of copies cancels the ITC gradient and
the bridge / geometric-consistency terms are already ~0.

Every model is built with the separation heads (unused, hence untouched, by the other methods), so for one seed all
four methods start from the *same* initial weights and see the same batches: differences between methods at a seed
are paired. The paper's regularizer weights are not in its main text: ``reg_weight`` is ours and reported.

Downstream (each starts from a copy of the pre-trained model; full fine-tuning; AdamW + warm-up + cosine):

* retrieval (:func:`evaluate_retrieval`): no fine-tuning (zero-shot after pre-training; ALBEF also fine-tunes on
  COCO / Flickr, not done here), ITC recall then ITM re-ranking of the top ``k_rerank`` candidates, R@1/5/10 in
  both directions (and the ITC-only recalls);
* VQA (:func:`finetune_vqa`): classification over the answer vocabulary from the fused [CLS] (the BUTD / UNITER
  head; ALBEF generates answers), accuracy = exact answer (plus the VQA score when human answers are known);
* NLVR (:func:`finetune_nlvr`): text fused with each image, concatenated, true / false;
* VE (:func:`finetune_ve`): 3-way entailment / neutral / contradiction.

Model selection: each fine-tuning run is evaluated on its ``val`` split every ``eval_every`` steps and the weights
with the best validation accuracy are the ones tested; ``val`` is carved from the *training* scenes
(:func:`world_tasks`) or the training split (:func:`benchmark_tasks`). Test splits are never looked at before the end.

Data (:class:`VLTasks`) is one structure for both sources: :func:`world_tasks` builds it from a generated
:class:`~contrastive_repro.data.world.World` (scenes split into train / val / test; every VQA / VE item goes with its
scene, an NLVR item with its two scenes when both are in the same split), :func:`benchmark_tasks` from the real data
under ``DATA_ROOT`` (4M-image pre-training TSV, COCO / Flickr30k Karpathy test, VQA v2, NLVR2, SNLI-VE; see
:data:`PAPER_DATA_LAYOUT`), raising :class:`~contrastive_repro.data.errors.DatasetNotFoundError` when it is absent.
The benchmark path reads images one by one with PIL (a thread pool): it is a reference implementation of the
protocol, not a tuned 4M-image input pipeline.

:func:`run_method` does all of it for one (method, seed) and returns a JSON-ready dict; :func:`run_cached_parallel`
runs several of them in worker processes, each result stored through ``run.cached`` as soon as it is done.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..data.world import VE_LABELS, Vocab, World
from ..losses.modality import brownian_bridge_loss, geometric_consistency_loss, separation_loss
from ..models.albef import ALBEF, ALBEFConfig, ALBEFForNLVR, ALBEFForVE, ALBEFForVQA
from ..models.fusion import IGNORE_INDEX
from ..training import EpochBatches, TrainConfig, epoch_index_batches, train, unwrap_model
from ..utils import check_finite, seed_everything

__all__ = ["REGULARIZERS", "METHODS", "TASKS", "WordTokenizer", "TensorImageBank", "FileImageBank", "VLTasks",
           "PretrainConfig", "FinetuneConfig", "split_scenes", "world_tasks", "benchmark_tasks",
           "check_paper_data", "PAPER_DATA_LAYOUT", "build_albef", "regularizer_loss", "pretrain",
           "finetune_vqa", "finetune_nlvr", "finetune_ve", "evaluate_retrieval", "recall_from_scores",
           "modality_geometry", "run_method", "run_cached_parallel", "json_safe"]

REGULARIZERS = ("none", "separation", "bridge", "gc")
#: method name (the notebook's rows) -> regularizer
METHODS = {"albef": "none", "separation": "separation", "bridge": "bridge", "gc": "gc"}
TASKS = ("vqa", "nlvr", "ve")


# ================================================================================================== text
class WordTokenizer:
    """Word-level ids for ALBEF from a :class:`~contrastive_repro.data.world.Vocab`: ``[CLS]=<bos> words [SEP]=<eos>``.

    ALBEF's special ids: ``pad_id = 0``, ``cls_id = <bos>``, ``sep_id = <eos>``, ``<unk>`` never masked, and a
    ``[MASK]`` id appended after the vocabulary (``vocab_size = len(vocab) + 1``). :meth:`encode` returns int64
    ids ``[N, max_len]``; :func:`trim` cuts a batch to its longest text.
    """

    def __init__(self, vocab: Vocab, max_len: int = 40):
        if max_len < 2:
            raise ValueError("max_len must be >= 2")
        self.vocab, self.max_len = vocab, int(max_len)

    @property
    def special(self) -> dict[str, Any]:
        v = self.vocab
        return dict(vocab_size=len(v) + 1, pad_id=v.pad_id, cls_id=v.bos_id, sep_id=v.eos_id, mask_id=len(v),
                    extra_special_ids=(v.unk_id,), max_text_len=self.max_len)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        if len(texts) == 0:
            return torch.zeros(0, self.max_len, dtype=torch.long)
        return self.vocab(list(texts), context_length=self.max_len)

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return trim(self.encode(texts), self.vocab.pad_id)


def trim(ids: torch.Tensor, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of a batch cut to its longest text (mask = ``ids != pad_id``)."""
    mask = ids != pad_id
    length = max(2, int(mask.sum(1).max())) if ids.numel() else 2
    return ids[:, :length].contiguous(), mask[:, :length].contiguous()


# ================================================================================================== images
class TensorImageBank:
    """Images held in memory as uint8 ``[N, 3, H, W]``, with optional augmented views ``[K, N, 3, H, W]``.

    ``get(idx, views=None)`` returns float ``[B, 3, H, W]`` normalised as ``(x / 255 - 0.5) / 0.25``; with
    ``views`` (``[B]`` ints in ``0..K-1``) item ``b`` comes from view ``views[b]``.
    """

    def __init__(self, images: torch.Tensor, views: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if views is not None and (views.ndim != 5 or views.shape[1:] != images.shape):
            raise ValueError(f"views must be [K, {', '.join(map(str, images.shape))}], got {tuple(views.shape)}")
        self.images, self.views = images, views

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def img_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def n_views(self) -> int:
        return 0 if self.views is None else int(self.views.shape[0])

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - 0.5) / 0.25

    def get(self, idx: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        if views is None:
            return self._norm(self.images[idx])
        if self.views is None:
            raise ValueError("this image bank has no augmented views")
        return self._norm(self.views[torch.as_tensor(views, dtype=torch.long), idx])


class FileImageBank:
    """Image files loaded on demand (PIL, a thread pool): resized to ``img_size`` and normalised with CLIP's mean /
    std (as ALBEF). A view ``v`` is a random resized crop (scale 0.5-1) + horizontal flip drawn from a generator
    seeded by ``(index, v)``, so a view is the same every time it is asked for; ``n_views`` such views exist."""

    MEAN = (0.48145466, 0.4578275, 0.40821073)
    STD = (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, paths: Sequence[str | os.PathLike], img_size: int, n_views: int = 2, threads: int = 8):
        self.paths = [str(p) for p in paths]
        self._img_size, self._n_views, self.threads = int(img_size), int(n_views), int(threads)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def img_size(self) -> int:
        return self._img_size

    @property
    def n_views(self) -> int:
        return self._n_views

    def _load(self, i: int, view: int | None) -> torch.Tensor:
        from PIL import Image
        import torchvision.transforms.v2.functional as TF

        with open(self.paths[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        x = TF.pil_to_tensor(img)
        s = self._img_size
        if view is None:
            x = TF.resize(x, [s, s], antialias=True)
        else:
            g = torch.Generator().manual_seed(int(i) * 1009 + int(view) + 1)
            _, h, w = x.shape
            area = h * w * float(torch.empty(1).uniform_(0.5, 1.0, generator=g))
            ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)))
            cw = max(1, min(w, int(round(math.sqrt(area * ratio)))))
            ch = max(1, min(h, int(round(math.sqrt(area / ratio)))))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            x = TF.resized_crop(x, top, left, ch, cw, [s, s], antialias=True)
            if bool(torch.rand(1, generator=g) < 0.5):
                x = TF.horizontal_flip(x)
        x = x.float() / 255.0
        mean = torch.tensor(self.MEAN)[:, None, None]
        std = torch.tensor(self.STD)[:, None, None]
        return (x - mean) / std

    def get(self, idx: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long).tolist()
        vs = [None] * len(idx) if views is None else torch.as_tensor(views).tolist()
        with ThreadPoolExecutor(max_workers=max(1, self.threads)) as pool:
            out = list(pool.map(lambda a: self._load(*a), zip(idx, vs)))
        return torch.stack(out) if out else torch.zeros(0, 3, self._img_size, self._img_size)


# ================================================================================================== tasks
@dataclass
class VLTasks:
    """Pre-training pairs and downstream items over one image bank (indices into ``bank``).

    * ``pretrain_images`` ``[P]`` and ``pretrain_texts`` (P captions); ``pretrain_text_views``: K lists of P
      augmented captions (empty: the momentum text encoder sees the caption itself);
    * ``retrieval[split] = (image indices [n_img], texts, text_to_image [n_txt] into the image indices)``;
    * ``vqa[split]``: ``(image, question, answer index or -100, human answers or None)``; ``answer_vocab``;
    * ``nlvr[split]``: ``(left image, right image, statement, 0/1)``; ``ve[split]``: ``(image, hypothesis, 0/1/2)``.

    Each task has ``"train"`` and ``"val"`` splits (val carved from training data) and one or more evaluation
    splits (``eval_splits``).
    """

    bank: Any
    tokenizer: WordTokenizer
    pretrain_images: torch.Tensor
    pretrain_texts: list[str]
    pretrain_text_views: list[list[str]]
    retrieval: dict[str, tuple[torch.Tensor, list[str], torch.Tensor]]
    vqa: dict[str, list[tuple]]
    answer_vocab: list[str]
    nlvr: dict[str, list[tuple]]
    ve: dict[str, list[tuple]]
    eval_splits: tuple[str, ...] = ("test",)
    info: dict = field(default_factory=dict)

    def counts(self) -> dict[str, Any]:
        return {"pretrain_pairs": len(self.pretrain_texts), "images": len(self.bank),
                "retrieval": {k: len(v[1]) for k, v in self.retrieval.items()},
                **{name: {k: len(v) for k, v in getattr(self, name).items()} for name in TASKS}}


def split_scenes(n: int, val_frac: float, test_frac: float, seed: int = 0) -> dict[str, list[int]]:
    """A random partition of ``range(n)`` into ``train`` / ``val`` / ``test`` (sorted index lists)."""
    if not (0 <= val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"need 0 <= val_frac, 0 < test_frac and val_frac + test_frac < 1, got {val_frac}, {test_frac}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    n_test, n_val = int(round(n * test_frac)), int(round(n * val_frac))
    if n_test < 1 or n - n_test - n_val < 2:
        raise ValueError(f"{n} scenes are too few for these fractions")
    return {"test": sorted(perm[:n_test]), "val": sorted(perm[n_test:n_test + n_val]),
            "train": sorted(perm[n_test + n_val:])}


def world_tasks(world: World, val_frac: float = 0.15, test_frac: float = 0.2, split_seed: int = 0,
                n_views: int = 2, shift: float = 1.0, max_text_len: int = 40) -> VLTasks:
    """:class:`VLTasks` from a generated world: scenes split into train / val / test (:func:`split_scenes`).

    Pre-training uses the train scenes' image-caption pairs; the augmented views are ``n_views`` re-renderings
    (new noise, colour jitter and object shifts of up to ``shift`` pixels, :meth:`World.rerender`) and ``n_views``
    re-captionings (:meth:`World.recaption`). Retrieval is evaluated on the test scenes (one caption each). VQA /
    VE items follow their scene; an NLVR item is kept when both its scenes lie in the same split.
    """
    splits = split_scenes(len(world), val_frac, test_frac, split_seed)
    where = np.empty(len(world), dtype=object)
    for name, idx in splits.items():
        where[idx] = name
    views = torch.stack([world.rerender(seed=1000 + k, shift=shift) for k in range(n_views)]) if n_views else None
    bank = TensorImageBank(world.images, views)
    tok = WordTokenizer(world.vocab(), max_len=max_text_len)
    train_idx = torch.tensor(splits["train"], dtype=torch.long)
    text_views = [[caps[i] for i in splits["train"]] for caps in
                  (world.recaption(seed=2000 + k)[0] for k in range(n_views))]
    test_idx = torch.tensor(splits["test"], dtype=torch.long)
    retrieval = {"test": (test_idx, [world.captions[i] for i in splits["test"]], torch.arange(len(test_idx)))}
    names = ("train", "val", "test")
    vqa = {s: [(i, q, a, None) for i, q, a in world.vqa if where[i] == s] for s in names}
    ve = {s: [(i, h, y) for i, h, y in world.ve if where[i] == s] for s in names}
    nlvr = {s: [(a, b, st, int(y)) for a, b, st, y in world.nlvr if where[a] == s and where[b] == s] for s in names}
    return VLTasks(bank=bank, tokenizer=tok, pretrain_images=train_idx,
                   pretrain_texts=[world.captions[i] for i in splits["train"]], pretrain_text_views=text_views,
                   retrieval=retrieval, vqa=vqa, answer_vocab=list(world.answer_vocab), nlvr=nlvr, ve=ve,
                   eval_splits=("test",),
                   info={"source": "generated world", "n_scenes": len(world), "world_seed": world.seed,
                         "split_seed": split_seed, "scenes": {k: len(v) for k, v in splits.items()},
                         "image_size": world.config.image_size, "info_gap": world.config.info_gap,
                         "ve_labels": list(VE_LABELS)})


# ================================================================================================== paper data
PAPER_DATA_LAYOUT = """\
DATA_ROOT/                                   (the environment variable DATA_ROOT, else ./data)
  albef_4m/train.tsv                         ALBEF's 4M pre-training pairs (CC3M + SBU + Visual Genome + COCO) as
                                             one CC3M-style table: header "filepath<TAB>title", then
                                             "images/000001.jpg<TAB>a dog on the beach" (paths relative to the
                                             table's folder)
  albef_4m/images/...
  karpathy/dataset_coco.json                 retrieval test (Karpathy split, 5k images x 5 captions)
  karpathy/dataset_flickr30k.json            retrieval test (1k images)
  coco/train2014/  coco/val2014/             COCO images (VQA v2 and the Karpathy split)
  flickr30k/flickr30k-images/<id>.jpg        Flickr30k images (SNLI-VE and the Karpathy split)
  vqav2/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json
  vqav2/v2_mscoco_{train2014,val2014}_annotations.json
  nlvr2/{train,dev,test1}.json               JSON lines (identifier, sentence, label)
  nlvr2/images/{train/<directory>,dev,test1}/<id>-img0.png, -img1.png
  snli_ve/snli_ve_{train,dev,test}.jsonl     JSON lines (Flickr30K_ID, sentence2, gold_label)"""

_PAPER_FILES = ("albef_4m/train.tsv", "karpathy/dataset_coco.json", "karpathy/dataset_flickr30k.json",
                "vqav2/v2_OpenEnded_mscoco_train2014_questions.json", "vqav2/v2_mscoco_train2014_annotations.json",
                "vqav2/v2_OpenEnded_mscoco_val2014_questions.json", "vqav2/v2_mscoco_val2014_annotations.json",
                "nlvr2/train.json", "nlvr2/dev.json", "nlvr2/test1.json",
                "snli_ve/snli_ve_train.jsonl", "snli_ve/snli_ve_dev.jsonl", "snli_ve/snli_ve_test.jsonl")


def check_paper_data(root: str | os.PathLike | None = None, pretrain_tsv: str = "albef_4m/train.tsv") -> Path:
    """Raise :class:`DatasetNotFoundError` listing every missing annotation file of the paper setting (see
    :data:`PAPER_DATA_LAYOUT`), naming ``DATA_ROOT``; return the resolved root when all are there."""
    from ..data.errors import DatasetNotFoundError, data_root

    base = data_root(root)
    files = (pretrain_tsv,) + _PAPER_FILES[1:]
    missing = [f for f in files if not (base / f).is_file()]
    if missing:
        env = os.environ.get("DATA_ROOT")
        where = f"DATA_ROOT={env}" if env else f"DATA_ROOT is not set, so ./data ({base.resolve()}) was used"
        raise DatasetNotFoundError(
            "ALBEF paper data (4M-image pre-training, COCO/Flickr30k retrieval, VQA v2, NLVR2, SNLI-VE)",
            base / missing[0], PAPER_DATA_LAYOUT,
            f"{where}; {len(missing)} of {len(files)} files are missing: {', '.join(missing)}. Nothing is "
            f"downloaded: put the data under DATA_ROOT (or run the world profiles: smoke, cpu).")
    return base


def _carve(items: list, frac: float, seed: int) -> tuple[list, list]:
    """Split ``items`` into (train, val) with ``val`` a random ``frac`` of them."""
    n_val = int(round(len(items) * frac))
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(int(seed))).tolist()
    val = set(perm[:n_val])
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


def benchmark_tasks(root: str | os.PathLike | None = None, img_size: int = 256, max_text_len: int = 30,
                    pretrain_tsv: str = "albef_4m/train.tsv", val_frac: float = 0.05, split_seed: int = 0,
                    n_answers: int = 3129, min_word_freq: int = 5, n_views: int = 2,
                    max_pretrain_pairs: int | None = None, check_files: bool = False) -> VLTasks:
    """:class:`VLTasks` from the real data under ``DATA_ROOT`` (:data:`PAPER_DATA_LAYOUT`).

    Splits (no evaluation server offline): VQA v2 trains on train2014 (minus a carved ``val``) and is tested on
    val2014 (the paper reports test-dev / test-std); NLVR2 and SNLI-VE train on train (minus ``val``) and are tested
    on dev and test1 / test; retrieval on the COCO and Flickr30k Karpathy test splits (without the retrieval
    fine-tuning of ALBEF). Text: a word-level vocabulary of the training texts (words seen ``min_word_freq`` times),
    not BERT's WordPiece (no BERT vocabulary offline). Raises :class:`DatasetNotFoundError` when data is missing.
    """
    from ..data.benchmarks import ImageTextDataset
    from ..data.vl_benchmarks import NLVR2, SNLIVE, KarpathyRetrieval, VQAv2, build_answer_vocab, normalize_answer

    base = check_paper_data(root, pretrain_tsv)
    paths: dict[str, int] = {}

    def pid(p) -> int:
        return paths.setdefault(str(p), len(paths))

    pre = ImageTextDataset(base / pretrain_tsv, check_files=check_files)
    n_pre = len(pre) if max_pretrain_pairs is None else min(len(pre), int(max_pretrain_pairs))
    pre_images = torch.tensor([pid(pre.paths[i]) for i in range(n_pre)], dtype=torch.long)
    pre_texts = list(pre.captions[:n_pre])

    retrieval = {}
    for ds_name in ("coco", "flickr30k"):
        kr = KarpathyRetrieval(ds_name, "test", root=base, check_files=check_files)
        texts, t2i = kr.pairs()
        retrieval[f"{ds_name}_test"] = (torch.tensor([pid(p) for p in kr.image_paths], dtype=torch.long), texts,
                                        torch.tensor(t2i, dtype=torch.long))

    vq_train = VQAv2("train2014", root=base, check_files=check_files)
    vq_test = VQAv2("val2014", root=base, check_files=check_files)
    answers = build_answer_vocab(([r.answer] for r in vq_train.records if r.answer), top_k=n_answers)
    a_ix = {a: i for i, a in enumerate(answers)}

    def vqa_items(ds):
        return [(pid(r.image_path), r.question, a_ix.get(normalize_answer(r.answer or ""), IGNORE_INDEX),
                 list(r.answers)) for r in ds.records]

    vq_tr, vq_val = _carve(vqa_items(vq_train), val_frac, split_seed)
    vqa = {"train": vq_tr, "val": vq_val, "val2014": vqa_items(vq_test)}

    def nlvr_items(split):
        ds = NLVR2(split, root=base, check_files=check_files)
        return [(pid(r.left_path), pid(r.right_path), r.sentence, r.label) for r in ds.records]

    nl_tr, nl_val = _carve(nlvr_items("train"), val_frac, split_seed + 1)
    nlvr = {"train": nl_tr, "val": nl_val, "dev": nlvr_items("dev"), "test1": nlvr_items("test1")}

    def ve_items(split):
        ds = SNLIVE(split, root=base, check_files=check_files)
        return [(pid(r.image_path), r.hypothesis, r.label) for r in ds.records]

    ve_tr, ve_val = _carve(ve_items("train"), val_frac, split_seed + 2)
    ve = {"train": ve_tr, "val": ve_val, "dev": ve_items("dev"), "test": ve_items("test")}

    train_texts = pre_texts + [x[1] for x in vq_tr] + [x[2] for x in nl_tr] + [x[1] for x in ve_tr]
    vocab = Vocab.build(train_texts, min_freq=min_word_freq)
    bank = FileImageBank(list(paths), img_size=img_size, n_views=n_views)
    return VLTasks(bank=bank, tokenizer=WordTokenizer(vocab, max_len=max_text_len), pretrain_images=pre_images,
                   pretrain_texts=pre_texts, pretrain_text_views=[], retrieval=retrieval, vqa=vqa,
                   answer_vocab=answers, nlvr=nlvr, ve=ve,
                   eval_splits=("val2014", "dev", "test1", "test"),
                   info={"source": "DATA_ROOT benchmarks", "root": str(base), "vocab": len(vocab),
                         "answers": len(answers)})


# ================================================================================================== model
def build_albef(tasks: VLTasks, preset: str = "tiny", seed: int = 0, **overrides: Any) -> ALBEF:
    """An :class:`ALBEF` for ``tasks``: the preset's sizes, the tokenizer's special ids and vocabulary size, the
    image bank's image size, separation heads on (same initial weights for every method at one seed)."""
    cfg = ALBEFConfig.preset(preset, **{**tasks.tokenizer.special, "img_size": tasks.bank.img_size,
                                        "sep_heads": True, **overrides})
    torch.manual_seed(int(seed))
    return ALBEF(cfg)


# ================================================================================================== pre-training
@dataclass
class PretrainConfig:
    """Pre-training hyper-parameters. ``alpha_ramp_steps=None``: ALBEF's ramp of the distillation weight over the
    first epoch. ``reg_weight`` multiplies the regularizer (0 or ``regularizer="none"``: plain ALBEF).

    ``queue_warmup_steps``: for that many first steps the feature queues are emptied before each step, so ITC
    contrasts within the batch only (ours, not ALBEF's: ALBEF starts from BERT / DeiT weights). Randomly
    initialised encoders give nearly the same [CLS] feature for every input; a queue full of those copies cancels
    the ITC gradient (positive and negatives coincide) and training stays collapsed. After the warm-up the queue
    fills with features that differ and ALBEF's queue-based ITC proceeds.

    ``reg_start_steps`` / ``reg_ramp_steps``: the regularizer is off for the first ``reg_start_steps`` steps and its
    weight then grows linearly to ``reg_weight`` over ``reg_ramp_steps`` (ours; the paper adds its regularizers to
    ALBEF initialised from pre-trained unimodal encoders). At random initialisation every feature is nearly the same
    point, where the bridge and geometric-consistency terms are already ~0 and pull towards keeping it so; switching
    them on after ITC has spread the features avoids that collapse."""

    steps: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.02
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    alpha: float | None = None
    alpha_ramp_steps: int | None = None
    queue_warmup_steps: int = 0
    regularizer: str = "none"
    reg_weight: float = 1.0
    reg_start_steps: int = 0
    reg_ramp_steps: int = 0
    bridge_t: float = 0.25
    uniformity_t: float = 2.0
    gc_reduction: str = "batch"
    use_views: bool = True
    grad_clip: float | None = 5.0
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    ckpt_dir: str | None = None
    ckpt_every: int = 0
    log_every: int = 0

    def __post_init__(self):
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        if not (math.isfinite(self.reg_weight) and self.reg_weight >= 0):
            raise ValueError(f"reg_weight must be finite and >= 0, got {self.reg_weight}")


def regularizer_loss(name: str, out: Mapping[str, torch.Tensor], *, bridge_t: float = 0.25,
                     uniformity_t: float = 2.0, gc_reduction: str = "batch") -> tuple[torch.Tensor, dict]:
    """The regularizer ``name`` of the unimodal features returned by :meth:`ALBEF.forward_pretrain` (``z_v``,
    ``z_t``, momentum ``z_v_aug``, ``z_t_aug``; ``zi_*`` for separation). Returns ``(value, parts)``."""
    if name not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {name!r}")
    z_v, z_t = out["z_v"], out["z_t"]
    if name == "none":
        return z_v.new_zeros(()), {}
    if name == "separation":
        if "zi_v" not in out:
            raise ValueError("the separation regularizer needs ALBEFConfig(sep_heads=True)")
        return separation_loss(z_v, z_t, out["zi_v"], out["zi_v_aug"], out["zi_t"], out["zi_t_aug"],
                               out["logit_scale"].detach(), t=uniformity_t, return_parts=True)
    if name == "bridge":
        return brownian_bridge_loss(z_v, z_t, out["z_v_aug"], t=bridge_t, return_parts=True)
    return geometric_consistency_loss(z_v, z_t, out["z_v_aug"], out["z_t_aug"], reduction=gc_reduction,
                                      return_parts=True)


def _pretrain_batches(tasks: VLTasks, cfg: PretrainConfig) -> EpochBatches:
    ids_all = tasks.tokenizer.encode(tasks.pretrain_texts)
    views_txt = [tasks.tokenizer.encode(v) for v in tasks.pretrain_text_views] if cfg.use_views else []
    n_img_views = tasks.bank.n_views if cfg.use_views else 0
    pad = tasks.tokenizer.vocab.pad_id
    n = len(tasks.pretrain_texts)

    def make_epoch(epoch: int):
        g = torch.Generator().manual_seed(int(cfg.seed) * 7919 + int(epoch) + 17)
        for idx in epoch_index_batches(n, cfg.batch_size, epoch=epoch, seed=cfg.seed):
            img_idx = tasks.pretrain_images[idx]
            images = tasks.bank.get(img_idx)
            ids, mask = trim(ids_all[idx], pad)
            images_aug = ids_aug = mask_aug = None
            if n_img_views:
                images_aug = tasks.bank.get(img_idx, torch.randint(0, n_img_views, (len(idx),), generator=g))
            if views_txt:
                pick = torch.randint(0, len(views_txt), (len(idx),), generator=g)
                stacked = torch.stack([views_txt[int(k)][int(j)] for k, j in zip(pick, idx)])
                ids_aug, mask_aug = trim(stacked, pad)
            yield images, ids, mask, images_aug, ids_aug, mask_aug

    return EpochBatches(make_epoch)


def pretrain(model: ALBEF, tasks: VLTasks, cfg: PretrainConfig) -> list[dict]:
    """Pre-train ``model`` in place on ``tasks``' pairs: ITC + ITM + MLM + ``reg_weight`` x regularizer.

    Returns the per-step history (``loss``, ``itc``, ``itm``, ``mlm``, ``reg``, ``lr``...). The loss must stay
    finite (the training loop raises :class:`~contrastive_repro.utils.NonFiniteError` otherwise).
    """
    n = len(tasks.pretrain_texts)
    if n < cfg.batch_size:
        raise ValueError(f"{n} pre-training pairs < batch_size {cfg.batch_size}")
    steps_per_epoch = max(1, n // cfg.batch_size)
    ramp = cfg.alpha_ramp_steps if cfg.alpha_ramp_steps is not None else min(steps_per_epoch, cfg.steps)
    alpha0 = model.config.alpha if cfg.alpha is None else float(cfg.alpha)
    use_reg = cfg.regularizer != "none" and cfg.reg_weight > 0

    def reg_scale(step: int) -> float:
        if step <= cfg.reg_start_steps:
            return 0.0
        return min(1.0, (step - cfg.reg_start_steps) / cfg.reg_ramp_steps) if cfg.reg_ramp_steps > 0 else 1.0

    def step_fn(m, batch, ctx):
        images, ids, mask, images_aug, ids_aug, mask_aug = batch
        if ctx.step <= cfg.queue_warmup_steps:
            unwrap_model(m).reset_queue()
        alpha = alpha0 * min(1.0, ctx.step / ramp) if ramp > 0 else alpha0
        out = m(images, ids, mask, images_aug, ids_aug, mask_aug, alpha=alpha)
        logs = {k: out[k].detach() for k in ("itc", "itm", "mlm")}
        loss = out["loss"]
        if use_reg:
            reg, _ = regularizer_loss(cfg.regularizer, out, bridge_t=cfg.bridge_t, uniformity_t=cfg.uniformity_t,
                                      gc_reduction=cfg.gc_reduction)
            loss = loss + cfg.reg_weight * reg_scale(ctx.step) * reg
            logs["reg"] = reg.detach()
        else:
            logs["reg"] = torch.zeros(())
        return {"loss": loss, **logs}

    tcfg = TrainConfig(max_steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                       min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, amp=cfg.amp, device=cfg.device,
                       seed=cfg.seed, ckpt_dir=cfg.ckpt_dir, ckpt_every=cfg.ckpt_every, log_every=cfg.log_every,
                       progress=False)
    return train(model, step_fn, _pretrain_batches(tasks, cfg), tcfg)


# ================================================================================================== fine-tuning
@dataclass
class FinetuneConfig:
    """Fine-tuning hyper-parameters (one set for every task). ``eval_every``: validation interval for model
    selection (the last step is always evaluated)."""

    steps: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.02
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    eval_every: int = 25
    eval_batch_size: int = 256
    grad_clip: float | None = 5.0
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def _predict(task_model: torch.nn.Module, items: list, make_inputs: Callable, batch_size: int) -> torch.Tensor:
    """Predicted class of every item (eval mode, no gradient); ``make_inputs(items) -> (inputs, targets)``."""
    was = task_model.training
    task_model.eval()
    dev = _device_of(task_model)
    preds = []
    try:
        for s in range(0, len(items), batch_size):
            inputs, _ = make_inputs(items[s:s + batch_size])
            preds.append(task_model(*[x.to(dev) for x in inputs]).argmax(-1).cpu())
    finally:
        task_model.train(was)
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _accuracy(pred: torch.Tensor, items: list, label_pos: int) -> float:
    if not items:
        return float("nan")
    y = torch.tensor([it[label_pos] for it in items], dtype=torch.long)
    return float((pred == y).double().mean())


def _finetune(task_model: torch.nn.Module, tasks: VLTasks, items: Mapping[str, list], make_inputs: Callable,
              label_pos: int, cfg: FinetuneConfig, extra_metrics: Callable | None = None) -> dict:
    train_items, val_items = items["train"], items["val"]
    if len(train_items) < cfg.batch_size:
        raise ValueError(f"{len(train_items)} training items < batch_size {cfg.batch_size}")
    if not val_items:
        raise ValueError("the validation split is empty: model selection needs one")

    def make_epoch(epoch: int):
        for idx in epoch_index_batches(len(train_items), cfg.batch_size, epoch=epoch, seed=cfg.seed):
            yield make_inputs([train_items[i] for i in idx.tolist()])

    def step_fn(m, batch):
        inputs, targets = batch
        return m.loss(m(*inputs), targets)

    def eval_fn(m):
        return {"val_acc": _accuracy(_predict(m, val_items, make_inputs, cfg.eval_batch_size), val_items,
                                     label_pos)}

    best = {"acc": -1.0, "step": 0, "state": None}

    def keep_best(trainer, record):
        acc = record.get("val_acc")
        if acc is not None and acc > best["acc"]:
            best.update(acc=acc, step=record["step"],
                        state={k: v.detach().clone() for k, v in trainer.module.state_dict().items()})

    tcfg = TrainConfig(max_steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                       min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, amp=cfg.amp, device=cfg.device,
                       seed=cfg.seed, eval_every=cfg.eval_every, log_every=0, progress=False)
    history = train(task_model, step_fn, EpochBatches(make_epoch), tcfg, eval_fn=eval_fn, callbacks=[keep_best])
    task_model.load_state_dict(best["state"])
    res = {"val_acc": best["acc"], "best_step": best["step"], "steps": len(history),
           "final_train_loss": history[-1]["loss"] if history else float("nan"),
           "val_curve": [[h["step"], h["val_acc"]] for h in history if "val_acc" in h]}
    for split in tasks.eval_splits:
        if split in items and items[split]:
            pred = _predict(task_model, items[split], make_inputs, cfg.eval_batch_size)
            res[f"{split}_acc"] = _accuracy(pred, items[split], label_pos)
            res[f"{split}_n"] = len(items[split])
            if extra_metrics is not None:
                res.update({f"{split}_{k}": v for k, v in extra_metrics(pred, items[split]).items()})
    return res


def finetune_vqa(albef: ALBEF, tasks: VLTasks, cfg: FinetuneConfig) -> dict:
    """Fine-tune a copy of ``albef`` for VQA (classification over ``tasks.answer_vocab``); returns
    ``{"val_acc", "best_step", "<split>_acc", ...}`` (+ ``"<split>_vqa_score"`` when human answers are known)."""
    model = ALBEFForVQA(copy.deepcopy(albef), len(tasks.answer_vocab))
    tok = tasks.tokenizer

    def make_inputs(items):
        img = tasks.bank.get(torch.tensor([it[0] for it in items], dtype=torch.long))
        ids, mask = tok([it[1] for it in items])
        return (img, ids, mask), torch.tensor([it[2] for it in items], dtype=torch.long)

    def vqa_score(pred, items):
        if any(it[3] is None for it in items):
            return {}
        from ..data.vl_benchmarks import vqa_accuracy

        return {"vqa_score": float(np.mean([vqa_accuracy(tasks.answer_vocab[int(p)], it[3])
                                            for p, it in zip(pred, items)]))}

    return _finetune(model, tasks, tasks.vqa, make_inputs, 2, cfg, vqa_score)


def finetune_nlvr(albef: ALBEF, tasks: VLTasks, cfg: FinetuneConfig) -> dict:
    """Fine-tune a copy of ``albef`` for two-image true / false statements (NLVR2-style)."""
    model = ALBEFForNLVR(copy.deepcopy(albef))
    tok = tasks.tokenizer

    def make_inputs(items):
        a = tasks.bank.get(torch.tensor([it[0] for it in items], dtype=torch.long))
        b = tasks.bank.get(torch.tensor([it[1] for it in items], dtype=torch.long))
        ids, mask = tok([it[2] for it in items])
        return (a, b, ids, mask), torch.tensor([it[3] for it in items], dtype=torch.long)

    return _finetune(model, tasks, tasks.nlvr, make_inputs, 3, cfg)


def finetune_ve(albef: ALBEF, tasks: VLTasks, cfg: FinetuneConfig) -> dict:
    """Fine-tune a copy of ``albef`` for 3-way visual entailment (SNLI-VE-style)."""
    model = ALBEFForVE(copy.deepcopy(albef), n_classes=len(VE_LABELS))
    tok = tasks.tokenizer

    def make_inputs(items):
        img = tasks.bank.get(torch.tensor([it[0] for it in items], dtype=torch.long))
        ids, mask = tok([it[1] for it in items])
        return (img, ids, mask), torch.tensor([it[2] for it in items], dtype=torch.long)

    return _finetune(model, tasks, tasks.ve, make_inputs, 2, cfg)


# ================================================================================================== retrieval
def recall_from_scores(i2t: torch.Tensor, t2i: torch.Tensor, text_to_image: torch.Tensor,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k from score matrices ``[n_img, n_txt]`` (``i2t`` ranks each row, ``t2i`` each column).

    Image -> text: an image is correct at k when one of its captions ranks in its top k (images without a caption
    are left out); text -> image: a caption is correct when its image ranks in the caption's top k. The rank is the
    number of candidates scoring strictly higher (ties count in the query's favour). Fractions in [0, 1].
    """
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    n_img, n_txt = i2t.shape
    own = text_to_image[None, :] == torch.arange(n_img)[:, None]  # [n_img, n_txt]
    has = own.any(1)
    best = torch.where(own, i2t, torch.full_like(i2t, -math.inf)).max(1).values
    rank_i = (i2t > best[:, None]).sum(1)[has]
    pos = t2i[text_to_image, torch.arange(n_txt)]
    rank_t = (t2i > pos[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((rank_i < k).double().mean()) if len(rank_i) else float("nan")
    for k in ks:
        out[f"t2i_R@{k}"] = float((rank_t < k).double().mean()) if n_txt else float("nan")
    out["mean_recall"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks]))
    return out


@torch.no_grad()
def evaluate_retrieval(model: ALBEF, tasks: VLTasks, split: str = "test", k_rerank: int = 16,
                       ks: Sequence[int] = (1, 5, 10), batch_size: int = 256) -> dict[str, float]:
    """Zero-shot image-text retrieval on ``tasks.retrieval[split]``: ITC recall then ITM re-ranking of the top
    ``k_rerank`` (:meth:`ALBEF.retrieval_scores`). Keys ``i2t_R@k``, ``t2i_R@k``, ``mean_recall`` (re-ranked) and
    the same prefixed ``itc_`` (ITC similarities only)."""
    img_idx, texts, t2i = tasks.retrieval[split]
    was = model.training
    model.eval()
    dev = _device_of(model)
    try:
        images = tasks.bank.get(img_idx).to(dev)
        ids, mask = tasks.tokenizer(texts)
        sc = model.retrieval_scores(images, (ids.to(dev), mask.to(dev)), k_rerank=k_rerank, batch_size=batch_size)
    finally:
        model.train(was)
    out = recall_from_scores(sc.i2t.cpu(), sc.t2i.cpu(), t2i, ks)
    out.update({f"itc_{k}": v for k, v in recall_from_scores(sc.itc.cpu(), sc.itc.cpu(), t2i, ks).items()})
    return out


@torch.no_grad()
def modality_geometry(model: ALBEF, tasks: VLTasks, split: str = "test", n_points: int = 200,
                      batch_size: int = 256) -> dict[str, Any]:
    """Unimodal feature geometry on the retrieval pairs of ``split`` (the first caption of each image):

    ``gap`` = ``||mean z_V - mean z_T||`` (the modality gap of Liang et al. 2022), ``matched_cos`` = mean
    ``<z_Vj, z_Tj>``, ``random_cos`` = mean ``<z_Vj, z_Tk>`` over all pairs, and ``pca``: 2-D coordinates of the
    first ``n_points`` image and text features in the top-2 principal components of all of them together.
    """
    img_idx, texts, t2i = tasks.retrieval[split]
    first = {}
    for j, i in enumerate(t2i.tolist()):
        first.setdefault(i, j)
    keep = sorted(first)
    was = model.training
    model.eval()
    dev = _device_of(model)
    try:
        zv, zt = [], []
        for s in range(0, len(keep), batch_size):
            part = keep[s:s + batch_size]
            zv.append(model.image_features(tasks.bank.get(img_idx[part]).to(dev)).float().cpu())
            ids, mask = tasks.tokenizer([texts[first[i]] for i in part])
            zt.append(model.text_features(ids.to(dev), mask.to(dev)).float().cpu())
    finally:
        model.train(was)
    zv, zt = torch.cat(zv), torch.cat(zt)
    both = torch.cat([zv, zt]).double()
    centred = both - both.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    xy = centred @ vh[:2].T
    m = min(n_points, len(keep))
    var = centred.square().sum()
    return {"gap": float((zv.mean(0) - zt.mean(0)).norm()), "matched_cos": float((zv * zt).sum(1).mean()),
            "random_cos": float((zv.mean(0) * zt.mean(0)).sum()),
            "pca_explained": float(xy.square().sum() / var) if var > 0 else float("nan"),
            "pca": {"image": xy[:m].round(decimals=4).tolist(), "text": xy[len(keep):len(keep) + m].round(
                decimals=4).tolist()}}


# ================================================================================================== one run
def _cfg(cls, d: Mapping[str, Any] | None, **fixed) -> Any:
    d = dict(d or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    return cls(**{**d, **fixed})


def run_method(tasks: VLTasks, method: str, seed: int, *, model: Mapping[str, Any] | None = None,
               pretrain_cfg: Mapping[str, Any] | None = None, finetune_cfg: Mapping[str, Any] | None = None,
               reg_weights: Mapping[str, float] | None = None, k_rerank: int = 16, n_pca: int = 200,
               threads: int | None = None) -> dict[str, Any]:
    """Pre-train ALBEF with ``method``'s regularizer (:data:`METHODS`), then evaluate retrieval and fine-tune on
    VQA, NLVR and VE; everything seeded by ``seed``. Returns a JSON-ready dict.

    ``model``: ``{"preset": "tiny" | "cpu" | "paper", **ALBEFConfig overrides}``. ``pretrain_cfg`` /
    ``finetune_cfg``: fields of :class:`PretrainConfig` / :class:`FinetuneConfig` (the regularizer and seed are set
    here). ``reg_weights``: weight per regularizer name (default 1). ``threads``: ``torch.set_num_threads``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if threads:
        torch.set_num_threads(int(threads))
    t0, c0 = time.time(), time.process_time()
    seed_everything(int(seed))
    reg = METHODS[method]
    weight = 0.0 if reg == "none" else float((reg_weights or {}).get(reg, 1.0))
    mcfg = dict(model or {})
    preset = mcfg.pop("preset", "tiny")
    albef = build_albef(tasks, preset, seed=seed, **mcfg)
    pcfg = _cfg(PretrainConfig, pretrain_cfg, regularizer=reg, reg_weight=weight, seed=int(seed))
    fcfg = _cfg(FinetuneConfig, finetune_cfg, seed=int(seed))
    history = pretrain(albef, tasks, pcfg)
    t_pre = time.time() - t0
    tail = history[-max(1, len(history) // 10):]
    res: dict[str, Any] = {
        "method": method, "regularizer": reg, "reg_weight": weight, "seed": int(seed),
        "pretrain": {k: float(np.mean([h[k] for h in tail])) for k in ("loss", "itc", "itm", "mlm", "reg")},
        "pretrain_curve": [[h["step"], h["loss"], h["itc"], h["itm"], h["mlm"], h["reg"]]
                           for h in history[:: max(1, len(history) // 50)]],
        "temp": float(albef.temp.detach()),
    }
    res["pretrain"]["steps"] = len(history)
    for split in tasks.retrieval:
        res[f"retrieval_{split}" if split != "test" else "retrieval"] = evaluate_retrieval(
            albef, tasks, split, k_rerank=k_rerank)
    first = next(iter(tasks.retrieval))
    res["geometry"] = modality_geometry(albef, tasks, first, n_points=n_pca)
    t1 = time.time()
    res["vqa"] = finetune_vqa(albef, tasks, fcfg)
    res["nlvr"] = finetune_nlvr(albef, tasks, fcfg)
    res["ve"] = finetune_ve(albef, tasks, fcfg)
    res["seconds"] = {"pretrain": round(t_pre, 2), "finetune": round(time.time() - t1, 2),
                      "total": round(time.time() - t0, 2), "cpu": round(time.process_time() - c0, 2)}
    for k, v in res["pretrain"].items():
        check_finite(v, f"{method}/seed{seed} pre-training {k}")
    return json_safe(res)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None and numpy / torch scalars made plain, so that
    it can be written with :func:`contrastive_repro.io.atomic_write_json` (which rejects NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class _NotCached(Exception):
    pass


def _raise_not_cached():
    raise _NotCached


def run_cached_parallel(run, jobs: Mapping[str, tuple[Callable, tuple, dict]], workers: int = 1) -> dict[str, dict]:
    """``{key: run.cached(key, lambda: fn(*args, **kwargs))}`` for ``jobs = {key: (fn, args, kwargs)}``, the missing
    ones computed in ``workers`` processes (spawned; ``fn`` must be importable) and each stored as soon as it is done,
    so an interrupted sweep resumes. ``workers <= 1`` computes them one after the other in this process."""
    out: dict[str, dict] = {}
    missing = []
    for key in jobs:
        try:
            out[key] = run.cached(key, _raise_not_cached)
        except _NotCached:
            missing.append(key)
    if not missing:
        return out
    if workers <= 1 or len(missing) == 1:
        for key in missing:
            fn, args, kwargs = jobs[key]
            out[key] = run.cached(key, lambda: fn(*args, **kwargs))
        return out
    import multiprocessing as mp

    pool = ProcessPoolExecutor(max_workers=min(workers, len(missing)), mp_context=mp.get_context("spawn"))
    try:
        futures = {pool.submit(jobs[k][0], *jobs[k][1], **jobs[k][2]): k for k in missing}
        for fut in as_completed(futures):
            key = futures[fut]
            out[key] = run.cached(key, fut.result)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # a failure: stop, keep what is cached
        raise
    pool.shutdown()
    return {k: out[k] for k in jobs}
