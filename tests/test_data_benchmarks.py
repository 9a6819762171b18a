"""DATA_ROOT loaders on tiny fixture trees written in the real formats (JPEG/PNG, .mat, pickles, txt/tsv)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from contrastive_repro.data import (CIFAR10, CIFAR100, CUB200, Cars196, CorruptDatasetError, DatasetNotFoundError,
                                    EmptyDatasetError, ImageFolderDataset, ImageTextDataset, INaturalist2018,
                                    StanfordOnlineProducts)

try:
    from fixtures import data_trees as ft
except ImportError:  # tests/ imported as a package
    from tests.fixtures import data_trees as ft


def _red(img: Image.Image) -> int:
    return int(np.asarray(img)[4, 4, 0])


def _common_checks(ds, n, n_classes):
    assert len(ds) == n and ds.num_classes == n_classes == len(ds.classes)
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
    assert sorted(set(ds.labels.tolist())) == list(range(n_classes))
    assert ds.targets == ds.labels.tolist()
    img, label = ds[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 8)
    assert isinstance(label, int)


# ---- CUB ---------------------------------------------------------------------------------------------------------

def test_cub_dml_split(tmp_path, monkeypatch):
    ft.make_cub(tmp_path, class_ids=(1, 2, 3, 101, 102), per_class=2)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    tr = CUB200("train")
    _common_checks(tr, 6, 3)
    assert tr.classes == ["001.Bird_1", "002.Bird_2", "003.Bird_3"] and tr.class_ids == [1, 2, 3]
    te = CUB200("test", transform=lambda im: torch.tensor(_red(im)))
    _common_checks(CUB200("test"), 4, 2)
    assert te.class_ids == [101, 102] and te.labels.tolist() == [0, 0, 1, 1]
    red, label = te[2]
    assert abs(int(red) - 9) <= 3 and label == 1  # image id 9 (JPEG is lossy)
    assert len(CUB200("all", root=tmp_path / "CUB_200_2011")) == 10  # root may point at the folder itself


def test_cub_missing_and_missing_images(tmp_path):
    with pytest.raises(DatasetNotFoundError) as ei:
        CUB200(root=tmp_path)
    msg = str(ei.value)
    assert str(tmp_path / "CUB_200_2011") in msg and "image_class_labels.txt" in msg and "images/<class dir>" in msg
    d = ft.make_cub(tmp_path)
    next((d / "images").rglob("*.jpg")).unlink()
    with pytest.raises(DatasetNotFoundError, match="1 of 6 listed image files are missing"):
        CUB200(root=tmp_path)
    assert len(CUB200(root=tmp_path, check_files=False)) == 6


def test_cub_empty_split(tmp_path):
    ft.make_cub(tmp_path, class_ids=(1, 2))
    with pytest.raises(EmptyDatasetError, match="'test'"):
        CUB200("test", root=tmp_path)


# ---- Cars ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["annos", "devkit"])
def test_cars_dml_split(tmp_path, layout):
    ft.make_cars(tmp_path, class_ids=(1, 2, 98, 99, 196), per_class=2, layout=layout)
    tr = Cars196("train", root=tmp_path)
    _common_checks(tr, 6, 3)
    assert tr.class_ids == [1, 2, 98] and tr.classes[0] == "Make1 Model1 2001"
    te = Cars196("test", root=tmp_path)
    _common_checks(te, 4, 2)
    assert te.class_ids == [99, 196] and te.classes[1] == "Make196 Model196 2001"
    assert len(Cars196("all", root=tmp_path)) == 10


def test_cars_single_annotation_and_missing(tmp_path):
    ft.make_cars(tmp_path, class_ids=(5,), per_class=1)  # a 1x1 struct array squeezes to a scalar
    assert len(Cars196("train", root=tmp_path)) == 1
    with pytest.raises(DatasetNotFoundError) as ei:
        Cars196(root=tmp_path / "empty")
    assert "cars_annos.mat" in str(ei.value) and "car_ims/" in str(ei.value)
    (tmp_path / "cars196" / "cars_annos.mat").write_bytes(b"MATLAB 5.0 garbage")
    with pytest.raises(CorruptDatasetError, match="loadmat"):
        Cars196(root=tmp_path)


# ---- SOP -----------------------------------------------------------------------------------------------------------

def test_stanford_online_products(tmp_path):
    ft.make_sop(tmp_path)
    tr = StanfordOnlineProducts("train", root=tmp_path)
    _common_checks(tr, 7, 3)
    assert tr.super_labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert tr.super_classes == ["bicycle_final", "cabinet_final"]
    assert _red(tr[0][0]) in range(0, 4) and tr.classes == ["1", "2", "3"]
    te = StanfordOnlineProducts("test", root=tmp_path)
    _common_checks(te, 4, 2)
    assert len(StanfordOnlineProducts("all", root=tmp_path)) == 11


def test_sop_bad_header_and_missing(tmp_path):
    d = ft.make_sop(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="Ebay_train.txt"):
        StanfordOnlineProducts(root=tmp_path / "x")
    text = (d / "Ebay_train.txt").read_text().splitlines()
    (d / "Ebay_train.txt").write_text("\n".join(text[1:]) + "\n")
    with pytest.raises(CorruptDatasetError, match="header"):
        StanfordOnlineProducts(root=tmp_path)


# ---- iNaturalist ---------------------------------------------------------------------------------------------------

def test_inaturalist_list_labels_from_parent_folder(tmp_path):
    d = ft.make_inat(tmp_path)
    tr = INaturalist2018("train", root=tmp_path)
    _common_checks(tr, 5, 2)
    assert tr.classes == ["2491", "3000"] and tr.labels.tolist() == [0, 0, 1, 1, 1]
    te = INaturalist2018("test", root=tmp_path, label_from="parent_path")
    assert te.classes == ["train_val2018/Fungi/5000"] and len(te) == 2
    custom = d / "my_list.txt"
    custom.write_text("train_val2018/Aves/3000/img003.jpg\n\ntrain_val2018/Fungi/5000/img006.jpg\n")
    c = INaturalist2018("train", root=tmp_path, list_file="my_list.txt")
    assert len(c) == 2 and c.classes == ["3000", "5000"]


def test_inaturalist_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError) as ei:
        INaturalist2018(root=tmp_path)
    assert "train_100.txt" in str(ei.value) and "label = parent folder name" in str(ei.value)


# ---- image folder --------------------------------------------------------------------------------------------------

def test_image_folder(tmp_path):
    ft.make_image_folder(tmp_path / "imgs", classes=("cat", "dog", "zebra"), per_class=2)
    (tmp_path / "imgs" / "empty_class").mkdir()
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path / "imgs", transform=_red)
    assert ds.classes == ["cat", "dog", "zebra"] and len(ds) == 6
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2] and ds[2] == (3, 1)
    _common_checks(ImageFolderDataset(tmp_path / "imgs"), 6, 3)


def test_image_folder_relative_to_data_root_and_errors(tmp_path, monkeypatch):
    ft.make_image_folder(tmp_path / "imagenet" / "val", per_class=1)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path / "imagenet")  # "imagenet/val" does not exist relative to here
    assert len(ImageFolderDataset("imagenet/val")) == 3
    with pytest.raises(DatasetNotFoundError, match="missing_dir"):
        ImageFolderDataset(tmp_path / "missing_dir")
    (tmp_path / "flat").mkdir()
    with pytest.raises(EmptyDatasetError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "flat")
    (tmp_path / "flat" / "a").mkdir()
    (tmp_path / "flat" / "a" / "x.txt").write_text("x")
    with pytest.raises(EmptyDatasetError, match="no image files"):
        ImageFolderDataset(tmp_path / "flat")


# ---- image-text table ------------------------------------------------------------------------------------------------

def test_image_text_tsv(tmp_path):
    path, captions = ft.make_image_text(tmp_path / "cc3m", sep="\t", caption_col="title")
    ds = ImageTextDataset(path)
    assert len(ds) == 4 and ds.captions == captions
    img, cap = ds[1]
    assert isinstance(img, Image.Image) and cap == "a blue square"
    assert ds.labels[0] == ds.labels[2] != ds.labels[1]  # identical captions share a label
    tok = ImageTextDataset(path, tokenizer=lambda s: len(s.split()), transform=_red)
    assert tok[3][1] == 5 and abs(tok[3][0] - 4) <= 3


def test_image_text_csv_custom_columns_and_errors(tmp_path, monkeypatch):
    path, captions = ft.make_image_text(tmp_path / "t", sep=",", caption_col="caption")
    ds = ImageTextDataset(path)  # .csv -> comma, caption column auto-detected
    assert ds.captions == captions and ds.caption_col == "caption"
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    assert len(ImageTextDataset("t/pairs.csv", caption_col="caption")) == 4
    with pytest.raises(CorruptDatasetError, match="caption_col"):
        ImageTextDataset(path, image_col="image")
    with pytest.raises(DatasetNotFoundError, match="nothere.tsv"):
        ImageTextDataset(tmp_path / "nothere.tsv")
    (tmp_path / "empty.tsv").write_text("filepath\ttitle\n")
    with pytest.raises(EmptyDatasetError):
        ImageTextDataset(tmp_path / "empty.tsv")


# ---- CIFAR -------------------------------------------------------------------------------------------------------------

def test_cifar10_real_pickle_format(tmp_path, monkeypatch):
    ref = ft.make_cifar(tmp_path, "cifar10", n_per_file=3)
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    tr = CIFAR10("train")
    assert len(tr) == 15 and tr.classes[0] == "airplane" and tr.num_classes == 10
    assert tr.labels.tolist() == sum((ref[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    img, label = tr[4]
    assert isinstance(img, Image.Image) and img.size == (32, 32)
    expected = ref["data_batch_2"][0][1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(np.asarray(img), expected) and label == ref["data_batch_2"][1][1]
    te = CIFAR10("test", root=tmp_path / "cifar-10-batches-py")
    assert len(te) == 3 and te.labels.tolist() == ref["test_batch"][1]
    with pytest.raises(CorruptDatasetError, match="md5"):
        CIFAR10("train", verify_checksums=True)


def test_cifar100_and_missing(tmp_path):
    ref = ft.make_cifar(tmp_path, "cifar100", n_per_file=5)
    ds = CIFAR100("test", root=tmp_path, transform=lambda im: im.size)
    assert len(ds) == 5 and ds.num_classes == 100 and ds.labels.tolist() == ref["test"][1]
    assert ds[0] == ((32, 32), ref["test"][1][0])
    with pytest.raises(DatasetNotFoundError) as ei:
        CIFAR10(root=tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(ei.value) and "data_batch_1" in str(ei.value)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DatasetNotFoundError, match="meta"):
        CIFAR100(root=tmp_path)


# ---- bad input: the error names the file and the line ---------------------------------------------------------
def test_tsv_row_without_caption_names_the_line(tmp_path):
    path, _ = ft.make_image_text(tmp_path)
    lines = path.read_text().splitlines()
    lines[2] = lines[2].split("\t")[0]          # second data row: image path only, no caption field
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptDatasetError, match=r"pairs.tsv.*line 3: the row for image 'images/000001.jpg' has "
                                                  r"no caption in column 'title'"):
        ImageTextDataset(path)
    lines[2] += "\t   "                          # an empty caption is no caption either
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptDatasetError, match="line 3"):
        ImageTextDataset(path)


def test_class_id_that_is_not_an_integer_names_file_and_line(tmp_path):
    d = ft.make_cub(tmp_path)
    lines = (d / "image_class_labels.txt").read_text().splitlines()
    lines[3] = lines[3].split()[0] + " two"
    (d / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptDatasetError, match=r"image_class_labels.txt.*line 4, field 2: 'two' is not an integer"):
        CUB200("train", root=tmp_path)

    d = ft.make_sop(tmp_path / "sop")
    lines = (d / "Ebay_train.txt").read_text().splitlines()
    parts = lines[2].split()
    lines[2] = " ".join([parts[0], "1.5", *parts[2:]])
    (d / "Ebay_train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptDatasetError, match=r"Ebay_train.txt.*line 3, field 2: '1.5' is not an integer"):
        StanfordOnlineProducts("train", root=tmp_path / "sop")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_file_is_named(tmp_path, suffix):
    from contrastive_repro.data._common import pil_loader

    path = ft.write_image(tmp_path / f"img{suffix}", 7, size=64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptDatasetError, match=rf"img{suffix} is corrupt or truncated"):
        pil_loader(path)
    folder = ft.make_image_folder(tmp_path / "folder")
    victim = folder / "dog" / "dog_0.png"
    victim.write_bytes(victim.read_bytes()[:40])
    ds = ImageFolderDataset(folder)
    with pytest.raises(CorruptDatasetError, match="dog_0.png"):  # through a dataset's __getitem__
        ds[[str(p) for p in ds.paths].index(str(victim))]
