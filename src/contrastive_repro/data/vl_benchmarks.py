"""Vision-language benchmarks in their released formats, read from ``DATA_ROOT`` (never downloaded).

The ALBEF downstream tasks of the latent-modality-structure paper (CVPR 2023, Table 4; ``FACTS.md`` section B):

* :class:`VQAv2` -- ``v2_OpenEnded_mscoco_{split}_questions.json`` + ``v2_mscoco_{split}_annotations.json`` (the
  official VQA v2 files) with the COCO images; ``records[i]`` is a :class:`VQARecord` (question, the 10 human
  answers, the consensus ``multiple_choice_answer``); :func:`vqa_accuracy` is the VQA metric;
* :class:`NLVR2` -- ``{split}.json`` (JSON lines: ``identifier``, ``sentence``, ``label``) with the image pairs
  ``images/{split}/[<directory>/]<identifier minus its last field>-img0.png`` / ``-img1.png``;
* :class:`SNLIVE` -- ``snli_ve_{split}.jsonl`` (``Flickr30K_ID``, ``sentence2``, ``gold_label``) with the
  Flickr30k images;
* :class:`KarpathyRetrieval` -- the Karpathy split files ``dataset_coco.json`` / ``dataset_flickr30k.json``
  (``images[].split``, ``filename``, ``sentences[].raw``) for image-text retrieval (5 captions per image).

Every class takes ``root`` (default :func:`~contrastive_repro.data.errors.data_root`): the ``DATA_ROOT`` folder that
holds the dataset's sub-folder (the ``LAYOUT`` of each class). A missing annotation file raises
:class:`DatasetNotFoundError` naming the path and the expected layout; with ``check_files=True`` (default) a missing
image does too. Items load lazily: ``ds[i]`` opens the image(s) with PIL and applies ``transform``.

Labels: NLVR2 ``True`` -> 1, ``False`` -> 0 (as :class:`~contrastive_repro.models.albef.ALBEFForNLVR`); SNLI-VE
entailment / neutral / contradiction -> 0 / 1 / 2 (:data:`VE_LABELS`, the order of the generated world).
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ._common import pil_loader
from .errors import CorruptDatasetError, DatasetNotFoundError, EmptyDatasetError, data_root

__all__ = ["VE_LABELS", "VQARecord", "NLVRRecord", "VERecord", "RetrievalImage", "VQAv2", "NLVR2", "SNLIVE",
           "KarpathyRetrieval", "normalize_answer", "vqa_accuracy", "build_answer_vocab", "check_files_exist"]

VE_LABELS = ("entailment", "neutral", "contradiction")


def _read_json(name: str, path: Path, layout: str):
    if not path.is_file():
        raise DatasetNotFoundError(name, path, layout, "set DATA_ROOT or pass root=; nothing is downloaded")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptDatasetError(name, path, f"not valid JSON ({e})") from e


def _read_jsonl(name: str, path: Path, layout: str) -> list[dict]:
    if not path.is_file():
        raise DatasetNotFoundError(name, path, layout, "set DATA_ROOT or pass root=; nothing is downloaded")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CorruptDatasetError(name, path, f"line {lineno} is not a JSON object ({e})") from e
    return rows


def _require_keys(name: str, path: Path, row: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise CorruptDatasetError(name, path, f"{where} lacks the field(s) {missing} (has {sorted(row)})")


def check_files_exist(name: str, paths: Iterable[Path], layout: str, max_report: int = 5) -> None:
    """Raise :class:`DatasetNotFoundError` naming the first missing files of ``paths``, if any."""
    paths = list(dict.fromkeys(Path(p) for p in paths))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = "\n".join(f"  {p}" for p in missing[:max_report])
        more = f"\n  ... and {len(missing) - max_report} more" if len(missing) > max_report else ""
        raise DatasetNotFoundError(name, missing[0], f"{len(missing)} of {len(paths)} image files are missing:\n"
                                                     f"{shown}{more}\n\n{layout}")


class _VLDataset:
    """Shared pieces: ``records``, lazily loaded images, ``transform``, ``image_paths``."""

    name = "vision-language dataset"
    LAYOUT = ""

    records: list
    transform: Callable | None
    loader: Callable = staticmethod(pil_loader)

    def __len__(self) -> int:
        return len(self.records)

    def _img(self, path: Path):
        img = self.loader(path)
        return self.transform(img) if self.transform is not None else img

    def _finish(self, split: str, where: Path, check_files: bool) -> None:
        if not self.records:
            raise EmptyDatasetError(f"{self.name}: split {split!r} holds no items (read from {where})")
        if check_files:
            check_files_exist(self.name, self.image_paths, self.LAYOUT)

    @property
    def image_paths(self) -> list[Path]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)})"


# ---------------------------------------------------------------------------------------------------------- VQA v2
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's",
                 "whats": "what's", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't", "havent": "haven't",
                 "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't", "didnt": "didn't"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")


def normalize_answer(ans: str) -> str:
    """The VQA evaluation's answer normalisation, slightly simplified: lower case, punctuation removed (a period
    only when not inside a number), number words to digits, articles dropped, common contractions restored."""
    a = ans.replace("\n", " ").replace("\t", " ").strip().lower()
    a = _PUNCT.sub("", a)
    a = re.sub(r"(?<!\d)\.(?!\d)", "", a)
    words = []
    for w in a.split():
        w = _NUMBERS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The VQA v2 accuracy of one prediction: the mean over the 10 leave-one-out subsets of 9 human answers of
    ``min(#humans in the subset who gave the prediction / 3, 1)`` (Antol et al. / the official evaluation).

    With fewer or more than 10 answers the same leave-one-out average is taken over the answers given; with no
    answer the accuracy is 0.
    """
    if not human_answers:
        return 0.0
    pred = normalize_answer(prediction)
    gt = [normalize_answer(a) for a in human_answers]
    if len(gt) == 1:
        return float(min(1.0, (gt[0] == pred) / 3.0))
    matches = [g == pred for g in gt]
    total = sum(matches)
    accs = [min(1.0, (total - m) / 3.0) for m in matches]
    return float(sum(accs) / len(accs))


def build_answer_vocab(answer_lists: Iterable[Sequence[str]], top_k: int = 3129, min_count: int = 1) -> list[str]:
    """The ``top_k`` most frequent normalised answers (ties broken alphabetically) -- the answer list of the VQA
    classification baselines (BUTD / LXMERT / UNITER use 3,129 answers; ALBEF ranks 3,192 candidates)."""
    counts = Counter(normalize_answer(a) for answers in answer_lists for a in answers)
    ranked = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
    return ranked[:top_k]


@dataclass
class VQARecord:
    question_id: int
    image_id: int
    image_path: Path
    question: str
    answers: list[str] = field(default_factory=list)  # the (10) human answers; empty for test splits
    answer: str | None = None  # multiple_choice_answer (the consensus answer); None for test splits
    answer_type: str | None = None


class VQAv2(_VLDataset):
    """VQA v2 (Goyal et al. 2017): questions + annotations of one split and the COCO images.

    ``split``: ``train2014``, ``val2014``, ``test2015`` or ``test-dev2015`` (test splits have no annotation file:
    ``answers`` stay empty). Images are ``DATA_ROOT/coco/<image folder>/COCO_<image folder>_<12-digit id>.jpg``
    with the folder ``train2014`` / ``val2014`` / ``test2015`` (test-dev uses the test2015 images).
    ``ds[i] -> (image, question, answers)``.
    """

    name = "VQA v2"
    LAYOUT = """\
DATA_ROOT/vqav2/
  v2_OpenEnded_mscoco_{split}_questions.json   {"questions": [{"image_id", "question", "question_id"}, ...]}
  v2_mscoco_{split}_annotations.json           {"annotations": [{"question_id", "image_id",
                                                 "multiple_choice_answer", "answer_type",
                                                 "answers": [{"answer", "answer_confidence", "answer_id"} x 10]}]}
      split = train2014 | val2014 | test2015 | test-dev2015 (no annotations for the test splits)
DATA_ROOT/coco/
  train2014/COCO_train2014_000000000009.jpg ...   val2014/COCO_val2014_...jpg   test2015/COCO_test2015_...jpg"""
    SPLITS = ("train2014", "val2014", "test2015", "test-dev2015")

    def __init__(self, split: str = "train2014", root: str | os.PathLike | None = None,
                 image_root: str | os.PathLike | None = None, transform: Callable | None = None,
                 check_files: bool = True):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        base = data_root(root)
        d = base / "vqav2"
        coco = Path(image_root) if image_root is not None else base / "coco"
        qfile = d / f"v2_OpenEnded_mscoco_{split}_questions.json"
        questions = _read_json(self.name, qfile, self.LAYOUT)
        if not isinstance(questions, dict) or "questions" not in questions:
            raise CorruptDatasetError(self.name, qfile, "no 'questions' list")
        annotations: dict[int, dict] = {}
        if not split.startswith("test"):
            afile = d / f"v2_mscoco_{split}_annotations.json"
            ann = _read_json(self.name, afile, self.LAYOUT)
            if not isinstance(ann, dict) or "annotations" not in ann:
                raise CorruptDatasetError(self.name, afile, "no 'annotations' list")
            for a in ann["annotations"]:
                _require_keys(self.name, afile, a, ("question_id", "answers"), "an annotation")
                annotations[int(a["question_id"])] = a
        folder = "test2015" if split.startswith("test") else split
        self.records: list[VQARecord] = []
        for q in questions["questions"]:
            _require_keys(self.name, qfile, q, ("image_id", "question", "question_id"), "a question")
            qid, iid = int(q["question_id"]), int(q["image_id"])
            rec = VQARecord(qid, iid, coco / folder / f"COCO_{folder}_{iid:012d}.jpg", str(q["question"]))
            if annotations:
                a = annotations.get(qid)
                if a is None:
                    raise CorruptDatasetError(self.name, d / f"v2_mscoco_{split}_annotations.json",
                                              f"no annotation for question {qid}")
                rec.answers = [str(x["answer"]) for x in a["answers"]]
                rec.answer = str(a.get("multiple_choice_answer", Counter(rec.answers).most_common(1)[0][0]))
                rec.answer_type = a.get("answer_type")
            self.records.append(rec)
        self.split, self.root, self.transform = split, d, transform
        self._finish(split, d, check_files)

    @property
    def image_paths(self) -> list[Path]:
        return [r.image_path for r in self.records]

    @property
    def questions(self) -> list[str]:
        return [r.question for r in self.records]

    def __getitem__(self, i: int):
        r = self.records[i]
        return self._img(r.image_path), r.question, list(r.answers)


# ----------------------------------------------------------------------------------------------------------- NLVR2
@dataclass
class NLVRRecord:
    identifier: str
    sentence: str
    label: int  # 1 = True
    left_path: Path
    right_path: Path


def _bool_label(name: str, path: Path, value) -> int:
    if isinstance(value, bool):
        return int(value)
    s = str(value).strip().lower()
    if s in ("true", "1"):
        return 1
    if s in ("false", "0"):
        return 0
    raise CorruptDatasetError(name, path, f"label {value!r} is neither True nor False")


class NLVR2(_VLDataset):
    """NLVR2 (Suhr et al. 2019): a sentence about an image pair, True or False.

    ``split``: ``train``, ``dev``, ``test1`` (public test, the paper's "test-P"). The pair of item
    ``train-10171-0-0`` is ``train-10171-0-img0.png`` / ``-img1.png``: the identifier without its last field. The
    images are looked up in ``images/{split}/<directory>/`` when the line has a ``directory`` field (the train
    split's sub-folders), else in ``images/{split}/``. ``ds[i] -> (left image, right image, sentence, label)``.
    """

    name = "NLVR2"
    LAYOUT = """\
DATA_ROOT/nlvr2/
  train.json  dev.json  test1.json    JSON lines: {"identifier": "dev-850-0-0", "sentence": "...",
                                       "label": "True"|"False", ["directory": 10 (train only)], ...}
  images/train/<directory>/train-10171-0-img0.png  train-10171-0-img1.png ...
  images/dev/dev-850-0-img0.png  dev-850-0-img1.png ...
  images/test1/test1-0-1-img0.png ..."""
    SPLITS = ("train", "dev", "test1")

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None,
                 transform: Callable | None = None, check_files: bool = True):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        d = data_root(root) / "nlvr2"
        path = d / f"{split}.json"
        rows = _read_jsonl(self.name, path, self.LAYOUT)
        self.records: list[NLVRRecord] = []
        for row in rows:
            _require_keys(self.name, path, row, ("identifier", "sentence", "label"), "a line")
            ident = str(row["identifier"])
            prefix = ident.rsplit("-", 1)[0]
            folder = d / "images" / split
            if "directory" in row and row["directory"] not in (None, ""):
                folder = folder / str(row["directory"])
            self.records.append(NLVRRecord(ident, str(row["sentence"]), _bool_label(self.name, path, row["label"]),
                                           folder / f"{prefix}-img0.png", folder / f"{prefix}-img1.png"))
        self.split, self.root, self.transform = split, d, transform
        self._finish(split, d, check_files)

    @property
    def image_paths(self) -> list[Path]:
        return [p for r in self.records for p in (r.left_path, r.right_path)]

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def __getitem__(self, i: int):
        r = self.records[i]
        return self._img(r.left_path), self._img(r.right_path), r.sentence, r.label


# --------------------------------------------------------------------------------------------------------- SNLI-VE
@dataclass
class VERecord:
    image_id: str
    image_path: Path
    hypothesis: str
    label: int  # index into VE_LABELS


class SNLIVE(_VLDataset):
    """SNLI-VE (Xie et al. 2019): a Flickr30k image as premise, a hypothesis, entailment / neutral / contradiction.

    ``split``: ``train``, ``dev``, ``test``. Lines whose ``gold_label`` is not one of the three (SNLI's ``-``) are
    dropped. ``ds[i] -> (image, hypothesis, label)`` with the label index into :data:`VE_LABELS`.
    """

    name = "SNLI-VE"
    LAYOUT = """\
DATA_ROOT/snli_ve/
  snli_ve_train.jsonl  snli_ve_dev.jsonl  snli_ve_test.jsonl
      JSON lines: {"Flickr30K_ID": "3416050480", "sentence2": "<hypothesis>",
                   "gold_label": "entailment"|"neutral"|"contradiction", ...}
DATA_ROOT/flickr30k/flickr30k-images/3416050480.jpg ..."""
    SPLITS = ("train", "dev", "test")

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None,
                 image_root: str | os.PathLike | None = None, transform: Callable | None = None,
                 check_files: bool = True):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of {self.SPLITS}, got {split!r}")
        base = data_root(root)
        d = base / "snli_ve"
        images = Path(image_root) if image_root is not None else base / "flickr30k" / "flickr30k-images"
        path = d / f"snli_ve_{split}.jsonl"
        rows = _read_jsonl(self.name, path, self.LAYOUT)
        self.records: list[VERecord] = []
        self.n_dropped = 0
        for row in rows:
            _require_keys(self.name, path, row, ("Flickr30K_ID", "sentence2", "gold_label"), "a line")
            label = str(row["gold_label"]).strip().lower()
            if label not in VE_LABELS:
                self.n_dropped += 1
                continue
            iid = str(row["Flickr30K_ID"])
            name = iid if iid.lower().endswith(".jpg") else f"{iid}.jpg"
            self.records.append(VERecord(iid, images / name, str(row["sentence2"]), VE_LABELS.index(label)))
        self.split, self.root, self.transform = split, d, transform
        self._finish(split, d, check_files)

    @property
    def image_paths(self) -> list[Path]:
        return [r.image_path for r in self.records]

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def __getitem__(self, i: int):
        r = self.records[i]
        return self._img(r.image_path), r.hypothesis, r.label


# ------------------------------------------------------------------------------------------- Karpathy retrieval
@dataclass
class RetrievalImage:
    path: Path
    captions: list[str]
    split: str


class KarpathyRetrieval(_VLDataset):
    """COCO / Flickr30k image-text retrieval with the Karpathy split (``dataset_coco.json`` /
    ``dataset_flickr30k.json``).

    ``split``: ``train`` (COCO: with ``restval`` when ``include_restval``), ``val``, ``test``. ``images`` lists
    :class:`RetrievalImage` (path, its captions); :meth:`pairs` flattens them to ``(image index, caption)`` with
    ``text_to_image`` for :func:`~contrastive_repro.metrics.image_text_recall`. ``ds[i] -> (image, captions)``.
    """

    name = "Karpathy split"
    LAYOUT = """\
DATA_ROOT/karpathy/dataset_coco.json  or  dataset_flickr30k.json
    {"images": [{"filepath": "val2014" (COCO only), "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train"|"restval"|"val"|"test", "sentences": [{"raw": "A man ..."}, ...]}, ...]}
DATA_ROOT/coco/val2014/COCO_val2014_000000391895.jpg ...        (COCO: <filepath>/<filename>)
DATA_ROOT/flickr30k/flickr30k-images/1000092795.jpg ...         (Flickr30k: <filename>)"""

    def __init__(self, dataset: str = "coco", split: str = "test", root: str | os.PathLike | None = None,
                 image_root: str | os.PathLike | None = None, include_restval: bool = True,
                 transform: Callable | None = None, check_files: bool = True):
        if dataset not in ("coco", "flickr30k"):
            raise ValueError(f"dataset must be 'coco' or 'flickr30k', got {dataset!r}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {split!r}")
        base = data_root(root)
        path = base / "karpathy" / f"dataset_{dataset}.json"
        data = _read_json(self.name, path, self.LAYOUT)
        if not isinstance(data, dict) or "images" not in data:
            raise CorruptDatasetError(self.name, path, "no 'images' list")
        if image_root is not None:
            img_base = Path(image_root)
        else:
            img_base = base / "coco" if dataset == "coco" else base / "flickr30k" / "flickr30k-images"
        wanted = {split} | ({"restval"} if split == "train" and include_restval else set())
        self.images: list[RetrievalImage] = []
        for im in data["images"]:
            _require_keys(self.name, path, im, ("filename", "split", "sentences"), "an image entry")
            if im["split"] not in wanted:
                continue
            p = img_base / im["filepath"] / im["filename"] if im.get("filepath") else img_base / im["filename"]
            caps = [str(s["raw"]).strip() for s in im["sentences"] if "raw" in s]
            self.images.append(RetrievalImage(p, caps, str(im["split"])))
        self.records = self.images
        self.dataset, self.split, self.root, self.transform = dataset, split, path.parent, transform
        self._finish(split, path.parent, check_files)

    @property
    def image_paths(self) -> list[Path]:
        return [im.path for im in self.images]

    def pairs(self) -> tuple[list[str], list[int]]:
        """All captions and, for each, the index of its image: ``(texts, text_to_image)``."""
        texts, t2i = [], []
        for i, im in enumerate(self.images):
            texts += im.captions
            t2i += [i] * len(im.captions)
        return texts, t2i

    def __getitem__(self, i: int):
        im = self.images[i]
        return self._img(im.path), list(im.captions)
