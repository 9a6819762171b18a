"""Paper-scale benchmark datasets, read from user-provided folders under ``DATA_ROOT`` (never downloaded).

``root`` arguments: ``None`` means :func:`~contrastive_repro.data.errors.data_root` (``$DATA_ROOT``, else
``./data``); the loaders look for their usual sub-folder there (e.g. ``DATA_ROOT/CUB_200_2011``) and also accept
``root`` pointing at that sub-folder itself. A missing folder or file raises :class:`DatasetNotFoundError` whose
message names the path and prints the expected layout (the class's ``LAYOUT``); a split with no images raises
:class:`EmptyDatasetError`.

Every dataset returns ``(PIL RGB image or transform(image), int label)`` and exposes ``labels`` (int64 tensor),
``targets``, ``classes`` and ``num_classes``; labels are contiguous ``0..C-1`` within the chosen split. The
deep-metric-learning (DML) splits put the first half of the classes in train and the rest, unseen, in test.
"""
from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torchvision

from ._common import LabeledImageDataset, as_label_tensor, pil_loader, relabel_contiguous
from .errors import CorruptDatasetError, DatasetNotFoundError, EmptyDatasetError, data_root

__all__ = ["CUB200", "Cars196", "StanfordOnlineProducts", "INaturalist2018", "ImageFolderDataset",
           "ImageTextDataset", "CIFAR10", "CIFAR100"]

_SPLITS = ("train", "test", "all")


def _check_split(split: str, allowed: Sequence[str] = _SPLITS) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {tuple(allowed)}, got {split!r}")


def _locate(name: str, root: str | os.PathLike | None, subdirs: Sequence[str], markers: Sequence[str],
            layout: str) -> Path:
    """The dataset folder: ``data_root(root)/<subdir>`` or ``data_root(root)`` itself, whichever holds a marker."""
    base = data_root(root)
    for sub in (*subdirs, ""):
        d = base / sub if sub else base
        if any((d / m).exists() for m in markers):
            return d
    raise DatasetNotFoundError(name, base / subdirs[0] if subdirs else base, layout,
                               f"(looked for {' or '.join(markers)} in {base} and {', '.join(str(base / s) for s in subdirs)}; "
                               f"set DATA_ROOT or pass root=)")


def _require(name: str, path: Path, layout: str) -> Path:
    if not path.exists():
        raise DatasetNotFoundError(name, path, layout)
    return path


def _read_rows(name: str, path: Path, layout: str, ncols: int, int_cols: Sequence[int] = (),
               header: bool = False) -> list[list[str]]:
    """Whitespace-separated rows with at least ``ncols`` fields (the last field keeps any inner spaces).

    Fields ``int_cols`` must be integers (class and image ids): a row where one is not raises
    :class:`CorruptDatasetError` naming the file, the line and the value. With ``header`` the first row is
    returned unchecked."""
    _require(name, path, layout)
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(maxsplit=ncols - 1)
        if len(parts) < ncols:
            raise CorruptDatasetError(name, path, f"line {lineno} has {len(parts)} fields, expected {ncols}: {line!r}")
        if not (header and not rows):
            for c in int_cols:
                try:
                    int(parts[c])
                except ValueError:
                    raise CorruptDatasetError(name, path, f"line {lineno}, field {c + 1}: {parts[c]!r} is not an "
                                                          f"integer id: {line!r}") from None
        rows.append(parts)
    return rows


class _FileDataset(LabeledImageDataset):
    LAYOUT = ""

    def _finish(self, paths, raw_classes, class_names: dict, split: str, where: Path, transform, target_transform,
                check_files: bool):
        if not paths:
            raise EmptyDatasetError(f"{self.name}: split {split!r} holds no images (read from {where})")
        labels, keys = relabel_contiguous(raw_classes)
        self.class_ids = list(keys)
        super().__init__(paths, labels, [class_names.get(k, str(k)) for k in keys], transform, target_transform,
                         pil_loader, where)
        self.split, self.root = split, where
        if check_files:
            self.check_files()


class CUB200(_FileDataset):
    """Caltech-UCSD Birds-200-2011, DML split: classes 1-100 train, 101-200 test (``split="all"``: both).

    ``class_ids`` keeps the original 1-based class ids of ``classes``.
    """

    name = "CUB-200-2011"
    LAYOUT = """\
DATA_ROOT/CUB_200_2011/
  images.txt               "<image_id> <relative path>"   e.g. "1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
  image_class_labels.txt   "<image_id> <class_id 1-200>"
  classes.txt              "<class_id> <class name>"       e.g. "1 001.Black_footed_Albatross"
  images/<class dir>/<file>.jpg"""

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, check_files: bool = True):
        _check_split(split)
        d = _locate(self.name, root, ["CUB_200_2011"], ["images.txt"], self.LAYOUT)
        images = {r[0]: r[1].strip() for r in _read_rows(self.name, d / "images.txt", self.LAYOUT, 2)}
        labels = {r[0]: int(r[1]) for r in _read_rows(self.name, d / "image_class_labels.txt", self.LAYOUT, 2,
                                                             int_cols=(1,))}
        names = {int(r[0]): r[1].strip() for r in _read_rows(self.name, d / "classes.txt", self.LAYOUT, 2,
                                                                         int_cols=(0,))}
        _require(self.name, d / "images", self.LAYOUT)
        paths, raw = [], []
        for image_id, rel in images.items():
            if image_id not in labels:
                raise CorruptDatasetError(self.name, d / "image_class_labels.txt", f"no label for image id {image_id}")
            c = labels[image_id]
            if split == "all" or (split == "train") == (c <= 100):
                paths.append(d / "images" / rel)
                raw.append(c)
        self._finish(paths, raw, names, split, d, transform, target_transform, check_files)


def _mat_records(path: Path, key: str):
    from scipy.io import loadmat

    try:
        m = loadmat(str(path), squeeze_me=True)
    except Exception as e:  # noqa: BLE001
        raise CorruptDatasetError("Cars-196", path, f"scipy.io.loadmat failed: {e}") from e
    if key not in m:
        raise CorruptDatasetError("Cars-196", path, f"no {key!r} variable (has {sorted(k for k in m if not k.startswith('__'))})")
    return np.atleast_1d(m[key]), m


class Cars196(_FileDataset):
    """Stanford Cars-196, DML split: classes 1-98 train, 99-196 test (``split="all"``: both), read with scipy.

    Two layouts are accepted: the original all-in-one ``cars_annos.mat`` + ``car_ims/`` (preferred), or the
    devkit layout used by ``torchvision.datasets.StanfordCars`` (train and test annotation files are merged before
    the class split, since the DML protocol ignores the official image split).
    """

    name = "Cars-196"
    LAYOUT = """\
DATA_ROOT/cars196/             (also accepted: CARS_196, Cars196, stanford_cars)
  cars_annos.mat               MATLAB struct: annotations(1x16185).relative_im_path ('car_ims/000001.jpg'),
                               .class (1-196), .bbox_x1/.bbox_y1/.bbox_x2/.bbox_y2, .test; class_names (1x196 cell)
  car_ims/000001.jpg ... 016185.jpg
or the devkit layout:
  devkit/cars_meta.mat          class_names
  devkit/cars_train_annos.mat   annotations(.fname, .class)
  cars_test_annos_withlabels.mat  (or devkit/cars_test_annos_withlabels.mat)
  cars_train/00001.jpg ...   cars_test/00001.jpg ..."""
    SUBDIRS = ["cars196", "CARS_196", "Cars196", "stanford_cars"]

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, check_files: bool = True):
        _check_split(split)
        d = _locate(self.name, root, self.SUBDIRS, ["cars_annos.mat", "devkit/cars_meta.mat"], self.LAYOUT)
        if (d / "cars_annos.mat").is_file():
            ann, m = _mat_records(d / "cars_annos.mat", "annotations")
            if "class_names" not in m:
                raise CorruptDatasetError(self.name, d / "cars_annos.mat", "no 'class_names' variable")
            class_names = [str(s) for s in np.atleast_1d(m["class_names"])]
            items = [(d / str(a["relative_im_path"]), int(a["class"])) for a in ann]
        else:
            meta, _ = _mat_records(d / "devkit" / "cars_meta.mat", "class_names")
            class_names = [str(s) for s in meta]
            test_file = next((p for p in (d / "cars_test_annos_withlabels.mat",
                                          d / "devkit" / "cars_test_annos_withlabels.mat") if p.is_file()), None)
            if test_file is None:
                raise DatasetNotFoundError(self.name, d / "cars_test_annos_withlabels.mat", self.LAYOUT)
            items = []
            for ann_file, img_dir in ((d / "devkit" / "cars_train_annos.mat", "cars_train"), (test_file, "cars_test")):
                _require(self.name, ann_file, self.LAYOUT)
                ann, _ = _mat_records(ann_file, "annotations")
                items += [(d / img_dir / str(a["fname"]), int(a["class"])) for a in ann]
        names = {i + 1: n for i, n in enumerate(class_names)}
        paths, raw = [], []
        for p, c in items:
            if split == "all" or (split == "train") == (c <= 98):
                paths.append(p)
                raw.append(c)
        self._finish(paths, raw, names, split, d, transform, target_transform, check_files)


class StanfordOnlineProducts(_FileDataset):
    """Stanford Online Products (Ebay): the official train (11,318 classes) / test (11,316 classes) lists.

    ``super_labels`` / ``super_classes`` give the 12 super-categories (named after the top folder).
    """

    name = "Stanford Online Products"
    LAYOUT = """\
DATA_ROOT/Stanford_Online_Products/
  Ebay_train.txt    header "image_id class_id super_class_id path", then e.g.
                    "1 1 1 bicycle_final/111085122871_0.JPG"
  Ebay_test.txt     same columns
  bicycle_final/  cabinet_final/  ...  (the image folders the paths point into)"""

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, check_files: bool = True):
        _check_split(split)
        d = _locate(self.name, root, ["Stanford_Online_Products"], ["Ebay_train.txt", "Ebay_test.txt"], self.LAYOUT)
        files = {"train": ["Ebay_train.txt"], "test": ["Ebay_test.txt"], "all": ["Ebay_train.txt", "Ebay_test.txt"]}
        paths, raw, supers = [], [], []
        super_names: dict[int, str] = {}
        for fname in files[split]:
            rows = _read_rows(self.name, d / fname, self.LAYOUT, 4, int_cols=(1, 2), header=True)
            header = [h.lower() for h in rows[0][:3] + rows[0][3].split()] if rows else []
            if header[:4] != ["image_id", "class_id", "super_class_id", "path"]:
                raise CorruptDatasetError(self.name, d / fname, f"header {rows[0] if rows else '(empty)'} is not "
                                                                f"'image_id class_id super_class_id path'")
            for r in rows[1:]:
                rel = r[3].strip()
                paths.append(d / rel)
                raw.append(int(r[1]))
                supers.append(int(r[2]))
                super_names.setdefault(int(r[2]), Path(rel).parts[0] if Path(rel).parts else str(r[2]))
        self._finish(paths, raw, {}, split, d, transform, target_transform, check_files)
        sl, skeys = relabel_contiguous(supers)
        self.super_labels = as_label_tensor(sl)
        self.super_classes = [super_names[k] for k in skeys]


class INaturalist2018(_FileDataset):
    """iNaturalist 2018 metric-learning split (Brown et al., Smooth-AP): lists of relative image paths.

    Each list line is one image path relative to the dataset folder; **the label is the image's parent folder
    name** (the iNat category id, e.g. ``2491`` in ``train_val2018/Plantae/2491/abc.jpg``; ids are unique across
    super-categories). With ``label_from="parent_path"`` the whole parent path (``train_val2018/Plantae/2491``)
    is the class key instead. The default list names are tried in order; pass ``list_file`` for another.
    """

    name = "iNaturalist-2018"
    LAYOUT = """\
DATA_ROOT/iNaturalist_2018/      (also accepted: inaturalist_2018, Inaturalist, iNaturalist)
  train_100.txt  and  test_100.txt                   (or Inat_dataset_splits/Inaturalist_train_set1.txt /
                                                         Inat_dataset_splits/Inaturalist_test_set1.txt)
      one relative image path per line, e.g. "train_val2018/Plantae/2491/4a1a9b2f.jpg"
  train_val2018/<super-category>/<category id>/<image>.jpg    (label = parent folder name)"""
    SUBDIRS = ["iNaturalist_2018", "inaturalist_2018", "Inaturalist", "iNaturalist"]
    LISTS = {"train": ["train_100.txt", "Inat_dataset_splits/Inaturalist_train_set1.txt"],
             "test": ["test_100.txt", "Inat_dataset_splits/Inaturalist_test_set1.txt"]}

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, list_file: str | os.PathLike | None = None,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 label_from: str = "parent_name", check_files: bool = True):
        _check_split(split, ("train", "test"))
        if label_from not in ("parent_name", "parent_path"):
            raise ValueError(f"label_from must be 'parent_name' or 'parent_path', got {label_from!r}")
        candidates = [list_file] if list_file is not None else self.LISTS[split]
        d = _locate(self.name, root, self.SUBDIRS, [str(c) for c in candidates], self.LAYOUT)
        lf = next((d / c for c in candidates if (d / c).is_file()), d / candidates[0])
        _require(self.name, lf, self.LAYOUT)
        paths, raw = [], []
        for line in lf.read_text(encoding="utf-8").splitlines():
            rel = line.strip()
            if not rel or rel.startswith("#"):
                continue
            parent = Path(rel).parent
            if str(parent) in ("", "."):
                raise CorruptDatasetError(self.name, lf, f"{rel!r} has no parent folder to take the label from")
            paths.append(d / rel)
            raw.append(parent.name if label_from == "parent_name" else parent.as_posix())
        self.list_file = lf
        self._finish(paths, raw, {}, split, d, transform, target_transform, check_files)


class ImageFolderDataset(LabeledImageDataset):
    """An ImageNet-style folder ``root/<class name>/<image>`` enumerated with ``torchvision.datasets.ImageFolder``.

    ``root`` is a path; a relative path that does not exist is looked up under ``DATA_ROOT``. Classes are the
    sorted sub-folder names.
    """

    name = "image folder"
    LAYOUT = """\
<root>/
  <class name>/<image>.jpg|.png|...   one sub-folder per class, e.g.
  n01440764/n01440764_10026.JPEG
  n01443537/..."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 target_transform: Callable | None = None, extensions: Sequence[str] | None = None):
        r = Path(root).expanduser()
        if not r.is_absolute() and not r.exists():
            r = data_root() / r
        if not r.is_dir():
            raise DatasetNotFoundError(self.name, r, self.LAYOUT)
        if not any(p.is_dir() for p in r.iterdir()):
            raise EmptyDatasetError(f"{self.name}: {r} has no class sub-folders\nexpected layout:\n{self.LAYOUT}")
        exts = tuple(e.lower() for e in extensions) if extensions else torchvision.datasets.folder.IMG_EXTENSIONS
        try:
            folder = torchvision.datasets.ImageFolder(str(r), is_valid_file=lambda f: f.lower().endswith(exts),
                                                      allow_empty=True)
        except FileNotFoundError as e:
            raise EmptyDatasetError(f"{self.name}: {r}: {e}\nexpected layout:\n{self.LAYOUT}") from e
        if not folder.samples:
            raise EmptyDatasetError(f"{self.name}: no image files ({', '.join(exts)}) under {r}\n"
                                    f"expected layout:\n{self.LAYOUT}")
        # keep only classes that have images, relabelled contiguously
        labels, keys = relabel_contiguous([t for _, t in folder.samples])
        super().__init__([p for p, _ in folder.samples], labels, [folder.classes[k] for k in keys], transform,
                         target_transform, pil_loader, r)
        self.root = r


class ImageTextDataset(LabeledImageDataset):
    """Image-caption pairs from a CSV/TSV file (CC3M / open_clip style): ``ds[i] -> (image, caption)``.

    Args:
        path: the table. A relative path that does not exist is looked up under ``DATA_ROOT``.
        image_col: column with image paths (relative to ``image_root``, default the table's folder; absolute
            paths are used as they are).
        caption_col: caption column; default: the first of ``title``, ``caption``, ``text`` present.
        sep: field separator; default ``\\t`` unless the file name ends in ``.csv``.
        tokenizer: optional ``caption -> tokens`` applied in ``__getitem__``.

    ``captions`` holds the raw captions. ``classes`` are the distinct captions and ``labels[i]`` indexes them, so
    pairs with identical captions share a label (retrieval metrics can count those as matches).
    """

    name = "image-text table"
    LAYOUT = """\
<folder>/
  train.tsv        tab-separated with a header row, e.g.
                   filepath<TAB>title
                   images/000001.jpg<TAB>a dog running on the beach
  images/000001.jpg ...   (paths relative to the table's folder)
(.csv files use commas; column names are configurable)"""

    def __init__(self, path: str | os.PathLike, image_col: str = "filepath", caption_col: str | None = None,
                 sep: str | None = None, image_root: str | os.PathLike | None = None,
                 transform: Callable | None = None, tokenizer: Callable | None = None, check_files: bool = True):
        p = Path(path).expanduser()
        if not p.is_absolute() and not p.exists():
            p = data_root() / p
        if not p.is_file():
            raise DatasetNotFoundError(self.name, p, self.LAYOUT)
        if sep is None:
            sep = "," if p.suffix.lower() == ".csv" else "\t"
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=sep)
            fields = reader.fieldnames or []
            if caption_col is None:
                caption_col = next((c for c in ("title", "caption", "text") if c in fields), None)
            missing = [c for c in (image_col, caption_col) if c is None or c not in fields]
            if missing:
                raise CorruptDatasetError(self.name, p, f"columns {fields} lack {image_col!r} and/or a caption column "
                                                        f"({caption_col or 'title/caption/text'}); set image_col= / caption_col=")
            rows = []
            for r in reader:
                if not r.get(image_col):
                    continue
                caption = r.get(caption_col)
                if caption is None or not caption.strip():
                    raise CorruptDatasetError(self.name, p, f"line {reader.line_num}: the row for image "
                                                            f"{r[image_col]!r} has no caption in column "
                                                            f"{caption_col!r}")
                rows.append((r[image_col], caption))
        base = p.parent if image_root is None else Path(image_root)
        if not rows:
            raise EmptyDatasetError(f"{self.name}: {p} has no rows")
        paths = [Path(fp) if Path(fp).is_absolute() else base / fp for fp, _ in rows]
        self.captions = [c for _, c in rows]
        labels, keys = relabel_contiguous(self.captions)
        super().__init__(paths, labels, keys, transform, None, pil_loader, p)
        self.tokenizer, self.table, self.image_col, self.caption_col = tokenizer, p, image_col, caption_col
        if check_files:
            self.check_files()

    def __getitem__(self, i: int):
        img = self.loader(self.paths[i])
        if self.transform is not None:
            img = self.transform(img)
        cap = self.captions[i]
        return img, (self.tokenizer(cap) if self.tokenizer is not None else cap)


class _CIFARMixin:
    """torchvision CIFAR with ``download=False``, existence checks that raise DatasetNotFoundError, and md5 checks
    only when ``verify_checksums=True`` (so hand-made fixtures in the real pickle format load)."""

    name = "CIFAR"
    LAYOUT = ""
    _verify = False

    def _init(self, split, root, transform, target_transform, verify_checksums):
        _check_split(split, ("train", "test"))
        base = data_root(root)
        if base.name == self.base_folder:  # root given as the batches folder itself
            base = base.parent
        folder = base / self.base_folder
        if not folder.is_dir():
            raise DatasetNotFoundError(self.name, folder, self.LAYOUT.replace("DATA_ROOT", str(base)),
                                       "set DATA_ROOT or pass root=; nothing is downloaded")
        for fname, _ in (*self.train_list, *self.test_list, (self.meta["filename"], None)):
            if not (folder / fname).is_file():
                raise DatasetNotFoundError(self.name, folder / fname, self.LAYOUT.replace("DATA_ROOT", str(base)))
        self._verify = verify_checksums
        try:
            super(_CIFARMixin, self).__init__(str(base), train=split == "train", transform=transform,
                                              target_transform=target_transform, download=False)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
            raise CorruptDatasetError(self.name, folder, f"cannot read the pickled batches ({type(e).__name__}: {e})") from e
        if len(self.data) == 0:
            raise EmptyDatasetError(f"{self.name}: split {split!r} in {folder} holds no images")
        self.split = split
        self.labels = as_label_tensor(self.targets)

    def _check_integrity(self) -> bool:
        from torchvision.datasets.utils import check_integrity

        folder = Path(self.root) / self.base_folder
        for fname, md5 in (*self.train_list, *self.test_list, (self.meta["filename"], self.meta["md5"])):
            if self._verify and not check_integrity(str(folder / fname), md5):
                raise CorruptDatasetError(self.name, folder / fname, "md5 checksum mismatch")
        return True

    def _load_meta(self) -> None:
        path = Path(self.root) / self.base_folder / self.meta["filename"]
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        self.classes = list(data[self.meta["key"]])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class CIFAR10(_CIFARMixin, torchvision.datasets.CIFAR10):
    """CIFAR-10 from ``DATA_ROOT/cifar-10-batches-py`` (python pickle batches), never downloaded."""

    name = "CIFAR-10"
    LAYOUT = """\
DATA_ROOT/cifar-10-batches-py/
  data_batch_1 ... data_batch_5   pickled dicts {"data": uint8 [10000, 3072], "labels": [int]}
  test_batch
  batches.meta                    {"label_names": [10 names]}"""

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, verify_checksums: bool = False):
        self._init(split, root, transform, target_transform, verify_checksums)


class CIFAR100(_CIFARMixin, torchvision.datasets.CIFAR100):
    """CIFAR-100 (fine labels) from ``DATA_ROOT/cifar-100-python``, never downloaded."""

    name = "CIFAR-100"
    LAYOUT = """\
DATA_ROOT/cifar-100-python/
  train    pickled dict {"data": uint8 [50000, 3072], "fine_labels": [int], "coarse_labels": [int]}
  test     same, 10000 images
  meta     {"fine_label_names": [100 names], "coarse_label_names": [20 names]}"""

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, verify_checksums: bool = False):
        self._init(split, root, transform, target_transform, verify_checksums)
